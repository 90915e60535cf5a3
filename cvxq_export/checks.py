"""Input checks that run before any long work (loading is ~30 s, calibration minutes).

Each raises :class:`~cvxq_export.errors.CvxqError` with what is wrong and how to fix it.
"""
from __future__ import annotations

from pathlib import Path

from .errors import CvxqError

OUTPUT_MARKER = ".cvxq-export"  # marks a directory this tool made (and may write into again)


def check_output_dir(path: str | Path | None, force: bool) -> Path:
    """Create (or reuse) an output directory; refuse a non-empty one this tool did not make."""
    if not path:
        raise CvxqError("no output directory given", "add -o DIR")
    out = Path(path)
    if out.exists():
        if not out.is_dir():
            raise CvxqError(f"output path {out} exists and is not a directory", "choose another -o DIR")
        if any(out.iterdir()) and not (out / OUTPUT_MARKER).exists() and not force:
            raise CvxqError(f"output directory {out} exists, is not empty and was not made by cvxq-export",
                            "choose a new -o DIR, or pass --force to write into it")
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUT_MARKER).write_text("made by cvxq-export\n")
    return out


def check_text(path: str | Path | None, what: str) -> None:
    if path is None:
        return
    if not Path(path).is_file():
        raise CvxqError(f"{what} file {path} does not exist", f"pass an existing text file to --{what}")


def check_positive(**values: int | None) -> None:
    """Every given count must be a positive integer (``windows=64, seq_len=512, ...``)."""
    for name, value in values.items():
        if value is not None and value <= 0:
            raise CvxqError(f"--{name.replace('_', '-')} must be positive, got {value}", "pass a positive integer")
