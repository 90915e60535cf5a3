"""Device profiles (``targets/*.toml``) and the weight budget they give.

weight budget = RAM - memory the OS keeps - KV cache(context) - runtime working memory
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from .errors import CvxqError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

_REQUIRED = ("ram_bytes", "os_reserved_bytes", "storage_read_mb_s", "decode_mb_s", "runtime_overhead_bytes",
             "default_format", "default_context", "kv_cache_dtype")
# Bytes per KV element; q8_0 / q4_0 are ggml's 32-element blocks with an fp16 scale.
KV_BYTES = {"f32": (4, 1), "f16": (2, 1), "bf16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    ram_bytes: int
    os_reserved_bytes: int
    storage_read_mb_s: float
    decode_mb_s: float
    runtime_overhead_bytes: int
    default_format: str
    default_context: int
    kv_cache_dtype: str
    sources: dict

    @classmethod
    def from_toml(cls, path: Path) -> "DeviceProfile":
        try:
            data = tomllib.loads(path.read_text("utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CvxqError(f"cannot read device profile {path}: {exc}", "fix the TOML syntax") from None
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise CvxqError(f"device profile {path} lacks {', '.join(missing)}", f"add the fields {', '.join(missing)}")
        for key in _REQUIRED:
            if key not in ("default_format", "kv_cache_dtype") and not (isinstance(data[key], (int, float)) and data[key] >= 0):
                raise CvxqError(f"device profile {path}: {key} must be a non-negative number, got {data[key]!r}",
                                f"set {key} to a number")
        if data["kv_cache_dtype"] not in KV_BYTES:
            raise CvxqError(f"device profile {path}: unknown kv_cache_dtype {data['kv_cache_dtype']!r}",
                            f"use one of {', '.join(KV_BYTES)}")
        return cls(
            name=data.get("name", path.stem), description=data.get("description", ""),
            ram_bytes=int(data["ram_bytes"]), os_reserved_bytes=int(data["os_reserved_bytes"]),
            storage_read_mb_s=float(data["storage_read_mb_s"]), decode_mb_s=float(data["decode_mb_s"]),
            runtime_overhead_bytes=int(data["runtime_overhead_bytes"]), default_format=data["default_format"],
            default_context=int(data["default_context"]), kv_cache_dtype=data["kv_cache_dtype"],
            sources=dict(data.get("sources", {})),
        )


def _targets_dir() -> Path:
    try:
        return Path(str(resources.files("cvxq_export.targets")))
    except (ModuleNotFoundError, TypeError):  # not installed: the repo's folder
        return Path(__file__).resolve().parent.parent / "targets"


def list_devices() -> list[str]:
    return sorted(p.stem for p in _targets_dir().glob("*.toml"))


def load_device(name: str) -> DeviceProfile:
    """A shipped profile by name, or a path to a .toml file."""
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        return DeviceProfile.from_toml(path)
    candidate = _targets_dir() / f"{name}.toml"
    if not candidate.is_file():
        raise CvxqError(f"unknown device '{name}'", f"use one of: {', '.join(list_devices())} (or a path to a .toml profile)")
    return DeviceProfile.from_toml(candidate)


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    n_params: int = 0


def model_shape_from_config(config) -> ModelShape:
    """Llama-style names first, then GPT-2 / OPT style."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and head_dim):
        raise CvxqError("cannot read layers / KV heads / head size from the model config", "pass --budget instead of --device")
    return ModelShape(int(layers), int(kv_heads), int(head_dim))


def kv_cache_bytes(shape: ModelShape, context: int, dtype: str = "f16") -> int:
    """K and V for every layer: 2 * layers * kv_heads * head_dim * context elements."""
    num, den = KV_BYTES[dtype]
    elements = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * context
    return math.ceil(elements * num / den)


@dataclass(frozen=True)
class BudgetBreakdown:
    device: str
    ram: int
    os_reserved: int
    usable: int
    kv_cache: int
    runtime: int
    context: int
    weights: int

    def to_dict(self) -> dict:
        return asdict(self)


def weight_budget(profile: DeviceProfile, shape: ModelShape, context: int | None = None,
                  kv_dtype: str | None = None) -> BudgetBreakdown:
    context = context or profile.default_context
    usable = profile.ram_bytes - profile.os_reserved_bytes
    kv = kv_cache_bytes(shape, context, kv_dtype or profile.kv_cache_dtype)
    weights = usable - kv - profile.runtime_overhead_bytes
    if weights <= 0:
        raise CvxqError(f"device {profile.name} cannot hold the KV cache for a context of {context} tokens "
                        f"({kv:,} bytes) with {usable:,} usable bytes", "pass a shorter --context or --budget")
    return BudgetBreakdown(profile.name, profile.ram_bytes, profile.os_reserved_bytes, usable, kv,
                           profile.runtime_overhead_bytes, context, weights)


def load_time_seconds(nbytes: int, profile: DeviceProfile) -> float:
    return nbytes / (profile.storage_read_mb_s * 1e6)
