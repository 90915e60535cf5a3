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
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / OUTPUT_MARKER).write_text("made by cvxq-export\n")
    except OSError as exc:
        raise CvxqError(f"cannot write into output directory {out}: {exc.strerror or exc}",
                        "choose a writable -o DIR") from None
    return out


def check_text(path: str | Path | None, what: str) -> None:
    if path is None:
        return
    if not Path(path).is_file():
        raise CvxqError(f"{what} file {path} does not exist", f"pass an existing text file to --{what}")


# Upper bounds on counts, so a typo cannot allocate gigabytes before anything else fails.
# max_row_group: the packed format's largest unit (formats.packed.container.MAX_UNIT_SIZE, a test ties them).
LIMITS = {"windows": 100_000, "seq_len": 1 << 20, "n_pcs": 65_536, "eval_windows": 100_000, "max_row_group": 1 << 12,
          "context": 1 << 24, "probes": 1_000, "pca_windows": 100_000}


def check_ratio(name: str, value: float | None, *, hint: str) -> None:
    """A finite ratio in [0, 1] (or None)."""
    import math

    if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
        raise CvxqError(f"--{name} {value} is not a ratio between 0 and 1", hint)


def check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed < 1 << 32:
        raise CvxqError(f"--seed {seed} is out of range", "pass an integer from 0 to 4294967295")


def check_positive(**values: int | None) -> None:
    """Every given count must be a positive integer (``windows=64, seq_len=512, ...``)."""
    for name, value in values.items():
        if value is not None and value <= 0:
            raise CvxqError(f"--{name.replace('_', '-')} must be positive, got {value}", "pass a positive integer")
        limit = LIMITS.get(name)
        if value is not None and limit is not None and value > limit:
            raise CvxqError(f"--{name.replace('_', '-')} {value} is beyond {limit:,}",
                            f"pass a value up to {limit:,}")
