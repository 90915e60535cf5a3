import itertools

import numpy as np
import pytest
import torch

from cvxq_export.calibrate import CalibrationSettings, Sensitivities, calibrate, output_directions, probe_grad_sq
from cvxq_export.model import load_model
from cvxq_export.textdata import calibration_windows

from calibration_reference import reference_stats  # noqa: E402 - tests/ helper


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def _windows(loaded, n=4, seq_len=16, seed=0):
    return calibration_windows(loaded.tokenizer, None, n, seq_len, seed).ids


def test_shapes_and_tied_embedding(llama):
    settings = CalibrationSettings(n_windows=3, seq_len=16, n_pcs=8, pca_windows=3, row_group=32)
    sens = calibrate(llama, _windows(llama, 3), settings, progress=False)
    names = {r.name for r in llama.weights}
    assert set(sens.stats) == names
    assert "lm_head.weight" not in names  # tied: one entry, under the embedding
    for ref in llama.weights:
        st = sens[ref.name]
        assert st.grad_sq.shape == (-(-ref.rows // 32), ref.cols)
        assert st.row_grad_sq.shape == (ref.rows,)
        assert np.all(st.grad_sq >= 0) and st.grad_sq.sum() > 0
        if ref.kind == "linear":
            assert st.input_mean.shape == (ref.cols,)


def test_deterministic_with_seed(llama, tmp_path):
    settings = CalibrationSettings(n_windows=2, seq_len=16, n_pcs=4, pca_windows=2)
    a = calibrate(llama, _windows(llama, 2), settings, progress=False)
    b = calibrate(llama, _windows(llama, 2), settings, progress=False)
    for name in a.stats:
        np.testing.assert_array_equal(a[name].grad_sq, b[name].grad_sq)
    a.save(tmp_path / "s.safetensors")
    c = Sensitivities.load(tmp_path / "s.safetensors")
    assert c.settings == a.settings and c.model_fingerprint == a.model_fingerprint
    for name in a.stats:
        np.testing.assert_array_equal(a[name].grad_sq, c[name].grad_sq)


def _setup(llama, seq_len=3, k=2):
    ids = torch.as_tensor(_windows(llama, 1, seq_len)[0])[None]
    directions, _ = output_directions(llama, _windows(llama, 2, 16), k)
    params = {r.name: llama.model.get_parameter(r.name) for r in llama.weights}
    for p in llama.model.parameters():
        p.requires_grad_(True)
    return ids, directions, params


def test_random_sign_estimator_is_exact_in_expectation(llama):
    """Averaging G^2 over every sign pattern equals the per-(token, direction)
    sum of squared gradients exactly: the estimator is unbiased."""
    ids, directions, params = _setup(llama)
    projected = llama.model(input_ids=ids).logits[0].float() @ directions  # [T, k]
    T, k = projected.shape
    exact = {n: 0 for n in params}
    for t in range(T):
        for j in range(k):
            mask = torch.zeros(T, k)
            mask[t, j] = 1
            for name, g2 in probe_grad_sq(projected, mask, llama.weights, params, retain=True):
                exact[name] = exact[name] + g2
    mean = {n: 0 for n in params}
    patterns = list(itertools.product((-1.0, 1.0), repeat=T * k))
    for signs in patterns:
        s = torch.tensor(signs).reshape(T, k)
        for name, g2 in probe_grad_sq(projected, s, llama.weights, params, retain=True):
            mean[name] = mean[name] + g2 / len(patterns)
    for name in params:
        # float32 backward: equal up to its rounding
        torch.testing.assert_close(mean[name], exact[name], rtol=1e-4, atol=1e-9)


def test_calibrate_many_probes_approaches_exact(llama):
    """The statistic calibrate() stores, with many probes, is close to the exact sum."""
    ids, directions, params = _setup(llama, seq_len=6, k=3)
    settings = CalibrationSettings(n_windows=1, seq_len=6, n_pcs=3, pca_windows=2, probes=400, row_group=32)
    windows = ids.numpy()
    sens = calibrate(llama, windows, settings, progress=False)
    # exact per-(t, k) sum with the same directions calibrate() used
    d2, _ = output_directions(llama, windows[:2], 3)
    projected = llama.model(input_ids=ids).logits[0].float() @ d2
    ref = llama.weights[1]  # a block linear layer
    exact = 0
    for t in range(projected.shape[0]):
        for j in range(projected.shape[1]):
            mask = torch.zeros_like(projected)
            mask[t, j] = 1
            for name, g2 in probe_grad_sq(projected, mask, [ref], params, retain=True):
                exact = exact + g2
    exact_grouped = exact.numpy().reshape(-1, 32, ref.cols).mean(1) if ref.rows % 32 == 0 else None
    est = sens[ref.name].grad_sq
    rel = abs(est.sum() - exact_grouped.sum()) / exact_grouped.sum()
    assert rel < 0.15, rel
    corr = np.corrcoef(est.ravel(), exact_grouped.ravel())[0, 1]
    assert corr > 0.9, corr


def test_opt_calibrates(tiny_opt_dir):
    opt = load_model(str(tiny_opt_dir))
    assert any(r.kind == "linear" for r in opt.weights)
    settings = CalibrationSettings(n_windows=2, seq_len=16, n_pcs=4, pca_windows=2)
    sens = calibrate(opt, _windows(opt, 2), settings, progress=False)
    assert all(sens[r.name].grad_sq.sum() > 0 for r in opt.weights)


def test_cache_key_follows_the_text_not_the_path_spelling():
    """The same calibration file given by a relative and an absolute path (or copied) must
    reuse the cached sensitivities; another text or other settings must not."""
    from cvxq_export.calibrate import CalibrationSettings
    from cvxq_export.pipeline import sensitivities_key

    rel = CalibrationSettings(calibration="../shared/data/wikitext-2/valid.txt")
    absolute = CalibrationSettings(calibration="/work/shared/data/wikitext-2/valid.txt")
    assert sensitivities_key("model", rel, "some text") == sensitivities_key("model", absolute, "some text")
    assert sensitivities_key("model", rel, "some text") != sensitivities_key("model", rel, "other text")
    assert sensitivities_key("model", rel, "some text") != sensitivities_key("model", CalibrationSettings(
        calibration=rel.calibration, n_windows=32), "some text")
    assert sensitivities_key("model", rel, "some text") != sensitivities_key("other model", rel, "some text")


def _reference_grad_sq(loaded, windows, settings):
    """The direct estimate as calibrate() stores it: float32, unseen embedding rows floored."""
    from cvxq_export.calibrate import _floor_unseen_rows

    out = {}
    stats = reference_stats(loaded, windows, settings)
    for ref in loaded.weights:
        grouped = stats[ref.name][0].astype(np.float32)
        out[ref.name] = _floor_unseen_rows(grouped) if ref.kind == "embedding" else grouped
    return out


def _assert_matches_reference(loaded, settings, n_windows=3):
    windows = _windows(loaded, n_windows, settings.seq_len)
    sens = calibrate(loaded, windows, settings, progress=False)
    ref = _reference_grad_sq(loaded, windows, settings)
    for name, expected in ref.items():
        np.testing.assert_allclose(sens[name].grad_sq, expected, rtol=2e-3, atol=1e-6 * expected.max(), err_msg=name)


def _untied_llama(llama):
    """The tiny Llama with a separate output head (its own WeightRef, role "head")."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cvxq_export.model import LoadedModel, find_weights

    torch.manual_seed(2)
    config = LlamaConfig(**{**llama.config.to_dict(), "tie_word_embeddings": False})
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model, llama.tokenizer, llama.source, "llama", find_weights(model))


def test_projected_head_gives_the_direct_estimate(llama):
    """Backpropagating through the projected head (no [T, V] logits) gives the
    same statistic, sign for sign, as the full logits projected afterwards,
    for a tied embedding and for a separate head."""
    settings = CalibrationSettings(n_windows=3, seq_len=16, n_pcs=8, pca_windows=3, row_group=32)
    untied = _untied_llama(llama)
    assert any(r.role == "head" for r in untied.weights)
    for loaded in (llama, untied):
        _assert_matches_reference(loaded, settings)


def test_rescaled_logits_use_the_full_head(llama):
    """A model that changes the logits after the head (Granite divides them by
    logits_scaling) is calibrated through its real logits, and still matches."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from cvxq_export.calibrate import _plain_head
    from cvxq_export.model import LoadedModel, find_weights

    torch.manual_seed(3)
    config = GraniteConfig(vocab_size=llama.config.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=True, logits_scaling=4.0)
    model = GraniteForCausalLM(config).eval()
    granite = LoadedModel(model, llama.tokenizer, llama.source, "granite", find_weights(model))
    row = _windows(granite, 1)[0]
    assert _plain_head(llama, row, "cpu")
    assert not _plain_head(granite, row, "cpu")
    _assert_matches_reference(granite, CalibrationSettings(n_windows=3, seq_len=16, n_pcs=8, pca_windows=3))


def test_moments_folded_into_calibration_match_their_own_pass(llama, tmp_path, monkeypatch):
    """Calibration's forward passes give error feedback the same input second moments as
    the separate pass over the same first windows; weights that read one input share one
    matrix; calibrate_cached leaves them in the cache where feedback looks for them."""
    from cvxq_export import pipeline

    settings = CalibrationSettings(n_windows=4, seq_len=32, n_pcs=8, pca_windows=2, calibration="builtin")
    windows = calibration_windows(llama.tokenizer, None, 4, 32, 0).ids
    sens = calibrate(llama, windows, settings, progress=False, moment_windows=2)
    separate = pipeline.input_hessians(llama, None, settings, n_windows=2, progress=False)
    assert set(sens.input_moments) == set(separate)
    assert "model.embed_tokens.weight" in separate  # tied: the head's input
    for name, m in separate.items():
        np.testing.assert_allclose(sens.input_moments[name], m, rtol=1e-5, atol=1e-6 * np.abs(m).max())
    layer = "model.layers.0.self_attn."
    assert sens.input_moments[layer + "q_proj.weight"] is sens.input_moments[layer + "v_proj.weight"]
    assert sens.input_moments[layer + "q_proj.weight"] is not sens.input_moments[layer + "o_proj.weight"]

    monkeypatch.setenv("CVXQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(pipeline, "MOMENT_WINDOWS", 2)
    outcome = pipeline.calibrate_cached(llama, None, settings, progress=False, moments=True)
    assert outcome.moments is not None and not outcome.cached
    cached, from_cache = pipeline.input_hessians_cached(llama, None, settings, n_windows=2, progress=False)
    assert from_cache and set(cached) == set(separate)
    for name, m in separate.items():
        np.testing.assert_allclose(cached[name], m, rtol=1e-5, atol=1e-6 * np.abs(m).max())
