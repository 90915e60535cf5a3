"""Format names -> format objects.

Entries are import paths, so looking a name up imports only that format (and
``import cvxq_export`` imports none). A new format is one package under
``formats/`` with a class implementing :class:`~.base.Format`, plus one line here.
"""
from __future__ import annotations

from importlib import import_module

from ..errors import CvxqError
from .base import Format

REGISTRY: dict[str, str] = {
    "gguf": "cvxq_export.formats.gguf.format:GGUFFormat",
    "onnx": "cvxq_export.formats.onnx.format:OnnxFormat",
    "packed": "cvxq_export.formats.packed.format:PackedFormat",
}
_LOADED: dict[str, Format] = {}


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get_format(name: str) -> Format:
    """The format registered as ``name`` (one instance per process)."""
    if name not in REGISTRY:
        raise CvxqError(f"unknown format '{name}'", f"use one or more of {', '.join(REGISTRY)}, comma-separated")
    if name not in _LOADED:
        module, _, cls = REGISTRY[name].partition(":")
        _LOADED[name] = getattr(import_module(module), cls)()
    return _LOADED[name]


def parse_formats(text: str | None) -> list[str]:
    """``"gguf, onnx"`` -> ``["gguf", "onnx"]``: every name checked, duplicates dropped."""
    if text is None:
        return []
    wanted = [f.strip().lower() for f in str(text).split(",") if f.strip()]
    if not wanted:
        raise CvxqError(f"--format '{text}' names no format", f"pass one or more of {', '.join(REGISTRY)}, comma-separated")
    bad = [f for f in wanted if f not in REGISTRY]
    if bad:
        raise CvxqError(f"unknown format(s): {', '.join(bad)}", f"use one or more of {', '.join(REGISTRY)}, comma-separated")
    return list(dict.fromkeys(wanted))
