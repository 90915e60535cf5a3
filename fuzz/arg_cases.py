"""Hostile command lines for ``cvxq-export``: every value class of every option, device
profiles and plan files with broken fields, output paths that cannot be written.

A case is ``(argv, expect, files)``: ``expect`` is "refuse" (must end with exit
status 2 and a one-line error before any model is loaded), "accept" (must get as
far as loading the model) or "either" (only a clean outcome is required).
``files`` maps a file name to its bytes, created in the case's own folder; the
text ``{tmp}`` in ``argv`` stands for that folder.
"""
from __future__ import annotations

import itertools
import json

import numpy as np

BASE = ["fit", "--budget", "90MB", "-o", "{tmp}/out"]

COUNTS = ("--windows", "--seq-len", "--n-pcs", "--eval-windows", "--max-row-group", "--context")
COUNT_VALUES = [("1", "accept"), ("64", "accept"), ("0", "refuse"), ("-1", "refuse"), ("-5", "refuse"),
                ("1000000000", "refuse"), ("99999999999999999999", "refuse"), ("1e3", "refuse"), ("nan", "refuse"),
                ("inf", "refuse"), ("", "refuse"), ("0x10", "refuse"), ("2.5", "refuse"), ("\u0663", "accept"),
                (" 7", "accept")]
SEED_VALUES = [("0", "accept"), ("4294967295", "accept"), ("-1", "refuse"), ("4294967296", "refuse"),
               ("nan", "refuse"), ("", "refuse")]
RATIO_VALUES = [("0", "accept"), ("0.9", "accept"), ("1", "accept"), ("-0", "accept"), ("nan", "refuse"),
                ("inf", "refuse"), ("-inf", "refuse"), ("-0.1", "refuse"), ("1.0000001", "refuse"), ("1e309", "refuse"),
                ("", "refuse"), ("x", "refuse")]
BUDGET_VALUES = [("90MB", "accept"), ("1.5GB", "accept"), ("2GiB", "accept"), ("0", "refuse"), ("-5MB", "refuse"),
                 ("nanMB", "refuse"), ("infGB", "refuse"), ("1e400", "refuse"), ("", "refuse"), ("MB", "refuse"),
                 ("90XB", "refuse"), ("0.1B", "refuse"), ("90 MB", "either"), ("\u0669\u0660MB", "either")]
FORMAT_VALUES = [("gguf", "accept"), ("onnx,packed", "accept"), ("gguf,onnx,packed", "accept"), ("", "refuse"),
                 (",", "refuse"), ("tflite", "refuse"), ("gguf,tflite", "refuse"), ("gguf,gguf", "either"),
                 ("GGUF", "either"), (" gguf", "either")]
DEVICE_VALUES = [("raspberry-pi-5-8gb", "accept"), ("no-such-board", "refuse"), ("", "refuse"),
                 ("{tmp}/missing.toml", "refuse"), ("{tmp}", "refuse")]
OUTPUT_VALUES = [("/proc/no-such/out", "refuse"), ("/dev/null", "refuse"), ("", "refuse"), ("{tmp}/afile", "refuse"),
                 ("{tmp}/new/deeper/out", "accept")]
TEXT_VALUES = [("{tmp}/missing.txt", "refuse"), ("{tmp}", "refuse"), ("{tmp}/empty.txt", "either"),
               ("{tmp}/binary.txt", "either")]
COMPRESS_VALUES = [("zstd-3", "refuse"), ("zstd-99", "refuse"), ("brotli", "refuse"), ("", "either")]  # with gguf

GOOD_PROFILE = dict(name="board", ram_bytes=4 << 30, os_reserved_bytes=1 << 30, storage_read_mb_s=100.0,
                    decode_mb_s=200.0, runtime_overhead_bytes=1 << 27, default_format="gguf", default_context=2048,
                    kv_cache_dtype="f16")
PROFILE_BAD = {"ram_bytes": ["inf", "nan", "-1", "0", "1e300", '"4GB"', "true"],
               "os_reserved_bytes": ["-1", "8589934592", '"x"'],
               "storage_read_mb_s": ["0", "-1.0", "nan", "inf"],
               "decode_mb_s": ["0", "-inf", "[]"],
               "runtime_overhead_bytes": ["-1", "1e300"],
               "default_format": ['"tflite"', '""', "1"],
               "default_context": ["0", "-1", "1e9", "2.5"],
               "kv_cache_dtype": ['"f8"', "16"],
               "name": ["1", "[]"]}


def _toml(d: dict) -> str:
    def value(v):
        return json.dumps(v) if isinstance(v, str) else repr(v)
    return "".join(f"{k} = {value(v)}\n" for k, v in d.items())


def _profile_cases():
    good = _toml(GOOD_PROFILE)
    yield ["fit", "--device", "{tmp}/board.toml", "-o", "{tmp}/out"], "accept", {"board.toml": good.encode()}
    for field, values in PROFILE_BAD.items():
        for v in values:
            text = "".join(line if not line.startswith(f"{field} =") else f"{field} = {v}\n"
                           for line in good.splitlines(keepends=True))
            yield ["fit", "--device", "{tmp}/board.toml", "-o", "{tmp}/out"], "refuse", {"board.toml": text.encode()}
        text = "".join(line for line in good.splitlines(keepends=True) if not line.startswith(f"{field} ="))
        expect = "accept" if field == "name" else "refuse"  # a profile without a name is named after its file
        yield ["fit", "--device", "{tmp}/board.toml", "-o", "{tmp}/out"], expect, {"board.toml": text.encode()}
    for raw in (b'name = "b\xff\xfe"\n', b"\x00\x01\x02", b"[[[", good.encode("utf-16"), b"", good.encode() * 2):
        yield ["fit", "--device", "{tmp}/board.toml", "-o", "{tmp}/out"], "refuse", {"board.toml": raw}


def _plan_cases():
    plans = [[1, 2], {}, {"format": "gguf"}, {"format": "tflite", "budget_bytes": 1, "tensors": []},
             {"format": "gguf", "budget_bytes": -1, "tensors": [{}]}, "x", None, 1e308,
             {"format": "gguf", "budget_bytes": 10**30, "tensors": [{"name": 1}]},
             {"format": "packed", "budget_bytes": 100, "tensors": [{"name": "w", "unit_map": "!!"}]}]
    for p in plans:
        yield ["fit", "--plan", "{tmp}/plan.json", "-o", "{tmp}/out"], "refuse", {"plan.json": json.dumps(p).encode()}
    for raw in (b"{", b"\xff\xfe", b"", b"[" * 100000, b'{"format": NaN}'):
        yield ["fit", "--plan", "{tmp}/plan.json", "-o", "{tmp}/out"], "refuse", {"plan.json": raw}


def _single_option_cases():
    def at(option, values):
        for v, expect in values:
            argv = list(BASE)
            if option == "--budget":
                argv[2] = v
            else:
                argv += [option, v]
            yield argv, expect, {}

    for option in COUNTS:
        yield from at(option, COUNT_VALUES)
    yield from at("--seed", SEED_VALUES)
    yield from at("--decode-speed", RATIO_VALUES)
    yield from at("--budget", BUDGET_VALUES)
    yield from at("--format", FORMAT_VALUES)
    for v, expect in DEVICE_VALUES:
        yield ["fit", "--device", v, "-o", "{tmp}/out"], expect, {}
    for v, expect in OUTPUT_VALUES:
        yield ["fit", "--budget", "90MB", "-o", v], expect, {"afile": b"x"}
    for option in ("--calibration", "--eval-text"):
        for v, expect in TEXT_VALUES:
            yield [*BASE, option, v], expect, {"empty.txt": b"", "binary.txt": bytes(range(256)) * 64}
    for v, expect in COMPRESS_VALUES:
        yield [*BASE, "--format", "gguf", "--compress", v], expect, {}
    yield ["fit", "-o", "{tmp}/out"], "either", {}  # neither --budget nor --device
    yield ["fit", "--budget", "90MB"], "refuse", {}  # no output
    yield ["fit", "--budget", "90MB", "--device", "raspberry-pi-5-8gb", "-o", "{tmp}/out"], "either", {}
    yield ["plan", "--budget", "90MB", "-o", "{tmp}/out", "--format", "gguf,onnx"], "either", {}
    yield ["eval", "{tmp}/missing.gguf", "--eval-text", "{tmp}/missing.txt"], "refuse", {}
    yield ["eval", "--eval-windows", "0"], "refuse", {}
    yield ["calibrate", "--windows", "-3"], "refuse", {}
    yield ["run", "{tmp}/missing.gguf"], "refuse", {}
    yield ["analyze", "{tmp}/missing.gguf"], "refuse", {}
    yield ["analyze", "{tmp}/afile"], "accept", {"afile": b"not a model"}  # any file: analysed as a plain blob
    yield ["devices", "--context", "-5"], "refuse", {}
    yield ["fit", "{tmp}/missing-model", "--budget", "90MB", "-o", "{tmp}/out"], "refuse", {}
    yield ["fit", "{tmp}/afile", "--budget", "90MB", "-o", "{tmp}/out"], "refuse", {"afile": b"GGUF\x03\x00"}


def all_cases() -> list[tuple[list[str], str, dict]]:
    """Every fixed case, in a fixed order."""
    return [*_single_option_cases(), *_profile_cases(), *_plan_cases()]


def combined_case(rng: np.random.Generator) -> tuple[list[str], str, dict]:
    """Two to four options at once: refused if any value is bad, accepted if all are good."""
    pool = [(o, v, e) for o in COUNTS for v, e in COUNT_VALUES] + [("--seed", v, e) for v, e in SEED_VALUES]
    pool += [("--decode-speed", v, e) for v, e in RATIO_VALUES] + [("--format", v, e) for v, e in FORMAT_VALUES]
    picks = [pool[int(i)] for i in rng.choice(len(pool), size=int(rng.integers(2, 5)), replace=False)]
    seen = {o for o, _, _ in picks}
    if len(seen) < len(picks):  # one option twice: argparse keeps the last; say nothing about it
        expect = "either"
    else:
        expects = {e for _, _, e in picks}
        expect = "refuse" if "refuse" in expects else "either" if "either" in expects else "accept"
    return [*BASE, *itertools.chain.from_iterable((o, v) for o, v, _ in picks)], expect, {}
