"""Byte sizes as people write them: ``90MB`` (powers of 10), ``500MiB`` (powers of 2)."""
from __future__ import annotations

import math
import re

from .errors import CvxqError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
_EXAMPLES = "e.g. 90MB, 1.5GB, 500MiB or a byte count like 123456789"


def parse_size(text: str) -> int:
    """Parse a positive size into bytes. kB/MB/GB are 10^3.., KiB/MiB/GiB 2^10.."""
    m = _PATTERN.match(str(text))
    if not m:
        raise CvxqError(f"cannot read the size '{text}'", f"write a positive number with an optional unit, {_EXAMPLES}")
    number, unit = m.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise CvxqError(f"unknown size unit '{unit}' in '{text}'",
                        f"use B, kB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2), {_EXAMPLES}")
    value = float(number) * factor
    if not math.isfinite(value) or value < 1:
        raise CvxqError(f"size '{text}' is not a positive number of bytes", _EXAMPLES)
    return int(value)


def format_size(n: int | float) -> str:
    """Human-readable decimal size: 512 B, 90.0 MB, 1.23 GB."""
    n = float(n)
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {unit}" if unit == "GB" else f"{n / factor:.1f} {unit}"
    return f"{int(n)} B"
