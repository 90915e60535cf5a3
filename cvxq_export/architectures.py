"""Which model architectures each stage handles, read from the source's header
before any weights are loaded.

A model is named two ways: transformers' ``config.model_type`` (what the loader
and calibration see) and llama.cpp's ``general.architecture`` (what a GGUF file
declares). The table below joins them and records the few layout facts the
GGUF writer needs; tensor names and roles come from gguf-py's own tables
(``gguf.get_tensor_name_map``), not from a list of ours.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import CvxqError

CONVERT_HINT = ("convert it with llama.cpp's convert_hf_to_gguf.py (python convert_hf_to_gguf.py MODEL_DIR "
                "--outtype f16 --outfile model-f16.gguf) and pass model-f16.gguf to cvxq-export fit")


@dataclass(frozen=True)
class Architecture:
    model_type: str  # transformers' config.model_type
    gguf_arch: str  # llama.cpp's general.architecture
    # llama.cpp's LLAMA graph applies rope to adjacent pairs, HF's checkpoints to
    # halves: convert_hf_to_gguf permutes Q/K rows, transformers' GGUF loader undoes it.
    permute_qk: bool = False
    # Gemma's RMSNorm computes x * (1 + w) and stores w; llama.cpp stores 1 + w.
    norm_offset: float = 0.0
    onnx: bool = False  # this project's ONNX graph expresses it
    tested: bool = True  # a tiny model of it is fitted and checked in llama.cpp by the tests


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", "llama", permute_qk=True, onnx=True),
    Architecture("mistral", "llama", permute_qk=True, onnx=True),
    Architecture("qwen2", "qwen2", onnx=True),
    Architecture("qwen3", "qwen3"),
    Architecture("gemma2", "gemma2", norm_offset=1.0),
    Architecture("gemma3_text", "gemma3", norm_offset=1.0),
    Architecture("phi3", "phi3"),
)}
BY_GGUF_ARCH = {}
for _a in ARCHITECTURES.values():
    BY_GGUF_ARCH.setdefault(_a.gguf_arch, _a)  # "llama" -> the llama entry (mistral files say "llama" too)


# GGUF architectures whose tensors transformers' loader reshapes, splits or transposes
# (its TensorProcessor classes): a GGUF source of these cannot be requantized by name.
# Any other architecture transformers loads from GGUF is written back tensor by tensor,
# each checked against the source file (formats/gguf/layout.py).
RESHAPED_BY_TRANSFORMERS = {"bloom", "gpt2", "t5", "t5encoder", "mamba", "lfm2", "qwen2moe", "qwen3moe", "gpt_oss",
                            "minimax-m2"}


@dataclass(frozen=True)
class SourceHeader:
    """What a model's header says, read without loading weights."""

    kind: str  # "gguf" | "hf-dir" | "hf-cache"
    model_type: str | None  # transformers' name (None: transformers has no GGUF loader for it)
    gguf_arch: str | None  # llama.cpp's name (None: llama.cpp has no such architecture)
    weight_bytes: int  # bytes of the weights as stored (GGUF: the file's size)
    parameters: int  # weights, counted from the tensor shapes

    @property
    def architecture(self) -> Architecture | None:
        return ARCHITECTURES.get(self.model_type or "")


def read_header(source) -> SourceHeader:
    """``source``: a :class:`~cvxq_export.model.ModelSource`."""
    if source.kind == "gguf":
        return _gguf_header(source.path)
    return _hf_header(Path(source.path))


def _gguf_header(path: str) -> SourceHeader:
    from .gguf_header import read_gguf_header

    header = read_gguf_header(path)
    arch = header.architecture
    if arch is None:
        raise CvxqError(f"{path} has no general.architecture", "pass a GGUF model file written by llama.cpp's tools")
    if header.values.get("general.type", "model") != "model":
        raise CvxqError(f"{path} is a GGUF {header.values['general.type']}, not a model", "pass a GGUF model file")
    if arch not in _llama_cpp_archs():
        raise CvxqError(f"{path} declares architecture '{arch}', which llama.cpp (gguf-py {_gguf_version()}) does not know",
                        "pass a GGUF model of an architecture llama.cpp runs")
    model_type = _transformers_type_for_gguf(arch)
    return SourceHeader("gguf", model_type, arch, Path(path).stat().st_size, header.parameters)


def _hf_header(directory: Path) -> SourceHeader:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CvxqError(f"cannot read {directory / 'config.json'}: {exc}", "check the model directory") from None
    if not isinstance(config, dict):
        raise CvxqError(f"{directory / 'config.json'} is not a JSON object", "check the model directory")
    model_type = config.get("model_type")
    if model_type == "gemma3" and isinstance(config.get("text_config"), dict):
        raise CvxqError("this Gemma 3 checkpoint is the multimodal one (vision tower + text model)",
                        "use a text-only Gemma 3 checkpoint (gemma-3-1b or a Gemma3ForCausalLM export)")
    arch = ARCHITECTURES.get(model_type or "")
    nbytes, params = _safetensors_size(directory)
    return SourceHeader("hf-dir", model_type, arch.gguf_arch if arch else None, nbytes, params)


def _safetensors_size(directory: Path) -> tuple[int, int]:
    """(bytes, parameters) of the safetensors shards, from their headers; (0, 0) without them."""
    from .memory import safetensors_parameter_count

    shards = sorted(directory.glob("*.safetensors"))
    try:
        return sum(p.stat().st_size for p in shards), sum(safetensors_parameter_count(p) for p in shards)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        raise CvxqError(f"the safetensors files in {directory} have a damaged header",
                        "check the model directory (a complete download?)") from None


def _llama_cpp_archs() -> set[str]:
    import gguf

    return set(gguf.MODEL_ARCH_NAMES.values())


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


def _transformers_type_for_gguf(arch: str) -> str | None:
    """transformers' model_type for a GGUF architecture its GGUF loader reads, else None."""
    known = BY_GGUF_ARCH.get(arch)
    if known is not None:
        return known.model_type
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except ImportError:
        return None
    return arch if arch in GGUF_CONFIG_MAPPING else None


def check_source(header: SourceHeader, formats: list[str], display: str) -> None:
    """Refuse, before any weights are loaded, a source no requested format can take."""
    if header.kind == "gguf" and header.model_type is None:
        raise CvxqError(f"{display} is a '{header.gguf_arch}' GGUF, which transformers cannot load, so it cannot be "
                        f"calibrated (supported: {supported_list()})",
                        "pass the model's Hugging Face directory, or a GGUF of a supported architecture")
    arch = header.architecture
    if arch is None:
        what = header.model_type or "unknown"
        if header.kind == "gguf" and header.gguf_arch in RESHAPED_BY_TRANSFORMERS and "gguf" in formats:
            raise CvxqError(f"{display} is a '{header.gguf_arch}' GGUF: transformers reshapes its tensors on loading, "
                            "so they cannot be written back by name", "use --format packed for this model")
        if "gguf" in formats and header.kind != "gguf":
            raise CvxqError(f"architecture '{what}' of {display} is not one this tool writes as GGUF "
                            f"(supported: {supported_list()})",
                            "use --format packed (any causal LM transformers loads), or a supported architecture")
        if "onnx" in formats:
            raise CvxqError(f"the ONNX target builds {', '.join(onnx_list())} decoders, not '{what}'",
                            "use --format packed for this model")
        return
    if "onnx" in formats and not arch.onnx:
        raise CvxqError(f"the ONNX target builds {', '.join(onnx_list())} decoders, not '{arch.model_type}'",
                        "use --format gguf or packed for this model")


def supported_list() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def onnx_list() -> list[str]:
    return sorted(a.model_type for a in ARCHITECTURES.values() if a.onnx)


def architecture_of(model_type: str) -> Architecture:
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise CvxqError(f"architecture '{model_type}' is not one this tool writes as GGUF (supported: {supported_list()})",
                        "use --format packed for this model")
    return arch
