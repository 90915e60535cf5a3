"""Every supported architecture end to end in llama.cpp: a tiny random model of each,
from its HF directory and from a GGUF file, fitted to GGUF and run by llama.cpp, whose
logits must match PyTorch's on the same dequantized weights. Refusals say why, before
any weights are loaded."""
import time

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install 'cvxq-export[llama]'")

from tiny_models import ARCH_CONFIGS, build_tiny  # noqa: E402

from cvxq_export.errors import CvxqError  # noqa: E402

TEXT = "The river delta forms where a slow river meets a calm sea, 42 times, and then the tide turns back again."
ARCHS = list(ARCH_CONFIGS)


def _fit(loaded, out, where: float) -> dict:
    """A GGUF at ``where`` of the way from the smallest to the largest file."""
    from cvxq_export.api import export_one
    from cvxq_export.calibrate import CalibrationSettings
    from cvxq_export.formats.base import FitOptions
    from cvxq_export.formats.registry import get_format
    from cvxq_export.pipeline import calibrate_cached

    sens = calibrate_cached(loaded, None, CalibrationSettings(n_windows=2, seq_len=64, n_pcs=8), progress=False).sens
    options = FitOptions(progress=False, decode_speed=0)
    lo, hi = get_format("gguf").size_range(loaded, options)
    budget = int(lo + where * (hi - lo))
    info = export_one("gguf", loaded, sens, budget, out, options=options).info
    assert info["file_bytes"] <= budget
    return info


def _logits(loaded, ids):
    import torch

    with torch.no_grad():
        return loaded.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _llama_cpp_logits(path, ids):
    from cvxq_export.formats.gguf.llama_eval import open_llama

    llm = open_llama(path, n_ctx=128, logits_all=True, verbose=False)
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)]), llm


def _close(got, ref, rel=3e-2):
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < rel, f"llama.cpp vs PyTorch: max error {err:.3g} of the largest logit"
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.9


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request, tmp_path_factory):
    """(name, HF directory, F16 GGUF written from it)."""
    from cvxq_export.model import load_model

    name = request.param
    # directory names avoid the architecture's name: llama.cpp special-cases some model names
    hf_dir = build_tiny(name, tmp_path_factory.mktemp("model"))
    f16 = _fit(load_model(str(hf_dir)), tmp_path_factory.mktemp("f16"), 1.0)
    return name, hf_dir, f16["path"]


def test_hf_directory_to_gguf_runs_in_llama_cpp(arch_model, tmp_path):
    from cvxq_export.model import load_model

    name, hf_dir, _ = arch_model
    loaded = load_model(str(hf_dir))
    info = _fit(loaded, tmp_path, 0.5)
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > (ARCH_CONFIGS[name][1].get("sliding_window") or 0)  # the window is exercised
    got, llm = _llama_cpp_logits(info["path"], ids)
    assert llm.tokenize(TEXT.encode(), add_bos=False) == ids
    _close(got, _logits(loaded, ids))


def test_gguf_source_requantized_by_name(arch_model, tmp_path):
    """GGUF in, GGUF out: transformers' reading of the F16 file computes the HF model's
    function (fields its loader misses are completed from the header), and the
    requantized file runs in llama.cpp like PyTorch."""
    from cvxq_export.model import load_model

    name, hf_dir, f16_path = arch_model
    original = load_model(str(hf_dir))
    loaded = load_model(f16_path)
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    ref_hf, ref_gguf = _logits(original, ids), _logits(loaded, ids)
    assert np.abs(ref_gguf - ref_hf).max() < 1e-2 * np.abs(ref_hf).max(), "transformers reads the GGUF differently"
    info = _fit(loaded, tmp_path, 0.5)
    got, _ = _llama_cpp_logits(info["path"], ids)
    _close(got, _logits(loaded, ids))


# Tiny models whose GGUF tokenizer transformers saves so that it reads back the same; for the
# others (Gemma's has no unknown token to save, the test Qwen vocabulary splits digits
# differently once saved) the round-trip check keeps no copy and every load reads the GGUF.
COPY_KEPT = ("llama", "llama3-rope", "mistral", "phi3")


def test_gguf_source_loads_again_from_its_converted_copy(arch_model, monkeypatch):
    """The second load of a GGUF reads the copy the first one saved: the same weights,
    config and tokenizer, so the same logits. With no room on disk, no copy is kept."""
    import torch

    from cvxq_export import model_cache
    from cvxq_export.model import load_model

    name, _, f16_path = arch_model
    first = load_model(f16_path)
    copy = model_cache.cached_copy(f16_path, "float32")
    assert (copy is not None) == (name in COPY_KEPT)
    second = load_model(f16_path)
    assert first.converted_copy is None and second.converted_copy == (str(copy) if copy else None)
    assert second.model.config._name_or_path == first.model.config._name_or_path  # writers store it
    a, b = first.model.state_dict(), second.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = first.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert second.tokenizer(TEXT, add_special_tokens=False)["input_ids"] == ids
    np.testing.assert_array_equal(_logits(second, ids), _logits(first, ids))
    assert [r.name for r in second.weights] == [r.name for r in first.weights]
    if copy is None:
        return
    monkeypatch.setattr(model_cache, "MAX_DISK_FRACTION", 0.0)
    monkeypatch.setenv("CVXQ_CACHE_DIR", str(copy.parent.parent / "elsewhere"))
    assert load_model(f16_path).converted_copy is None
    assert model_cache.cached_copy(f16_path, "float32") is None


def _header_only_gguf(path, arch: str):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return str(path)


def test_architecture_refusals_before_loading(tmp_path):
    from cvxq_export.api import check_architecture

    # llama.cpp knows it, transformers cannot load it from GGUF: nothing to calibrate
    rwkv = _header_only_gguf(tmp_path / "a.gguf", "rwkv6")
    t = time.perf_counter()
    with pytest.raises(CvxqError, match="transformers cannot load"):
        check_architecture(rwkv, ["gguf"])
    assert time.perf_counter() - t < 1.0
    # transformers reshapes these tensors on loading: no by-name requantization
    with pytest.raises(CvxqError, match="reshapes its tensors"):
        check_architecture(_header_only_gguf(tmp_path / "b.gguf", "bloom"), ["gguf"])
    # not a llama.cpp architecture at all
    with pytest.raises(CvxqError, match="does not know"):
        check_architecture(_header_only_gguf(tmp_path / "c.gguf", "no-such-arch"), ["gguf"])


def test_hf_refusals_name_the_supported_list(tiny_opt_dir, tmp_path):
    from cvxq_export.api import check_architecture

    with pytest.raises(CvxqError, match="not one this tool writes as GGUF") as e:
        check_architecture(str(tiny_opt_dir), ["gguf"])
    assert "gemma2" in e.value.problem and "packed" in e.value.fix
    check_architecture(str(tiny_opt_dir), ["packed"])  # the packed container takes any causal LM
    gemma = build_tiny("gemma2", tmp_path / "m")
    with pytest.raises(CvxqError, match="ONNX target builds"):
        check_architecture(str(gemma), ["onnx"])


def test_hf_config_llama_cpp_would_misread_is_refused(tmp_path):
    """A Gemma 2 whose attention scale llama.cpp derives differently is refused with the
    pointer to llama.cpp's converter, never written approximately."""
    import json

    from cvxq_export.api import fit

    d = build_tiny("gemma2", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["query_pre_attn_scalar"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    t = time.perf_counter()
    with pytest.raises(CvxqError, match="query_pre_attn_scalar") as e:
        fit(str(d), budget="1MB", formats=["gguf"], output=tmp_path / "out", settings=None, write=False,
            log=lambda *_: None)
    assert "convert_hf_to_gguf.py" in e.value.fix
    assert time.perf_counter() - t < 5.0  # from config.json, before the weights are loaded


def test_packed_container_any_architecture(arch_model, tmp_path):
    """The packed container takes every architecture: written, read back bit-exact by the
    writer's own check, and a fresh model loaded from the file computes what the fitted
    model computes."""
    from cvxq_export.api import export_one
    from cvxq_export.calibrate import CalibrationSettings
    from cvxq_export.formats.base import FitOptions
    from cvxq_export.formats.packed.container import load_packed_into_model
    from cvxq_export.formats.registry import get_format
    from cvxq_export.model import load_model
    from cvxq_export.pipeline import calibrate_cached

    _, hf_dir, _ = arch_model
    loaded = load_model(str(hf_dir))
    sens = calibrate_cached(loaded, None, CalibrationSettings(n_windows=2, seq_len=64, n_pcs=8), progress=False).sens
    options = FitOptions(progress=False)
    lo, hi = get_format("packed").size_range(loaded, options)
    written = export_one("packed", loaded, sens, (lo + hi) // 2, tmp_path, options=options)
    assert written.file_bytes <= (lo + hi) // 2
    fresh = load_model(str(hf_dir))
    load_packed_into_model(written.path, fresh)
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(_logits(fresh, ids), _logits(loaded, ids))
