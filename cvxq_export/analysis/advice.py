"""What the end of ``fit`` runs on the files it wrote: the compressibility / load-time
analysis of each, and which codec and chunk size a compressed packed container
should use (only when some device is predicted to load it faster).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass
class Artifact:
    format: str  # gguf | packed | packed-compressed | onnx
    path: str
    file_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def run_analysis(artifacts: Sequence[Artifact], devices: Sequence | None = None, *, quick: bool = True,
                 progress: bool = True, log=None) -> dict[str, dict]:
    """``analyze_file`` of each artifact (format -> AnalysisResult dict), with budgets meant for the end of ``fit``.

    ``quick`` samples 4 MiB per chunk size and times each decoder for 0.1 s:
    about 15 s for a 75 MB file on two cores. A missing codec package or
    matplotlib never fails the fit: the analysis says what it skipped.
    """
    from tqdm.auto import tqdm

    from .analyze import analyze_file

    out: dict[str, dict] = {}
    for art in tqdm(list(artifacts), desc="analysis", unit="file", disable=not progress):
        if log:
            log(f"analysis: {art.format} {art.path} ...")
        kw = dict(min_seconds=0.1, sample_bytes=4 << 20, tensor_sample_bytes=4 << 20) if quick else {}
        out[art.format] = analyze_file(art.path, devices, **kw).to_dict()
    return out


def container_choice(result: dict, *, force_codec: str | None = None) -> dict | None:
    """Which codec and chunk size to write a compressed container with, from an analysis result.

    Only codecs the container holds (zstd, lz4) count. Returns the option with
    the largest predicted saving on any device that the analysis recommends
    compressing for, or None when no device gains. With ``force_codec``, that
    codec at its best chunk size, gain or not.
    """
    best = None
    for d in result.get("devices", []):
        for opt in d.get("options", []):
            if not (opt["codec"].startswith("zstd") or opt["codec"] == "lz4"):
                continue
            if force_codec and opt["codec"] != force_codec:
                continue
            saving = d["plain_s"] - opt["overlapped_s"]
            gains = d["compress"] and saving >= 0.05 * d["plain_s"]
            if (gains or force_codec) and (best is None or saving > best["saving_s"]):
                best = {"codec": opt["codec"], "chunk_bytes": opt["chunk_bytes"], "device": d["device"],
                        "saving_s": saving, "saving_fraction": saving / d["plain_s"] if d["plain_s"] else 0.0,
                        "predicted_compressed_bytes": opt["compressed_bytes"], "forced": bool(force_codec and not gains)}
    return best
