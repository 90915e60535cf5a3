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


# field -> (smallest, largest) allowed; numbers must be finite, counts integers
_RANGES = {
    "ram_bytes": (1 << 20, 1 << 50),  # 1 MiB .. 1 PiB
    "os_reserved_bytes": (0, 1 << 50),
    "storage_read_mb_s": (1e-3, 1e7),
    "decode_mb_s": (1e-3, 1e7),
    "runtime_overhead_bytes": (0, 1 << 50),
    "default_context": (1, 1 << 24),
}
_INTEGERS = ("ram_bytes", "os_reserved_bytes", "runtime_overhead_bytes", "default_context")
_RUNNABLE_FORMATS = ("gguf", "onnx", "packed")


def profile_problems(data: dict) -> list[tuple[str, str]]:
    """(problem, fix) for every bad field of a parsed profile."""
    out = []
    for key in _REQUIRED:
        if key not in data:
            out.append((f"{key} is missing", f"add {key}"))
    for key, (lo, hi) in _RANGES.items():
        v = data.get(key)
        if key not in data:
            continue
        is_number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not is_number or (key in _INTEGERS and float(v) != int(v)) or not lo <= v <= hi:
            kind = "an integer" if key in _INTEGERS else "a number"
            out.append((f"{key} = {v!r}", f"set {key} to {kind} from {lo:g} to {hi:g}"))
    if "ram_bytes" in data and "os_reserved_bytes" in data and not out:
        if data["os_reserved_bytes"] >= data["ram_bytes"]:
            out.append((f"os_reserved_bytes {data['os_reserved_bytes']} >= ram_bytes {data['ram_bytes']}",
                        "os_reserved_bytes must be below ram_bytes"))
    if "default_format" in data and data["default_format"] not in _RUNNABLE_FORMATS:
        out.append((f"default_format = {data['default_format']!r}", f"use one of {', '.join(_RUNNABLE_FORMATS)}"))
    if "kv_cache_dtype" in data and data["kv_cache_dtype"] not in KV_BYTES:
        out.append((f"kv_cache_dtype = {data['kv_cache_dtype']!r}", f"use one of {', '.join(KV_BYTES)}"))
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            out.append((f"{key} is not a string", f"quote {key}"))
    return out


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
        except UnicodeDecodeError as exc:
            raise CvxqError(f"device profile {path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                            "save it as UTF-8") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CvxqError(f"cannot read device profile {path}: {exc}", "fix the TOML syntax") from None
        problems = profile_problems(data)
        if problems:
            raise CvxqError(f"device profile {path} has {len(problems)} bad field(s): "
                            + "; ".join(p for p, _ in problems), "; ".join(f for _, f in problems))
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
    kv_dtype: str = "f16"  # the cache element type charged

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
                           profile.runtime_overhead_bytes, context, weights, kv_dtype or profile.kv_cache_dtype)


def load_time_seconds(nbytes: int, profile: DeviceProfile) -> float:
    return nbytes / (profile.storage_read_mb_s * 1e6)
