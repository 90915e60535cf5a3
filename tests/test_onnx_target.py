"""ONNX export on a tiny random Llama, checked in ONNX Runtime itself: fusion into
MatMulNBits, logits and greedy generation vs PyTorch, perplexity, exact file budget."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install 'cvxq-export[onnx]'")
pytest.importorskip("onnx", reason="onnx not installed: pip install 'cvxq-export[onnx]'")
pytest.importorskip("ml_dtypes", reason="ml_dtypes not installed: pip install 'cvxq-export[onnx]'")

from cvxq_export.cli import main  # noqa: E402
from cvxq_export.formats.onnx import target as ot  # noqa: E402
from cvxq_export.formats.onnx.qdq import OPTION_INDEX, OPTIONS, QdqOption  # noqa: E402

FAST = ["--windows", "2", "--seq-len", "64", "--n-pcs", "8", "-q"]
COL_GROUP = 32  # the tiny model's 64/128-column matrices get 2/4 column groups: room for mixed depths


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory):
    from cvxq_export.textdata import read_text

    p = tmp_path_factory.mktemp("txt") / "eval.txt"
    p.write_text(read_text(None)[0])
    return str(p)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tmp_path_factory):
    """(model dir, sensitivities, evaluation windows), calibrated once into a private cache."""
    from cvxq_export.calibrate import CalibrationSettings
    from cvxq_export.model import load_model
    from cvxq_export.pipeline import calibrate_cached
    from cvxq_export.textdata import evaluation_windows

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CVXQ_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        loaded = load_model(str(tiny_llama_dir))
        sens = calibrate_cached(loaded, None, CalibrationSettings(n_windows=2, seq_len=64, n_pcs=8), progress=False).sens
    windows = evaluation_windows(loaded.tokenizer, None, 3, 64).ids
    return tiny_llama_dir, sens, windows


def _load(tiny):
    from cvxq_export.model import load_model

    return load_model(str(tiny[0]))


def _check_verified(info: dict, budget: int | None = None) -> None:
    v = info["verify"]
    assert v["checker"] == "passed"
    assert v["fusion"]["ok"], v["fusion"]  # every DQ -> MatMul became MatMulNBits, the embedding GBQ
    assert v["fusion"]["unfused_dequantize"] == 0
    assert v["logits"]["relative"] < 2e-2, v["logits"]  # int8 activations (accuracy level 4) vs fp32 PyTorch
    assert v["logits"]["top1_agreement"] >= 0.9, v["logits"]
    assert v["greedy_identical"], v["generation"]
    if "eval" in v:
        assert v["eval"]["within_0.5_percent"], v["eval"]
    if budget is not None:
        assert os.path.getsize(info["path"]) == info["file_bytes"] <= budget


def test_size_range_and_fixed_bound(tiny):
    loaded = _load(tiny)
    lo, hi = ot.size_range(loaded, col_group=COL_GROUP)
    assert 0 < lo < hi
    # the 8-bit-everywhere file is about one byte per weight plus the graph
    assert hi > sum(r.numel for r in loaded.weights)


@pytest.mark.parametrize("fraction", [0.15, 0.5, 0.9])
def test_export_budgets(tiny, tmp_path, fraction):
    """Several budgets across the achievable range: written, fused, matching, within budget."""
    loaded = _load(tiny)
    lo, hi = ot.size_range(loaded, col_group=COL_GROUP)
    budget = int(lo + fraction * (hi - lo))
    info = ot.export_onnx(loaded, tiny[1], budget, tmp_path, eval_windows=tiny[2], progress=False, col_group=COL_GROUP)
    _check_verified(info, budget)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["format"] == "onnx" and plan["total_bytes"] <= budget
    assert info["file_bytes"] <= plan["total_bytes"]  # the plan's graph bound is an upper bound
    # every matrix has at most two fused MatMuls (the split charge)
    for t in plan["tensors"]:
        from cvxq_export.plan import TensorPlan

        used = {OPTIONS[j] for j in TensorPlan.from_dict(t).unit_map}
        assert len(used) <= ot.MAX_OPTIONS + 1  # + zero when the allocator needed it to fit
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".onnx-staging-*"))
    assert {"model.onnx", "tokenizer.json", "generate.py", ot.CONFIG_FILE} <= {p.name for p in tmp_path.iterdir()}


def _mixed_plan(loaded, sens, embedding_option: str):
    """A plan that exercises everything the writer can emit: 2/4/8 bits, sym/asym/offset,
    blocks 16/32, dropped column groups, three depths in one matrix, down_proj's folded
    permutation, and the chosen embedding option."""
    plan, _ = ot.plan_onnx(loaded, sens, ot.size_range(loaded, col_group=COL_GROUP)[1], col_group=COL_GROUP,
                           progress=False)
    by_name = {o.name: OPTION_INDEX[o] for o in OPTIONS}
    cycle = ["uint4-b32-offset", "int8-b32-sym", "int2-b16-sym", "zero", "uint4-b16-asym", "uint2-b32-offset"]
    for i, t in enumerate(plan.tensors):
        if t.name.endswith("embed_tokens.weight"):
            t.unit_map = np.array([by_name[embedding_option]], np.uint8)
            continue
        n = len(t.unit_map)
        t.unit_map = np.array([by_name[cycle[(i + u) % len(cycle)]] for u in range(n)], np.uint8)
    return plan


@pytest.mark.parametrize("embedding_option", ["uint4-b32-offset", "int8-b32-sym", "uint4-b16-asym", "int4-b64-sym"])
def test_mixed_bit_matrices_fuse_and_match(tiny, tmp_path, embedding_option):
    loaded = _load(tiny)
    sens = tiny[1]
    plan = _mixed_plan(loaded, sens, embedding_option)
    weights = ot.quantize_for_onnx(loaded, sens, plan, progress=False)
    split = [lin for lin in weights.linears.values() if len(lin.splits) > 1]
    assert split, "the plan should split matrices along K"
    assert any(len(lin.splits) == 3 for lin in weights.linears.values())  # three depths in one matrix
    assert any(lin.out_perm is not None for lin in weights.linears.values())  # down's permutation folded
    art = ot.write_onnx(loaded, weights, tmp_path / "model.onnx")
    assert art.opset == 25  # int2 is in the plan
    ot.set_reference_weights(loaded, weights)
    v = ot.verify_onnx(loaded, art, eval_windows=tiny[2], progress=False)
    _check_verified({"verify": v, "path": str(art.path), "file_bytes": art.size})
    assert set(v["fusion"]["bits"]) == {"2", "4", "8"}


def test_projections_sharing_an_input_fuse_into_one_matmul(tiny, tmp_path):
    """q/k/v and gate/up with the same options per column group become one MatMulNBits
    per split (outputs concatenated, then Split), offsets and dropped groups included;
    the fp32 baseline export fuses only when asked. Still matches PyTorch."""
    import onnx

    loaded = _load(tiny)
    plan = _mixed_plan(loaded, tiny[1], "uint4-b32-asym")
    by_name = {o.name: OPTION_INDEX[o] for o in OPTIONS}
    cycle = ["uint4-b32-offset", "zero", "int8-b32-sym", "uint4-b16-offset"]
    for t in plan.tensors:  # the option depends on the column group only: q, k, v (and gate, up) agree
        if not t.name.endswith("embed_tokens.weight"):
            t.unit_map = np.array([by_name[cycle[u % len(cycle)]] for u in range(len(t.unit_map))], np.uint8)
    weights = ot.quantize_for_onnx(loaded, tiny[1], plan, progress=False)
    art = ot.write_onnx(loaded, weights, tmp_path / "model.onnx")
    names = {t.name for t in onnx.load(str(art.path)).graph.initializer}
    layers = loaded.config.num_hidden_layers
    for fused in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
        assert sum(n.startswith("model.layers.") and f"{fused}." in n and n.endswith(".qweight") for n in names) >= layers
    assert not any(".self_attn.k_proj." in n for n in names)
    ot.set_reference_weights(loaded, weights)
    v = ot.verify_onnx(loaded, art, eval_windows=tiny[2], progress=False)
    _check_verified({"verify": v, "path": str(art.path), "file_bytes": art.size})
    assert v["fusion"]["matmulnbits"] == art.n_quantized_matmuls
    counts = {}
    for fuse in (False, True):
        path = ot.write_float_onnx(_load(tiny), tmp_path / f"fp32_{fuse}.onnx", fuse=fuse)
        counts[fuse] = sum(n.op_type == "MatMul" for n in onnx.load(str(path)).graph.node)
    assert counts[False] - counts[True] == 3 * layers  # q, k, v -> 1 and gate, up -> 1 per layer


def test_reference_weights_equal_the_files_codes(tiny, tmp_path):
    """The weights the checks compare against are exactly what the file's codes decode to."""
    import onnx
    from onnx import numpy_helper

    loaded = _load(tiny)
    plan = _mixed_plan(loaded, tiny[1], "uint4-b32-offset")
    weights = ot.quantize_for_onnx(loaded, tiny[1], plan, progress=False)
    art = ot.write_onnx(loaded, weights, tmp_path / "model.onnx")
    inits = {t.name: t for t in onnx.load(str(art.path)).graph.initializer}
    name = "model.layers.0.self_attn.q_proj.weight"
    lin = weights.linears[name]
    deq = np.zeros_like(lin.dequant)
    for s in lin.splits:
        base = f"model.layers.0.self_attn.q_proj.{s.option.name}" if len(lin.splits) > 1 else "model.layers.0.self_attn.q_proj"
        q = numpy_helper.to_array(inits[f"{base}.qweight"]).astype(np.float32)  # [K_d, N], unpacked by onnx
        sc = numpy_helper.to_array(inits[f"{base}.scales"]).astype(np.float32)  # [K_d/b, N]
        b = s.option.block
        z = numpy_helper.to_array(inits[f"{base}.zero_points"]).astype(np.float32) if s.zero is not None else 0.0
        w = (q - np.repeat(z, b, 0) if s.zero is not None else q) * np.repeat(sc, b, 0)
        if s.offset is not None:
            w = w + np.repeat(numpy_helper.to_array(inits[f"{base}.offsets"]).astype(np.float32), b, 0)
        np.testing.assert_allclose(w.T, lin.dequant[:, s.columns], rtol=0, atol=1e-6)
        deq[:, s.columns] = w.T
    np.testing.assert_array_equal(deq != 0, lin.dequant != 0)  # dropped groups are exactly zero


def test_error_feedback_lowers_output_error_and_still_matches(tiny, tmp_path):
    """GPTQ-style feedback on a plan with every kind, dropped groups and splits: same
    bytes, still fused and matching in ORT, and the layers' output error
    E||(W - Q) x||^2 on the calibration inputs goes down in total."""
    from cvxq_export.calibrate import CalibrationSettings
    from cvxq_export.pipeline import input_hessians

    loaded = _load(tiny)
    sens = tiny[1]
    hessians = input_hessians(loaded, None, CalibrationSettings(n_windows=2, seq_len=64, n_pcs=8), progress=False)
    plan = _mixed_plan(loaded, sens, "uint4-b32-offset")
    plain = ot.quantize_for_onnx(loaded, sens, plan, progress=False)
    fed = ot.quantize_for_onnx(loaded, sens, plan, progress=False, hessians=hessians)

    def output_error(weights) -> float:
        total = 0.0
        for name, lin in weights.linears.items():
            ref = lin.ref
            d = loaded.weight_tensor(ref).detach().float().numpy() - lin.dequant  # [N, K]
            total += float(np.einsum("ij,jk,ik->", d, hessians[name], d))
        return total

    assert output_error(fed) < 0.9 * output_error(plain)
    a = ot.write_onnx(loaded, plain, tmp_path / "plain.onnx")
    b = ot.write_onnx(loaded, fed, tmp_path / "fed.onnx")
    assert abs(a.size - b.size) <= 64  # only varint lengths of fp16 payloads can differ
    ot.set_reference_weights(loaded, fed)
    v = ot.verify_onnx(loaded, b, eval_windows=tiny[2], progress=False)
    _check_verified({"verify": v, "path": str(b.path), "file_bytes": b.size})


def test_tied_embedding_stored_once(tiny, tmp_path):
    import onnx

    loaded = _load(tiny)
    lo, hi = ot.size_range(loaded, col_group=COL_GROUP)
    info = ot.export_onnx(loaded, tiny[1], (lo + hi) // 2, tmp_path, progress=False, col_group=COL_GROUP, verify=False)
    v, k = loaded.config.vocab_size, loaded.config.hidden_size
    shapes = [list(t.dims) for t in onnx.load(info["path"]).graph.initializer]
    assert shapes.count([v, k]) == 1 and [k, v] not in shapes  # the head reads the embedding's codes through Transposes


def test_infeasible_budget_names_the_range(tiny):
    from cvxq_export.errors import InfeasibleBudget

    loaded = _load(tiny)
    lo, hi = ot.size_range(loaded, col_group=COL_GROUP)
    with pytest.raises(InfeasibleBudget) as exc:
        ot.plan_onnx(loaded, tiny[1], lo - 1, col_group=COL_GROUP, progress=False)
    assert exc.value.min_bytes == lo and exc.value.max_bytes == hi


def test_cli_fit_onnx_generate_and_eval(capsys, tmp_path, tiny_llama_dir, eval_text):
    out = tmp_path / "o"
    code = main(["fit", str(tiny_llama_dir), "--format", "onnx", "--budget", "150kB", "-o", str(out),
                 "--eval-text", eval_text, "--eval-windows", "2", "--no-analysis", "--json", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    made = json.loads(captured.out)["formats"]["onnx"]
    info = {**made["info"], "verify": {**made["info"]["verify"], "eval": made["evaluation"]["eval"]}}
    _check_verified(info, 150_000)
    # the example script runs on its own (onnxruntime + tokenizers only)
    run = subprocess.run([sys.executable, str(out / "generate.py"), "the river", "--max-new-tokens", "5"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("the river")
    code = main(["eval", str(out / "model.onnx"), "--eval-text", eval_text, "--eval-windows", "2", "--seq-len", "64",
                 "--json", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    res = json.loads(captured.out)
    assert abs(res["eval"]["perplexity"] - info["verify"]["eval"]["onnxruntime_perplexity"]) < 1e-3 * res["eval"]["perplexity"]


def test_cli_infeasible_budget(capsys, tmp_path, tiny_llama_dir):
    code = main(["fit", str(tiny_llama_dir), "--format", "onnx", "--budget", "10kB", "-o", str(tmp_path / "x"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "smallest achievable size" in err and "choose a budget between" in err


def test_cli_onnx_refuses_blocks_scope(capsys, tmp_path, tiny_llama_dir):
    code = main(["fit", str(tiny_llama_dir), "--format", "onnx", "--budget", "150kB", "--scope", "blocks",
                 "-o", str(tmp_path / "x"), *FAST])
    assert code == 2 and "--scope blocks" in capsys.readouterr().err


def test_unsupported_architecture(tiny_opt_dir):
    from cvxq_export.errors import CvxqError
    from cvxq_export.model import load_model

    with pytest.raises(CvxqError, match="Llama-family"):
        ot.check_supported(load_model(str(tiny_opt_dir)))


def test_option_table_is_stable():
    """plan.json stores indices into OPTIONS: the table must not be reordered."""
    assert OPTIONS[0] == QdqOption(0, 0, "zero")
    assert OPTIONS[1] == QdqOption(2, 16, "sym") and len(OPTIONS) == 37
    assert OPTIONS[OPTION_INDEX[QdqOption(4, 32, "offset")]].name == "uint4-b32-offset"


@pytest.mark.parametrize("content", [b"", b"\x08\x07\x12\x03abc", bytes(range(256)) * 4])
def test_a_damaged_onnx_file_is_a_clear_error(tmp_path, content):
    from cvxq_export.errors import CvxqError
    from cvxq_export.formats.onnx.target import OrtDecoder

    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(CvxqError, match="ONNX Runtime cannot load|not a decoder"):
        OrtDecoder(path)
