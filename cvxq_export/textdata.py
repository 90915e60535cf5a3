"""Text files to token windows, for calibration and evaluation.

Calibration takes seeded random windows (they may overlap) so a short text
still yields the requested number; evaluation takes the first N consecutive,
non-overlapping windows so results are comparable across tools.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import CvxqError

BUILTIN_CALIBRATION = "builtin"


@dataclass(frozen=True)
class TokenWindows:
    ids: np.ndarray  # [n_windows, seq_len] int64
    source: str  # file path or "builtin"
    n_tokens_in_text: int

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def read_text(path: str | None) -> tuple[str, str]:
    """Return (text, source label). ``None`` or "builtin" is the shipped sample."""
    if path is None or path == BUILTIN_CALIBRATION:
        text = resources.files("cvxq_export.data").joinpath("calibration_sample.txt").read_text("utf-8")
        return text, BUILTIN_CALIBRATION
    p = Path(path).expanduser()
    if not p.is_file():
        raise CvxqError(f"text file {path} does not exist", "pass an existing UTF-8 text file")
    try:
        return p.read_text("utf-8"), str(p)
    except UnicodeDecodeError:
        raise CvxqError(f"text file {path} is not UTF-8 text", "convert it to UTF-8 (iconv -t utf-8)") from None


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Token ids of the whole text, without special tokens (windows add none)."""
    # Long texts: tokenizers warn about model max length; we cut windows ourselves.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def _check_length(n_tokens: int, seq_len: int, source: str, what: str) -> None:
    if n_tokens < seq_len:
        raise CvxqError(
            f"{what} text {source} has {n_tokens} tokens, fewer than one window of {seq_len}",
            f"pass a longer text file, or a shorter window (--seq-len {max(16, n_tokens // 2)})",
        )


def calibration_windows(tokenizer, path: str | None, n_windows: int, seq_len: int, seed: int = 0) -> TokenWindows:
    """``n_windows`` seeded random windows of ``seq_len`` tokens."""
    text, source = read_text(path)
    ids = tokenize(tokenizer, text)
    _check_length(len(ids), seq_len, source, "calibration")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seq_len + 1, size=n_windows)
    windows = np.stack([ids[s : s + seq_len] for s in starts])
    return TokenWindows(windows, source, len(ids))


def evaluation_windows(tokenizer, path: str, n_windows: int | None, seq_len: int) -> TokenWindows:
    """The first ``n_windows`` consecutive windows (all full windows if None)."""
    text, source = read_text(path)
    ids = tokenize(tokenizer, text)
    _check_length(len(ids), seq_len, source, "evaluation")
    available = len(ids) // seq_len
    n = available if n_windows is None else min(n_windows, available)
    windows = ids[: n * seq_len].reshape(n, seq_len)
    return TokenWindows(windows, source, len(ids))
