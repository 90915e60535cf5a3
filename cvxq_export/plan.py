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


_PLAN_NUMBERS = ("budget_bytes", "total_bytes", "fixed_bytes", "min_bytes", "max_bytes")
_TENSOR_FIELDS = {"name": str, "rows": int, "cols": int, "option": str}


def plan_schema_problems(d) -> list[str]:
    """What makes ``d`` (parsed JSON) not a plan: wrong types, missing fields, sizes out of range."""
    if not isinstance(d, dict):
        return [f"the top level is a JSON {type(d).__name__}, not an object"]
    problems = []
    if not isinstance(d.get("format"), str):
        problems.append("'format' is missing or not a string")
    for key in _PLAN_NUMBERS:
        v = d.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 50:
            problems.append(f"'{key}' is {v!r}, not a byte count")
    tensors = d.get("tensors")
    if not isinstance(tensors, list) or not tensors:
        problems.append("'tensors' is missing, empty or not a list")
        return problems
    for i, t in enumerate(tensors):
        if not isinstance(t, dict):
            problems.append(f"tensors[{i}] is not an object")
            break
        bad = [k for k, typ in _TENSOR_FIELDS.items() if not isinstance(t.get(k), typ) or isinstance(t.get(k), bool)]
        unknown = set(t) - set(TensorPlan.__dataclass_fields__)
        if bad or unknown:
            problems.append(f"tensors[{i}] has bad or missing {', '.join(bad + sorted(unknown))}")
            break
        if not (0 < t["rows"] < 1 << 31 and 0 < t["cols"] < 1 << 31):
            problems.append(f"tensors[{i}] has shape {t['rows']}x{t['cols']}")
            break
    return problems


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
        except RecursionError:
            raise CvxqError(f"plan file {path} nests JSON deeper than any plan does",
                            "regenerate it with `cvxq-export plan`") from None
        except OSError as exc:
            raise CvxqError(f"cannot read plan file {path}: {exc.strerror or exc}", "check the path and its permissions") from None
        problems = plan_schema_problems(d)
        if problems:
            raise CvxqError(f"plan file {path} is not a cvxq-export plan: {'; '.join(problems[:5])}",
                            "regenerate it with `cvxq-export plan ... -o DIR`")
        if d.get("version") != PLAN_VERSION:
            raise CvxqError(f"plan file {path} has version {d.get('version')}, expected {PLAN_VERSION}", "regenerate it")
        d = dict(d)
        try:
            tensors = [TensorPlan.from_dict(t) for t in d.pop("tensors")]
        except (TypeError, ValueError) as exc:  # binascii.Error is a ValueError
            raise CvxqError(f"plan file {path} has a malformed tensor entry: {exc}", "regenerate it") from None
        known = set(cls.__dataclass_fields__)
        return cls(tensors=tensors, **{k: v for k, v in d.items() if k in known and k != "tensors"})
