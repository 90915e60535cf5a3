"""Fuzz campaign: mutated packed, GGUF and ONNX files and hostile command lines, given to
cvxq-export's readers, its C decoder and its CLI, each case in a memory-capped worker.

    python fuzz/fuzz.py --campaign short   # CI: ~2 minutes (tests/test_fuzz.py runs it)
    python fuzz/fuzz.py --campaign long    # >= 10,000 packed, 500 GGUF, 100 ONNX, 200+ argument cases
                                           #   -> docs/results/fuzz/campaign_long.json

What counts as a failure (the goal is zero of each):
- traceback: an exception other than the tool's own clear error;
- crash / abort: the worker or the C decoder died (a signal), or a sanitizer report;
- hang: a case ran past its time limit (worker 60 s, C decoder 10 s);
- memory / over-bound: a MemoryError, or the packed reader's traced peak above its
  declared bound (64 MiB + 100 x file size + 4 bytes per claimed weight);
- silent: a packed file whose bytes were corrupted (checksums not recomputed) was
  accepted and decodes to other content;
- accepted-bad / refused-good: a command line the cases mark bad was accepted, or a
  good one refused.

The base files come from a tiny random Llama fitted to all three formats with the
CLI itself. Cases are a pure function of (seed, target, index).
"""
from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

CAMPAIGNS = {"short": {"packed": 1000, "gguf": 30, "onnx": 15, "args": 0},  # args 0: the fixed cases only
             "long": {"packed": 10_000, "gguf": 500, "onnx": 100, "args": 400}}
WORKER_TIMEOUT_S = 60
WORKER_MEMORY = 8 << 30
FAILURES = {"traceback", "crash", "hang", "memory", "over-bound", "silent", "sanitizer", "bad-exit", "accepted-bad",
            "refused-good"}


def build_base(work: Path) -> dict:
    """A tiny Llama fitted to GGUF, ONNX and packed by the CLI; the C decoder built twice."""
    from tiny_models import build_tiny

    model = build_tiny("llama", work / "model")
    env = {**os.environ, "CVXQ_CACHE_DIR": str(work / "cache")}
    subprocess.run([sys.executable, "-m", "cvxq_export.cli", "fit", str(model), "--budget", "125kB", "--format",
                    "gguf,onnx,packed", "-o", str(work / "base"), "--windows", "3", "--seq-len", "32", "--n-pcs", "8",
                    "-q", "--no-analysis"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from cvxq_export.formats.packed.container import decoder_source

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("no C compiler (cc): install one (apt install gcc) to fuzz the C decoder")
    decoders = [str(work / "packed_decoder")]
    subprocess.run([cc, "-std=c99", "-O2", "-ffp-contract=off", "-o", decoders[0], str(decoder_source())], check=True)
    asan = work / "packed_decoder_asan"
    made = subprocess.run([cc, "-std=c99", "-O1", "-g", "-ffp-contract=off", "-fsanitize=address,undefined",
                           "-fno-sanitize-recover=all", "-o", str(asan), str(decoder_source())], capture_output=True)
    if made.returncode == 0:
        decoders.append(str(asan))
    text = work / "eval.txt"
    text.write_text((ROOT / "cvxq_export" / "data" / "calibration_sample.txt").read_text()[:4000])
    return {"packed": str(work / "base" / "packed" / "model.cvxq.safetensors"),
            "gguf": str(work / "base" / "gguf" / "model.gguf"), "onnx": str(work / "base" / "onnx" / "model.onnx"),
            "eval_text": str(text), "decoders": decoders, "sanitizers": made.returncode == 0}


class Worker:
    """One worker process; restarted after a crash or a hang."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.proc = None

    def start(self) -> None:
        env = {**os.environ, "CVXQ_CACHE_DIR": str(Path(self.cfg["tmp"]) / "cache"), "TQDM_DISABLE": "1"}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "worker.py"), json.dumps(self.cfg)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self._read(300)
        if ready is None or not ready.get("ready"):
            raise SystemExit(f"the fuzz worker did not start; see {self.cfg['tmp']}/worker.log")

    def _read(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def run(self, target: str, index: int, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        t0 = time.perf_counter()
        self.proc.stdin.write(json.dumps({"target": target, "index": index}) + "\n")
        self.proc.stdin.flush()
        result = self._read(timeout)
        if result is not None:
            result["seconds"] = time.perf_counter() - t0
            return result
        if self.proc.poll() is None:  # still running: a hang
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return {"worker": "hang", "worker_detail": f"over {timeout} s"}
        code = self.proc.returncode
        self.proc = None
        return {"worker": "crash", "worker_detail": f"the worker died: {'signal ' + str(-code) if code < 0 else f'status {code}'}"}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def classify(target: str, result: dict) -> dict[str, str]:
    """Per checked component (python, c, cli, plan, worker) its outcome; corrupted packed
    bytes accepted as other content become 'silent'."""
    outcomes = {k: v for k, v in result.items() if k in ("python", "c", "cli", "plan", "worker")}
    if target == "packed" and not result.get("sealed"):
        for k in ("python", "c"):
            if outcomes.get(k) == "accepted-changed":
                outcomes[k] = "silent"
    return outcomes


def run_campaign(name: str, seed: int, work: Path, progress: bool = True) -> dict:
    counts = dict(CAMPAIGNS[name])
    cfg = build_base(work)
    from arg_cases import all_cases

    counts["args"] = len(all_cases()) + counts["args"]
    cfg.update(tmp=str(work / "worker"), seed=seed, memory_bytes=WORKER_MEMORY)
    worker = Worker(cfg)
    table: dict[str, Counter] = {}
    failures: list[dict] = []
    t_start = time.perf_counter()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    for target in ("args", "onnx", "gguf", "packed"):
        indices = range(counts[target])
        bar = tqdm(indices, desc=f"fuzz {target}", disable=not progress or tqdm is None) if tqdm else indices
        for index in bar:
            result = worker.run(target, index, WORKER_TIMEOUT_S)
            for component, outcome in classify(target, result).items():
                table.setdefault(f"{target}/{component}", Counter())[outcome] += 1
                if outcome in FAILURES:
                    failures.append({"target": target, "index": index, "component": component, "outcome": outcome,
                                     "mutation": result.get("mutation"),
                                     "detail": result.get(f"{component}_detail")})
    worker.close()
    return {"campaign": name, "seed": seed, "cases": counts, "sanitizer_build": cfg["sanitizers"],
            "seconds": time.perf_counter() - t_start,
            "outcomes": {k: dict(sorted(v.items())) for k, v in sorted(table.items())},
            "failures": failures, "failure_count": len(failures)}


def markdown(summary: dict) -> str:
    kinds = sorted({o for v in summary["outcomes"].values() for o in v})
    lines = ["| input / checked by | cases | " + " | ".join(kinds) + " |", "|---|---:|" + "---:|" * len(kinds)]
    for key, counter in summary["outcomes"].items():
        lines.append(f"| {key} | {sum(counter.values()):,} | " + " | ".join(f"{counter.get(k, 0):,}" for k in kinds) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--campaign", choices=sorted(CAMPAIGNS), default="short")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the summary JSON here (default for the long campaign: "
                                  "docs/results/fuzz/campaign_long.json)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    out = args.out or (str(ROOT / "docs" / "results" / "fuzz" / "campaign_long.json") if args.campaign == "long" else None)
    with tempfile.TemporaryDirectory(prefix="cvxq-fuzz-") as tmp:
        summary = run_campaign(args.campaign, args.seed, Path(tmp), progress=not args.quiet)
    print(markdown(summary))
    print(f"\n{summary['failure_count']} failures in {summary['seconds']:.0f} s")
    for f in summary["failures"][:40]:
        print(f"  {f['target']}#{f['index']} {f['component']}: {f['outcome']} ({f['mutation']}) {f['detail'] or ''}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        from cvxq_export.io import write_json

        write_json(Path(out), summary)
    return 1 if summary["failure_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
