"""Where each quantized weight goes in the GGUF file, and in which row order.

Tensor names come from gguf-py's tables for the file's architecture
(``gguf.get_tensor_name_map``). Rows: llama.cpp's LLAMA graph wants Q/K rows
interleaved per head; its converter permutes them, and transformers' GGUF
loader undoes that for "llama" files, so the model in memory always has HF's
order and the writer permutes exactly where the architecture asks.

For a GGUF source the layout is also checked against the file itself: a few
rows of every weight, put back in the file's order, must equal the source's
stored rows (dequantized). A loader that reshaped a tensor some other way is
caught here instead of producing a file llama.cpp misreads.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...architectures import architecture_of
from ...errors import CvxqError
from ...model import LoadedModel


def _gguf():
    import gguf

    return gguf


@dataclass(frozen=True)
class GGUFLayout:
    arch: str  # general.architecture
    permute_qk: bool  # Q/K rows interleaved per head (llama.cpp's LLAMA graph)
    norm_offset: float  # llama.cpp's norm gain minus the HF one (Gemma: 1)
    names: dict[str, str]  # HF weight name -> GGUF tensor name

    def heads(self, loaded: LoadedModel, gguf_name: str) -> int | None:
        """Heads of a Q/K matrix whose rows are permuted, else None."""
        if not self.permute_qk:
            return None
        cfg = loaded.config
        if gguf_name.endswith("attn_q.weight"):
            return int(cfg.num_attention_heads)
        if gguf_name.endswith("attn_k.weight"):
            return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        return None


def layout_for(loaded: LoadedModel) -> GGUFLayout:
    """Cached on ``loaded``."""
    cached = getattr(loaded, "_gguf_layout", None)
    if cached is None:
        cached = _layout(loaded)
        loaded._gguf_layout = cached
    return cached


def _arch_enum(arch: str):
    gguf = _gguf()
    for enum, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return enum
    raise CvxqError(f"gguf-py has no architecture '{arch}'", "upgrade the gguf package (pip install -U gguf)")


def tensor_name_map(arch: str, n_layers: int):
    return _gguf().get_tensor_name_map(_arch_enum(arch), n_layers)


def _layout(loaded: LoadedModel) -> GGUFLayout:
    if loaded.source.kind == "gguf":
        from ...gguf_header import read_gguf_header

        header = read_gguf_header(loaded.source.path)
        arch = str(header.architecture)
        known = {"llama": True}  # transformers' GGUF loader un-permutes Q/K for "llama" files only
        layout = GGUFLayout(arch, known.get(arch, False), 0.0, _names(loaded, arch))
        _check_against_file(loaded, layout, header)
        return layout
    a = architecture_of(loaded.model_type)
    return GGUFLayout(a.gguf_arch, a.permute_qk, a.norm_offset, _names(loaded, a.gguf_arch))


def _names(loaded: LoadedModel, arch: str) -> dict[str, str]:
    tmap = tensor_name_map(arch, int(loaded.config.num_hidden_layers))
    out = {}
    for ref in loaded.weights:
        name = tmap.get_name(ref.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CvxqError(f"gguf-py's '{arch}' tensor table has no name for {ref.name}",
                            "this model's tensor layout is not one llama.cpp reads for that architecture; "
                            "use --format packed")
        out[ref.name] = name
    return out


SAMPLE_ROWS = (0, 1, -1)  # rows checked per tensor: cheap, and a permutation or transpose moves them


def _check_against_file(loaded: LoadedModel, layout: GGUFLayout, header) -> None:
    from .meta import permute_for_llama_cpp

    gguf = _gguf()
    by_name = {t.name: t for t in header.tensors}
    for ref in loaded.weights:
        gname = layout.names[ref.name]
        stored = by_name.get(gname)
        if stored is None:
            # a tied head (no output.weight) is the embedding; anything else is missing
            if ref.role == "head" or ref.also:
                continue
            raise CvxqError(f"the source GGUF has no tensor {gname} for {ref.name}", "check the source file")
        shape = tuple(reversed(stored.shape))  # numpy order [rows, cols]
        if shape != (ref.rows, ref.cols):
            raise CvxqError(f"{gname} is {shape} in the source GGUF but {ref.rows}x{ref.cols} after loading",
                            "this architecture's GGUF layout is not one this tool writes; use --format packed")
        weight = loaded.weight_tensor(ref)
        w = weight.detach().float().cpu().numpy()  # [rows, cols], HF order
        heads = layout.heads(loaded, gname)
        if heads:
            w = permute_for_llama_cpp(w, heads)
        data = header.tensor_data(loaded.source.path, stored)  # [rows, bytes per row]
        rows = sorted({r % ref.rows for r in SAMPLE_ROWS})
        got = gguf.quants.dequantize(np.asarray(data[rows]), gguf.GGMLQuantizationType(stored.ggml_type))
        got = got.reshape(len(rows), ref.cols)
        want = w[rows]
        rtol = 1e-3 if weight.element_size() == 4 else 1e-2  # a 16-bit model rounds the source
        if not np.allclose(got.astype(np.float32), want, rtol=rtol, atol=rtol * 1e-3 * max(1.0, float(np.abs(want).max()))):
            raise CvxqError(f"the weights of {ref.name} as loaded do not match {gname} in the source file "
                            "(the loader reorders this architecture's tensors in a way this tool does not undo)",
                            "use --format packed for this model")
