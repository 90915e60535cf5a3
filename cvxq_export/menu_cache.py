"""Menus cached next to the sensitivities, so a new budget re-plans in seconds.

A menu's distortions are the expensive part (every unit quantized at every
option); its costs and layout follow from the shapes and are rebuilt. The cache
entry is the ``[n_units, n_options]`` float64 distortion array, keyed by the
sensitivities it was weighted with, the format and the format's menu settings.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .io import atomic_path

# bump when a menu's distortions change meaning (a quantizer or the weighting changed)
MENU_CACHE_VERSION = 1


def menu_path(cache_dir: Path, sens_key: str, fmt: str, menu_key: str) -> Path:
    h = hashlib.sha256(f"{MENU_CACHE_VERSION}|{sens_key}|{fmt}|{menu_key}".encode()).hexdigest()[:20]
    return Path(cache_dir) / f"menu-{fmt}-{h}.npy"


def load_distortion(path: Path) -> np.ndarray | None:
    """The cached array, or None when there is none or it cannot be read (then the menu is rebuilt)."""
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if arr.ndim == 2 and arr.dtype == np.float64 else None


def save_distortion(path: Path, distortion: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(distortion, dtype=np.float64), allow_pickle=False)
