"""cvxq-export: fit a language model into a byte budget with CVXQ and export it.

Importing this package is cheap: it pulls in no torch, onnx, gguf or
llama.cpp. Each stage imports its own heavy dependencies.
"""
__version__ = "0.1.0"

from .errors import CvxqError, InfeasibleBudget  # noqa: F401  (cheap, no deps)
