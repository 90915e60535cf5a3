"""Calibration at scale, on tiny random models: 16-bit weights, per-weight
gradient hooks, activation checkpointing, data-parallel ranks (gloo), accelerate
offload, and the memory check that refuses a model before loading it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cvxq_export import memory
from cvxq_export.calibrate import CalibrationSettings, Sensitivities, _GradSquares, calibrate
from cvxq_export.errors import CvxqError
from cvxq_export.model import load_model
from cvxq_export.textdata import calibration_windows

from calibration_reference import reference_stats  # noqa: E402 - tests/ helper

# 4 x 32 tokens for the output covariance: more samples than the hidden size (64), so its top directions are well separated
SETTINGS = CalibrationSettings(n_windows=4, seq_len=32, n_pcs=8, pca_windows=4, row_group=32)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def _windows(loaded, n=SETTINGS.n_windows, seq_len=SETTINGS.seq_len):
    return calibration_windows(loaded.tokenizer, None, n, seq_len, 0).ids


def _assert_same_stats(a: Sensitivities, b: Sensitivities, rtol: float, atol_frac: float = 1e-7):
    assert set(a.stats) == set(b.stats)
    for name in a.stats:
        for field in ("grad_sq", "row_grad_sq", "input_mean", "input_sq"):
            x, y = getattr(a[name], field), getattr(b[name], field)
            if x is None:
                assert y is None
                continue
            np.testing.assert_allclose(y, x, rtol=rtol, atol=atol_frac * np.abs(x).max(), err_msg=f"{name} {field}")


def test_hooks_match_the_plain_gradients(llama):
    """Squaring each gradient in its hook gives what reading every ``.grad``
    after the whole backward pass gives (the projected head vs full logits
    differ only by float32 rounding)."""
    windows = _windows(llama)
    sens = calibrate(llama, windows, SETTINGS, progress=False, checkpointing=False)
    ref = reference_stats(llama, windows, SETTINGS)
    for r in llama.weights:
        grouped, rows = ref[r.name]
        if r.kind == "embedding":  # unseen rows are floored afterwards: compare rows that got gradient
            seen = grouped.max(1) > 0
            grouped, got = grouped[seen], sens[r.name].grad_sq[seen]
        else:
            got = sens[r.name].grad_sq
            np.testing.assert_allclose(sens[r.name].row_grad_sq, rows, rtol=2e-3, atol=1e-6 * rows.max())
        np.testing.assert_allclose(got, grouped, rtol=2e-3, atol=1e-6 * grouped.max(), err_msg=r.name)


def test_one_gradient_alive_at_a_time(llama):
    """When a weight's hook runs, no other quantized weight holds a ``.grad``:
    the backward pass never keeps gradients for the whole model."""
    model = llama.model
    params = [model.get_parameter(r.name) for r in llama.weights]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    grads = _GradSquares(llama, llama.weights, 32, "cpu")
    alive: list[int] = []
    watch = [p.register_post_accumulate_grad_hook(lambda _p: alive.append(sum(q.grad is not None for q in params)))
             for p in params]
    try:
        ids = torch.as_tensor(_windows(llama, 1)[0])[None]
        model(input_ids=ids).logits.float().square().sum().backward()
    finally:
        grads.close()
        for h in watch:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    # the watcher runs after _GradSquares' hook of the same weight, which has already dropped it
    assert len(alive) == len(params) and max(alive) == 0, alive
    assert all(float(t.sum()) > 0 for t in grads.grad_sum.values())


def test_checkpointing_does_not_change_the_statistics(llama):
    windows = _windows(llama)
    plain = calibrate(llama, windows, SETTINGS, progress=False, checkpointing=False)
    ckpt = calibrate(llama, windows, SETTINGS, progress=False, checkpointing=True)
    _assert_same_stats(plain, ckpt, rtol=1e-5)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in llama.model.modules())  # switched off again
    assert not any(m.training for m in llama.model.modules())


def test_bfloat16_close_to_float32(llama, tiny_llama_dir):
    """Weights and activations in bfloat16 (statistics still float32/float64):
    the same sensitivities up to 16-bit rounding."""
    bf16 = load_model(str(tiny_llama_dir), dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    # One probe's squared gradient is a sum with cancellations that 16-bit
    # rounding perturbs; a few probes average that out.
    settings = CalibrationSettings(**{**SETTINGS.__dict__, "probes": 8})
    windows = _windows(llama)
    a = calibrate(llama, windows, settings, progress=False)
    b = calibrate(bf16, windows, settings, progress=False)
    for name in a.stats:
        assert b[name].grad_sq.dtype == np.float32
        x, y = a[name].grad_sq.ravel(), b[name].grad_sq.ravel()
        assert abs(y.sum() - x.sum()) / x.sum() < 0.1, name
        assert np.corrcoef(x, y)[0, 1] > 0.93, name
        if a[name].input_sq is not None:
            np.testing.assert_allclose(b[name].input_sq, a[name].input_sq, rtol=0.05, atol=1e-3 * a[name].input_sq.max())


def test_cache_key_follows_the_dtype():
    from cvxq_export.pipeline import sensitivities_key

    s = CalibrationSettings()
    assert sensitivities_key("m", s, "t") == sensitivities_key("m", s, "t", "float32")
    assert sensitivities_key("m", s, "t", "bfloat16") != sensitivities_key("m", s, "t", "float32")
    assert sensitivities_key("m", s, "t", "bfloat16") != sensitivities_key("m", s, "t", "float16")


def test_offloaded_model_gives_the_same_statistics(llama, tiny_llama_dir, tmp_path):
    """accelerate big-model loading: embedding on the CPU, the blocks on disk
    (memory-mapped, loaded per forward pass); same statistics as in memory."""
    offloaded = load_model(str(tiny_llama_dir), device_map="auto", max_memory={"cpu": 300_000},
                           offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(offloaded.model.hf_device_map.values())
    windows = _windows(llama)
    a = calibrate(llama, windows, SETTINGS, progress=False)
    b = calibrate(offloaded, windows, SETTINGS, progress=False)
    assert a.model_fingerprint == b.model_fingerprint
    _assert_same_stats(a, b, rtol=1e-5)


def _rank_worker(rank: int, world: int, model_dir: str, rendezvous: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        loaded = load_model(model_dir)
        sens = calibrate(loaded, _windows(loaded, 5), SETTINGS, progress=False)
        if rank == 0:
            sens.save(out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one(llama, tiny_llama_dir, tmp_path):
    """Data-parallel calibration over torch.distributed (gloo, 2 processes):
    each rank runs its share of the windows (an odd count: unequal shares),
    the sums are all-reduced; same sensitivities as one process."""
    import torch.multiprocessing as mp

    out = tmp_path / "two-ranks.safetensors"
    mp.spawn(_rank_worker, args=(2, str(tiny_llama_dir), str(tmp_path / "rendezvous"), str(out)), nprocs=2)
    two = Sensitivities.load(out)
    one = calibrate(llama, _windows(llama, 5), SETTINGS, progress=False)
    assert two.eigenvalues == pytest.approx(one.eigenvalues, rel=1e-5)
    _assert_same_stats(one, two, rtol=1e-5, atol_frac=1e-6)


# -- memory: dtype choice and refusal ------------------------------------------

def test_parameter_count_from_headers(tiny_llama_dir, llama):
    from cvxq_export.model import resolve_source

    n = memory.parameter_count(resolve_source(str(tiny_llama_dir)))
    assert n == sum(p.numel() for p in llama.model.parameters())  # tied head stored once


def test_parameter_count_from_gguf(tiny_gguf):
    from cvxq_export.model import resolve_source

    hidden, ffn, kv, layers, vocab = 64, 256, 32, 2, 49152
    per_layer = 2 * hidden + 2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * ffn
    assert memory.parameter_count(resolve_source(str(tiny_gguf))) == vocab * hidden + layers * per_layer + hidden


def _no_weight_loading(monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_too_large_model_is_refused_before_loading(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 100 << 20)
    _no_weight_loading(monkeypatch)
    with pytest.raises(CvxqError) as info:
        load_model(str(tiny_llama_dir))
    message = str(info.value).splitlines()[0]
    assert "needs about" in message and "GiB" in message and "available" in message and "bfloat16" in message
    assert "device_map" in info.value.fix


def test_auto_dtype(tiny_llama_dir, llama, monkeypatch):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_llama_dir))
    n = sum(p.numel() for p in llama.model.parameters())
    fp32 = memory.calibration_bytes(n, config, "float32")
    bf16 = memory.calibration_bytes(n, config, "bfloat16")
    assert bf16 < fp32
    between = int((bf16 + fp32) / 2 / (1 - memory.SAFETY_FRACTION))
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": between)
    assert memory.choose_dtype("auto", n, config) == "bfloat16"
    assert memory.choose_dtype("float16", n, config) == "float16"  # explicit: honoured
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 64 << 30)
    assert memory.choose_dtype("auto", n, config) == "float32"
    assert llama.model.dtype == torch.float32  # the default load of a small model stays float32
    with pytest.raises(CvxqError):
        memory.choose_dtype("int8", n, config)


def test_offload_skips_the_refusal(tiny_llama_dir, monkeypatch, tmp_path):
    """With a device_map the model may exceed memory: accelerate offloads it."""
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 100 << 20)
    loaded = load_model(str(tiny_llama_dir), device_map="auto", max_memory={"cpu": 300_000},
                        offload_folder=str(tmp_path / "offload"))
    assert loaded.model.dtype == torch.bfloat16  # float32 did not fit: 16 bits, offloaded
