"""Compressibility and load-time analysis of exported files, with the load-time model checked here.

For each file: size, order-0 entropy bound, best codec, the per-device
recommendation (``cvxq_export.analysis.analyze_file``), then the measured vs
predicted load time through a reader throttled to each chosen device's storage
read speed (``cvxq_export.analysis.throttle.validate``: plain file, and the
chunked container read serially and overlapped with decoding). The container
uses the codec and chunk size the analysis recommends for that device, or
zstd-3 in 1 MiB chunks where it recommends none (the model is checked either way).

    python benchmarks/bench_analysis.py FILE [FILE ...] [--throttle-device raspberry-pi-5-4gb ...]
        [--md docs/results/analysis/load_time.md] [--json docs/results/analysis/load_time.json]

The validation runs on this machine's CPU (CPU factor 1: no device's decode
speed is emulated), so it checks the model's arithmetic (read, decode,
overlap, start-up), not the device profiles' estimates.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import protocol  # benchmarks/protocol.py
from cvxq_export.analysis.analyze import analyze_file
from cvxq_export.analysis.throttle import validate
from cvxq_export.devices import list_devices, load_device
from cvxq_export.analysis.advice import container_choice

DEFAULT_JSON = protocol.result_path("analysis", "load_time.json")
DEFAULT_THROTTLE = ("raspberry-pi-5-4gb",)
# Only the Raspberry Pi profiles (microSD, 90 MB/s) read slowly enough to emulate here; the others read at
# 1.5-1.8 GB/s, faster than this machine stores bytes into fresh memory (~0.8 GB/s measured, see the docs).
# An extra speed between the two shows the decode-bound side of the model.
DEFAULT_SPEEDS = (300.0,)


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _s(x: float | None) -> str:
    return "-" if x is None else (f"{1000 * x:.0f} ms" if x < 1 else f"{x:.2f} s")


def _label(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="model files (.gguf, model.cvxq.safetensors, .onnx, ...)")
    ap.add_argument("--throttle-device", action="append", default=None,
                    help=f"device profile whose read speed the throttled reader emulates (default: {', '.join(DEFAULT_THROTTLE)})")
    ap.add_argument("--throttle-speed", action="append", type=float, default=None,
                    help=f"extra read speed (MB/s, no device profile) to emulate (default: {', '.join(map(str, DEFAULT_SPEEDS))}; "
                         "0 for none)")
    ap.add_argument("--repeats", type=int, default=2, help="loads per measurement; the fastest is kept (default 2)")
    ap.add_argument("--md", default=None, help="write the Markdown output here too")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help=f"write every number here (default {protocol.shown(DEFAULT_JSON)})")
    args = ap.parse_args(argv)
    devices = [load_device(d) for d in list_devices()]
    throttle = [(d.name, d.storage_read_mb_s) for d in map(load_device, args.throttle_device or DEFAULT_THROTTLE)]
    throttle += [(f"{s:g} MB/s, no profile", s) for s in (args.throttle_speed or DEFAULT_SPEEDS) if s > 0]
    rows, checks = [], []
    for path in args.files:
        if not Path(path).is_file():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        print(f"analysing {path} ...", file=sys.stderr, flush=True)
        res = analyze_file(path, devices).to_dict()
        rows.append(res)
        data = Path(path).read_bytes()
        for name, speed in throttle:
            rec = next((d for d in res["devices"] if d["device"] == name), None)
            choice = (container_choice({"devices": [rec]}) if rec else None) or {"codec": "zstd-3", "chunk_bytes": 1 << 20}
            print(f"  throttled loads at {speed:g} MB/s ({name}), {choice['codec']} ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="cvxq-bench-analysis-") as tmp:
                # decode speed timed for 0.5 s (best round): short timings on a shared machine read low
                results = validate(data, tmp, codec=choice["codec"], chunk_size=choice["chunk_bytes"],
                                   read_MBps=speed, repeats=args.repeats, min_seconds=0.5)
            for r in results:
                checks.append({"file": path, "device": name, "recommended": bool(rec and rec["compress"]), **r.to_dict()})
        print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    lines = ["## Compressibility and load-time analysis (SmolLM2-135M-Instruct)", "",
             "Command: `python benchmarks/bench_analysis.py " + " ".join(args.files)
             + "".join(f" --throttle-device {d}" for d in (args.throttle_device or []))
             + "".join(f" --throttle-speed {s:g}" for s in (args.throttle_speed or [])) + "`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
             f"load average {protocol.load_average()}. **Decode throughputs are noisy** where other work shares the "
             "cores: each throughput is the best of several rounds, each throttled load the fastest of "
             f"{args.repeats}.", "",
             "### Files", "",
             "| file | size | order-0 entropy bound | best codec (1 MiB chunks) | zstd-3 | lz4 | decode MB/s here (best codec) |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        by = {c["name"]: c for c in r["codecs"]}
        best = min(r["codecs"], key=lambda c: c["ratio"])
        pct = lambda name: f"{100 * by[name]['ratio']:.1f} %" if name in by else "-"  # noqa: E731
        lines.append(f"| `{_label(r['path'])}` | {_mb(r['file_bytes'])} | {100 * r['entropy']['bound_bytes'] / r['file_bytes']:.1f} % "
                     f"| {best['name']}, {100 * best['ratio']:.1f} % | {pct('zstd-3')} | {pct('lz4')} | {best['decode_MBps']:,.0f} |")
    lines += ["", "### Recommendation per device", "",
              "| file | " + " | ".join(d.name for d in devices) + " |", "|---|" + "---|" * len(devices)]
    for r in rows:
        cells = []
        for d in r["devices"]:
            if d["compress"]:
                cells.append(f"**{d['codec']}** {d['chunk_bytes'] >> 10} KiB: {_s(d['plain_s'])} -> {_s(d['overlapped_s'])}")
            else:
                cells.append(f"plain ({_s(d['plain_s'])}; best {d['codec']} {_s(d['overlapped_s'])})")
        lines.append(f"| `{_label(r['path'])}` | " + " | ".join(cells) + " |")
    lines += ["", "Compress when the overlapped (read while decoding) load is at least 5 % and 10 ms faster than the "
                  "plain read. Device decode speeds are this machine's codec throughputs times the profile's CPU factor "
                  "(profile zstd speed / zstd-3 speed here).", "",
              "### Measured vs predicted load time (throttled reader, this machine's CPU)", "",
              "| file | read speed (device) | load | container | predicted | measured | error |",
              "|---|---|---|---|---:|---:|---:|"]
    for c in checks:
        cont = "-" if c["mode"] == "plain" else f"{c['codec']}, {c['chunk_bytes'] >> 10} KiB, {100 * c['file_bytes'] / c['raw_bytes']:.1f} %, decode {c['decode_MBps']:,.0f} MB/s"
        lines.append(f"| `{_label(c['file'])}` | {c['read_MBps']:g} MB/s ({c['device']}) | {c['mode']} | {cont} | "
                     f"{_s(c['predicted_s'])} | {_s(c['measured_s'])} | {100 * c['rel_error']:+.1f} % |")
    worst = max((abs(c["rel_error"]) for c in checks), default=0.0)
    lines += ["", f"Largest disagreement: {100 * worst:.1f} % (target: within 15 %). The container's decode speed "
                  "in the prediction is its own chunk decoder (codec + CRC-32 check) timed on the file's chunks here; "
                  "the container is the packed reader's `*.cvxqz` (for a GGUF file it only measures the model: "
                  "llama.cpp does not read the container).", ""]
    text = "\n".join(lines)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    if args.json:
        protocol.write_results(args.json, {"files": rows, "throttled": checks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
