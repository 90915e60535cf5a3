"""Compressibility and load-latency analysis of model files.

Answers "would compressing this file on disk make it load faster on my device,
and by how much?":

* :mod:`.entropy` -- order-0 entropy of bytes and of quantized codes (NumPy only)
* :mod:`.codecs` -- lossless codecs (zstd, lz4, brotli, an order-0 ANS coder),
  each an optional dependency imported lazily, and their measurement
* :mod:`.latency` -- the load-time model per device profile and the recommendation
* :mod:`.throttle` -- a throttled reader that checks the model against measurements
  on this machine, through the packed reader's chunked compressed container
  (:mod:`cvxq_export.formats.packed.compressed`)
* :mod:`.rd_curve` -- the plan's size-vs-distortion curve, traced from the allocator's menu
* :mod:`.analyze` -- ``analyze_file`` (whole file, per tensor for GGUF / safetensors),
  Markdown and a PNG chart
* :mod:`.cli_analyze` -- the ``cvxq-export analyze`` sub-command

Importing this package imports only NumPy; codecs, matplotlib and gguf are
imported when used.
"""
from __future__ import annotations

from .entropy import EntropyResult, byte_entropy, byte_histogram, code_entropy, entropy_from_counts

__all__ = ["EntropyResult", "byte_entropy", "byte_histogram", "code_entropy", "entropy_from_counts"]
