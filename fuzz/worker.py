"""The fuzz worker: runs cases in-process under a memory cap and reports one JSON line each.

Started by ``fuzz.py`` with the campaign's settings as a JSON argument; reads
``{"target": ..., "index": ...}`` lines on stdin, answers
``{"outcome": ..., "detail": ..., "mutation": ...}`` on the file descriptor it was
started with as stdout. Everything the code under test prints (Python and C
level) goes elsewhere, so a crash or an abort ends the process and the driver
sees it as exactly that.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tracemalloc
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import mutate  # noqa: E402
from arg_cases import all_cases, combined_case  # noqa: E402

DECODE_TEMPORARIES = 64 << 20  # docs/packed-format.md: weight() temporaries stay under 64 MiB
C_TIMEOUT_S = 10
C_MEMORY = 2 << 30


class ReachedLoad(Exception):
    """Raised where the CLI would start loading a model: every check before it passed."""


# --------------------------------------------------------------------------- packed


def packed_digest(pf) -> tuple[str, dict[str, str], int]:
    """What a reader makes of a packed file: one hash over everything decoded (weights,
    biases, unquantized tensors, tensor flags, plan, config); per tensor the C decoder's
    checksum; the largest tensor's weight count."""
    h = hashlib.sha256()
    sums, largest = {}, 0
    for name in sorted(pf.tensors):
        t = pf.tensors[name]
        largest = max(largest, t.rows * t.cols)
        sums[name] = pf.checksum(name)
        bias = pf.bias(name)
        h.update(repr((name, sums[name], t.transposed, t.also, t.bias)).encode())
        h.update(b"" if bias is None else np.ascontiguousarray(bias).tobytes())
    for name in sorted(pf.unquantized_names):
        a = pf.unquantized(name)
        h.update(repr((name, a.shape, str(a.dtype))).encode() + np.ascontiguousarray(a).tobytes())
    h.update(json.dumps([pf.plan_json, pf.config], sort_keys=True).encode())
    return h.hexdigest(), sums, largest


class PackedCases:
    def __init__(self, cfg: dict, tmp: Path):
        from cvxq_export.formats.packed.container import read_packed

        self.read_packed = read_packed
        tracemalloc.start()  # numpy reports its buffers to tracemalloc: the reader's peak is measured
        self.base = Path(cfg["packed"]).read_bytes()
        self.decoders = cfg["decoders"]
        self.path = tmp / "case.cvxq.safetensors"
        with read_packed(cfg["packed"]) as pf:
            self.digest, self.sums, _ = packed_digest(pf)
        self.names = sorted(self.sums)

    def run(self, seed: int, index: int) -> dict:
        from cvxq_export.errors import CvxqError

        rng = mutate.rng_for(seed, "packed", index)
        m = mutate.packed_mutation(self.base, rng)
        self.path.write_bytes(m.data)
        out = {"mutation": m.description, "sealed": m.sealed}
        # ---- the NumPy reader, its allocations traced
        tracemalloc.reset_peak()
        claimed = 0
        try:
            with self.read_packed(self.path) as pf:
                claimed = max((t.rows * t.cols for t in pf.tensors.values()), default=0)
                digest, _, _ = packed_digest(pf)
            out["python"] = "accepted-same" if digest == self.digest else "accepted-changed"
        except CvxqError as exc:
            out["python"] = "refused"
            out["python_detail"] = exc.problem.split(": ", 1)[-1][:160]
        except MemoryError:
            out["python"] = "memory"
        except Exception as exc:  # noqa: BLE001 - what the fuzz campaign looks for
            out["python"] = "traceback"
            out["python_detail"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()[:300]
        peak = tracemalloc.get_traced_memory()[1]
        bound = DECODE_TEMPORARIES + 100 * len(m.data) + 4 * claimed
        out["python_peak"] = peak
        if peak > bound:
            out["python"] = "over-bound"
            out["python_detail"] = f"peak {peak:,} bytes > bound {bound:,}"
        # ---- the C decoder on one tensor (the sanitizer build on every 8th case)
        name = self.names[index % len(self.names)]
        decoder = self.decoders[-1] if index % 8 == 0 else self.decoders[0]
        out["c"], out["c_detail"] = self._run_c(decoder, name)
        return out

    def _run_c(self, decoder: str, name: str) -> tuple[str, str]:
        def limit():
            # AddressSanitizer reserves terabytes of address space: no cap for that build
            cap = resource.RLIM_INFINITY if "asan" in decoder else C_MEMORY
            resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))

        try:
            proc = subprocess.run([decoder, str(self.path), name], capture_output=True, text=True, errors="replace",
                                  timeout=C_TIMEOUT_S, preexec_fn=limit)
        except subprocess.TimeoutExpired:
            return "hang", f"over {C_TIMEOUT_S} s"
        err = proc.stderr.strip()
        if "Sanitizer" in err or "runtime error" in err:
            return "sanitizer", err[-300:]
        if proc.returncode < 0:
            return "crash", f"signal {-proc.returncode}"
        if "out of memory" in err:
            return "memory", err[-200:]
        if proc.returncode == 1 and err.startswith("packed_decoder: error: ") and "\n" not in err:
            return "refused", err[len("packed_decoder: error: "):][:160]
        if proc.returncode == 0:
            return ("accepted-same" if proc.stdout.strip() == self.sums[name] else "accepted-changed"), ""
        return "bad-exit", f"status {proc.returncode}: {err[-200:]}"


# --------------------------------------------------------------------------- command lines


def run_cli(argv: list[str]) -> tuple[str, str]:
    """``cvxq-export ARGV`` in this process: refused (exit 2, an error line), accepted,
    reached-load, or a traceback."""
    from cvxq_export.cli import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except ReachedLoad:
        return "reached-load", ""
    except SystemExit as exc:  # argparse: a usage line and the error, status 2
        code = exc.code
        if code == 2:
            return "refused", err.getvalue().strip().splitlines()[-1][:160]
        return "bad-exit", f"SystemExit({code!r})"
    except MemoryError:
        return "memory", ""
    except Exception as exc:  # noqa: BLE001
        return "traceback", "".join(traceback.format_exception_only(type(exc), exc)).strip()[:300]
    text = err.getvalue()
    if "Traceback" in text:
        return "traceback", text[-300:]
    if code == 0:
        return "accepted", ""
    lines = [ln for ln in text.strip().splitlines() if not ln.startswith(("  fix:", "format:"))]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if code == 2 and len(errors) == 1:
        return "refused", errors[0][len("error: "):][:160]
    return "bad-exit", f"status {code}: {text[-300:]}"


class ArgCases:
    def __init__(self, cfg: dict, tmp: Path):
        self.fixed = all_cases()
        self.tmp = tmp

    @staticmethod
    @contextlib.contextmanager
    def _stop_at_load():
        """Model loading (the first long step of fit/plan, and of calibrate/eval) raises ReachedLoad."""
        import cvxq_export.api as api
        import cvxq_export.cli as cli

        def stop(*a, **k):
            raise ReachedLoad

        saved = api.load, cli._load
        api.load = cli._load = stop
        try:
            yield
        finally:
            api.load, cli._load = saved

    def run(self, seed: int, index: int) -> dict:
        if index < len(self.fixed):
            argv, expect, files = self.fixed[index]
        else:
            argv, expect, files = combined_case(mutate.rng_for(seed, "args", index))
        case_dir = self.tmp / f"args{index}"
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir()
        for name, data in files.items():
            (case_dir / name).write_bytes(data)
        argv = [a.replace("{tmp}", str(case_dir)) for a in argv]
        with self._stop_at_load():
            got, detail = run_cli(argv)
        shutil.rmtree(case_dir, ignore_errors=True)
        outcome = got
        if got in ("refused", "reached-load", "accepted"):
            accepted = got != "refused"
            if expect == "refuse" and accepted:
                outcome = "accepted-bad"
            elif expect == "accept" and not accepted:
                outcome = "refused-good"
        return {"mutation": " ".join(argv[:12]).replace(str(case_dir), "{tmp}"), "expect": expect, "cli": outcome,
                "cli_detail": detail}


# --------------------------------------------------------------------------- GGUF and ONNX given to the CLI


class ModelFileCases:
    """A mutated model.gguf or model.onnx given to ``eval`` (and, for every 5th GGUF, to ``plan``)."""

    def __init__(self, cfg: dict, tmp: Path, kind: str):
        self.kind, self.cfg = kind, cfg
        self.dir = tmp / kind
        shutil.rmtree(self.dir, ignore_errors=True)
        if kind == "onnx":
            shutil.copytree(Path(cfg["onnx"]).parent, self.dir)  # config and tokenizer beside the graph
            self.path = self.dir / "model.onnx"
        else:
            self.dir.mkdir()
            self.path = self.dir / "model.gguf"
        self.base = Path(cfg[kind]).read_bytes()
        self.header_end = self._header_end()

    def _header_end(self) -> int:
        if self.kind == "gguf":
            from cvxq_export.gguf_header import read_gguf_header

            return read_gguf_header(self.cfg["gguf"]).data_offset
        return len(self.base)

    def run(self, seed: int, index: int) -> dict:
        rng = mutate.rng_for(seed, self.kind, index)
        if self.kind == "gguf":
            m = mutate.gguf_mutation(self.base, str(self.dir / "edit.gguf"), rng, self.header_end)
        else:
            m = mutate.raw_mutation(self.base, rng, self.header_end)
        self.path.write_bytes(m.data)
        text = self.cfg["eval_text"]
        out = {"mutation": m.description}
        out["cli"], out["cli_detail"] = run_cli(["eval", str(self.path), "--eval-text", text, "--eval-windows", "1",
                                                 "--seq-len", "16", "-q"])
        if self.kind == "gguf" and index % 5 == 0:
            plan_out = self.dir / "plan-out"
            shutil.rmtree(plan_out, ignore_errors=True)
            out["plan"], out["plan_detail"] = run_cli(["plan", str(self.path), "--budget", "125kB", "--format", "gguf",
                                                       "--windows", "1", "--seq-len", "16", "--n-pcs", "4", "-q",
                                                       "--no-cache", "-o", str(plan_out)])
        shutil.rmtree(Path(os.environ["CVXQ_CACHE_DIR"]) / "models", ignore_errors=True)  # converted copies
        return out


# --------------------------------------------------------------------------- main loop


def main() -> None:
    cfg = json.loads(sys.argv[1])
    tmp = Path(cfg["tmp"])
    tmp.mkdir(parents=True, exist_ok=True)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    log = os.open(str(tmp / "worker.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)  # what the code under test prints (llama.cpp logs, progress) is not the protocol
    os.dup2(log, 2)
    # the soft limit only: the C decoder's sanitizer build, started from here, lifts it
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"], resource.getrlimit(resource.RLIMIT_AS)[1]))
    makers = {"packed": lambda: PackedCases(cfg, tmp), "args": lambda: ArgCases(cfg, tmp),
              "gguf": lambda: ModelFileCases(cfg, tmp, "gguf"), "onnx": lambda: ModelFileCases(cfg, tmp, "onnx")}
    runners: dict = {}
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        case = json.loads(line)
        target = case["target"]
        if target not in runners:
            runners[target] = makers[target]()
        result = runners[target].run(cfg["seed"], case["index"])
        proto.write(json.dumps(result, default=str) + "\n")


if __name__ == "__main__":
    main()
