"""The plan: what the allocator chose, with its certificate. Plain JSON.

``plan.json`` is enough to re-run quantization and lowering without
re-allocating (``--plan plan.json``). Per-unit maps are stored as base64 of
their uint8 bytes so a plan for a 100M-weight model stays a few MB.
"""
from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import CvxqError

PLAN_VERSION = 1


@dataclass
class TensorPlan:
    name: str
    rows: int
    cols: int
    option: str  # "native" (per-unit map) or a format's option name, e.g. "Q4_K"
    row_group: int = 0
    col_group: int = 0
    unit_map: np.ndarray | None = None  # [n_units] uint8 for "native"
    bytes: int = 0
    distortion: float = 0.0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / (self.rows * self.cols)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "unit_map"}
        if self.unit_map is not None:
            d["unit_map"] = base64.b64encode(np.ascontiguousarray(self.unit_map, dtype=np.uint8).tobytes()).decode()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorPlan":
        d = dict(d)
        if d.get("unit_map") is not None:
            d["unit_map"] = np.frombuffer(base64.b64decode(d["unit_map"]), dtype=np.uint8).copy()
        return cls(**d)


@dataclass
class Plan:
    format: str  # "native" | "gguf" | "onnx" | "packed"
    budget_bytes: int
    total_bytes: int  # weights + fixed, what the allocator counted
    fixed_bytes: int  # tensors left unquantized, padding allowance, headers
    lam: float  # Lagrange multiplier of the certificate
    distortion: float
    min_bytes: int
    max_bytes: int
    model: str  # display name of the source
    model_fingerprint: str
    tensors: list[TensorPlan] = field(default_factory=list)
    scope: str = "all"  # which weights were quantized: "all" | "blocks"
    notes: list[str] = field(default_factory=list)
    # weak-duality lower bound on the distortion of any plan of the same menu within the budget
    # (allocate.lagrangian_bound); None for plans made before it was recorded
    dual_bound: float | None = None
    # what the bound covers: the planner's extra constraints (a speed limit, split rules) are not in it
    bound_scope: str = "under the byte budget"

    @property
    def gap(self) -> float | None:
        """How far the plan's distortion can be above the best plan of its menu, as a fraction of it."""
        if self.dual_bound is None or self.distortion <= 0:
            return None
        return max(0.0, (self.distortion - self.dual_bound) / self.distortion)

    def tensor(self, name: str) -> TensorPlan:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def quantized_weights(self) -> int:
        return sum(t.rows * t.cols for t in self.tensors)

    @property
    def quantized_bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "tensors"}
        d["quantized_weights"] = self.quantized_weights
        d["quantized_bytes"] = self.quantized_bytes
        d["bits_per_weight"] = 8 * self.quantized_bytes / max(1, self.quantized_weights)
        d["gap"] = self.gap
        return d

    def to_json(self) -> str:
        d = self.summary()
        d["version"] = PLAN_VERSION
        d["tensors"] = [t.to_dict() for t in self.tensors]
        return json.dumps(d, indent=1)

    def save(self, path: str | Path) -> None:
        from .io import write_text

        write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            d = json.loads(Path(path).read_text("utf-8"))
        except FileNotFoundError:
            raise CvxqError(f"plan file {path} does not exist", "make one with `cvxq-export plan ... -o DIR`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CvxqError(f"plan file {path} is not valid JSON: {exc}", "regenerate it with `cvxq-export plan`") from None
        if d.get("version") != PLAN_VERSION:
            raise CvxqError(f"plan file {path} has version {d.get('version')}, expected {PLAN_VERSION}", "regenerate it")
        tensors = [TensorPlan.from_dict(t) for t in d.pop("tensors")]
        known = set(cls.__dataclass_fields__)
        return cls(tensors=tensors, **{k: v for k, v in d.items() if k in known and k != "tensors"})
