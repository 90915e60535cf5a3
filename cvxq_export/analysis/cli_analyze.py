"""``cvxq-export analyze ARTIFACT [--device D ...] [--json] [-o DIR]``.

Would compressing the file on disk make it load faster on a device, and by how
much? Prints a summary (or, with ``--json``, leaves stdout to the caller, which
prints the returned dict); with ``-o DIR`` writes ``analysis.md``,
``analysis.json`` and ``load_times.png`` there (atomically). With
``--write-compressed [auto|CODEC]`` a packed file also gets its chunked
compressed container (``FILE.cvxqz``), with ``auto`` only when the analysis
predicts a faster load on some device.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CvxqError


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("analyze", help="would compressing a model file make it load faster on a device, and by how much")
    p.add_argument("artifact", help="model file to analyse: .gguf, .safetensors (incl. the packed format) or any file")
    p.add_argument("--device", action="append", default=None,
                   help="device profile name (see `cvxq-export devices`) or a .toml file; repeat for several "
                        "(default: every shipped profile)")
    p.add_argument("--chunk-size", action="append", default=None,
                   help="chunk size to evaluate, e.g. 256KiB, 1MiB; repeat for several (default: 256KiB, 1MiB, 4MiB)")
    p.add_argument("--codec", action="append", default=None,
                   help="codec to try (zstd-1, zstd-3, zstd-9, zstd-19, lz4, brotli-5, brotli-11, ans); repeat for "
                        "several (default: all installed)")
    p.add_argument("--sample", default="4MiB", help="bytes measured per chunk size on large files (default 4MiB)")
    p.add_argument("--no-tensors", action="store_true", help="skip the per-tensor analysis")
    p.add_argument("-o", "--output", help="output directory for analysis.md, analysis.json and load_times.png")
    p.add_argument("--force", action="store_true", help="write into an existing directory not made by this tool")
    p.add_argument("--write-compressed", nargs="?", const="auto", default=None, metavar="CODEC",
                   help="packed files: write the chunked compressed container (FILE.cvxqz, next to FILE or in -o DIR) "
                        "that the packed reader reads; 'auto' (the default value) only if the analysis predicts a faster "
                        "load on some device, with its codec and chunk size; zstd-N or lz4 forces that codec")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def _log(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr)


def cmd_analyze(args) -> dict:
    from ..devices import load_device
    from ..sizes import parse_size
    from .analyze import DEFAULT_CHUNK_SIZES, analyze_file, plot_load_times, render_markdown
    from .codecs import CODECS

    # ---- everything that can fail fast, before the measurements
    artifact = Path(args.artifact)
    if not artifact.is_file():
        raise CvxqError(f"artifact {artifact} does not exist or is not a file",
                        "pass a model file (.gguf, .safetensors or model.cvxq.safetensors)")
    devices = [load_device(d) for d in args.device] if args.device else None
    chunk_sizes = tuple(parse_size(c) for c in args.chunk_size) if args.chunk_size else DEFAULT_CHUNK_SIZES
    sample = parse_size(args.sample)
    codecs = None
    if args.codec:
        bad = [c for c in args.codec if c not in CODECS]
        if bad:
            raise CvxqError(f"unknown codec(s): {', '.join(bad)}", f"use one or more of {', '.join(CODECS)}")
        codecs = list(dict.fromkeys(args.codec))
    write_compressed = getattr(args, "write_compressed", None)
    if write_compressed and write_compressed != "auto":
        from ..formats.packed.compressed import parse_codec

        parse_codec(write_compressed)
    if write_compressed:
        from ..formats.packed.container import read_packed

        with read_packed(artifact, lazy=True):  # header checks only: is this a packed file at all?
            pass
    out = None
    if args.output:
        from ..checks import check_output_dir

        out = check_output_dir(args.output, args.force)
    _log(args, f"analysing {artifact} ...")
    result = analyze_file(artifact, devices, chunk_sizes, codecs=codecs, sample_bytes=sample,
                          per_tensor=not args.no_tensors)
    data = result.to_dict()
    if len(result.skipped_codecs) == len(CODECS if codecs is None else codecs):
        _log(args, "note: no codec package is installed: pip install 'cvxq-export[analysis]'")
    files = {}
    if out is not None:
        from ..io import write_json, write_text

        write_text(out / "analysis.md", render_markdown(result))
        write_json(out / "analysis.json", data)
        files = {"markdown": str(out / "analysis.md"), "json": str(out / "analysis.json")}
        try:
            plot_load_times(result, out / "load_times.png")
            files["plot"] = str(out / "load_times.png")
        except ImportError:
            _log(args, "note: matplotlib is not installed, so no load_times.png: pip install 'cvxq-export[report]'")
    compressed = None
    if write_compressed:
        compressed = _write_compressed(args, artifact, data, write_compressed, out)
        if compressed:
            files["compressed"] = compressed["path"]
    if not args.json:
        _print_summary(data)
    for path in files.values():
        _log(args, f"wrote {path}")
    return {**data, "files": files, "compressed": compressed}


def _write_compressed(args, artifact: Path, data: dict, codec: str, out: Path | None) -> dict | None:
    """The container for a packed file, when the analysis finds a gain (or the codec is forced)."""
    from ..formats.packed.compressed import DEFAULT_CHUNK_BYTES, compressed_name
    from ..formats.packed.container import write_compressed_packed
    from .advice import container_choice

    choice = container_choice(data, force_codec=None if codec == "auto" else codec)
    if codec == "auto" and choice is None:
        _log(args, "compressed container: not written: no device is predicted to load the file at least 5 % faster "
                   "compressed (pass --write-compressed zstd-3 to write one anyway)")
        return None
    dst = compressed_name(out / artifact.name if out is not None else artifact)
    info = write_compressed_packed(artifact, dst, codec=choice["codec"] if choice else codec,
                                   chunk_size=choice["chunk_bytes"] if choice else DEFAULT_CHUNK_BYTES,
                                   progress=not args.quiet)
    return {**info, "choice": choice}


def _print_summary(d: dict) -> None:
    size = d["file_bytes"]
    ent = d["entropy"]
    print(f"{d['path']}: {size:,} bytes, {d['format']}, order-0 entropy {ent['bits_per_symbol']:.3f} bits/byte "
          f"(bound {100 * ent['bound_bytes'] / max(size, 1):.1f} % of the file)")
    if d["codecs"]:
        print(f"{'codec':10} {'compressed/raw':>14} {'decode MB/s':>12}   ({d['reference_chunk_bytes'] >> 10} KiB chunks)")
        for c in sorted(d["codecs"], key=lambda c: c["ratio"]):
            dec = f"{c['decode_MBps']:,.0f}" if c["decode_MBps"] else "-"
            print(f"{c['name']:10} {100 * c['ratio']:13.1f}% {dec:>12}")
    for r in d["devices"]:
        print(f"{r['device']:24} {'compress' if r['compress'] else 'keep plain':10}  {r['reason']}")
