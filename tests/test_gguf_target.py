"""GGUF export on a tiny random Llama: size, read-back, llama.cpp vs PyTorch."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install 'cvxq-export[llama]'")

from cvxq_export.cli import main  # noqa: E402

FAST = ["--windows", "2", "--seq-len", "64", "--n-pcs", "8", "-q"]


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory):
    from cvxq_export.textdata import read_text

    p = tmp_path_factory.mktemp("txt") / "eval.txt"
    p.write_text(read_text(None)[0])
    return str(p)


def export_gguf(loaded, sens, budget, out, *, eval_windows=None, bias_correction=False):
    """Plan (no speed limit), write, read back and, with ``eval_windows``, check in llama.cpp;
    the format's results and its evaluation in one dict."""
    from cvxq_export.api import export_one
    from cvxq_export.formats.base import FitOptions

    w = export_one("gguf", loaded, sens, budget, out, eval_windows=eval_windows,
                   options=FitOptions(progress=False, decode_speed=0, bias_correction=bias_correction))
    return {**w.info, **w.evaluation}


@pytest.mark.parametrize("budget_mb", [4.0, 5.5, 8.0])
def test_gguf_export_budgets(capsys, tmp_path, tiny_gguf, eval_text, budget_mb):
    out = tmp_path / "g"
    code = main(["fit", str(tiny_gguf), "--format", "gguf", "--budget", f"{budget_mb}MB", "-o", str(out),
                 "--eval-text", eval_text, "--eval-windows", "2", "--json", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    outcome = json.loads(captured.out)["formats"]["gguf"]
    info = outcome["info"]
    size = os.path.getsize(out / "model.gguf")
    assert size == info["file_bytes"] <= budget_mb * 1e6
    assert info["readback_tensors_bit_exact"] == 15  # 7 linears x 2 layers + the tied embedding
    assert outcome["evaluation"]["eval"]["within_0.5_percent"], outcome["evaluation"]
    assert not list(out.glob(".*.tmp"))
    # the planner's speed note reaches the report a person reads (and stderr), not only plan.json
    assert "- gguf plan: llama.cpp speed: modeled" in (out / "report.md").read_text()
    assert "gguf plan: llama.cpp speed: modeled" in captured.err


def test_llama_cpp_logits_match_pytorch(tmp_path, tiny_gguf, eval_text):
    import torch
    from cvxq_export.formats.gguf.llama_eval import open_llama

    from cvxq_export.calibrate import CalibrationSettings
    from cvxq_export.model import load_model
    from cvxq_export.pipeline import calibrate_cached

    loaded = load_model(str(tiny_gguf))
    sens = calibrate_cached(loaded, None, CalibrationSettings(n_windows=2, seq_len=64, n_pcs=8)).sens
    info = export_gguf(loaded, sens, 5_000_000, tmp_path)
    ids = loaded.tokenizer("The river delta forms where a slow river meets a calm sea.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = loaded.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = open_llama(info["path"], n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.9


def test_bias_correction_loads_in_llama_cpp(tmp_path, tiny_gguf, eval_text):
    """--bias-correction: llama.cpp loads the added bias tensors, its logits match PyTorch's
    with them, each corrected layer keeps its mean output, and the file stays in budget."""
    import gguf
    import torch
    from cvxq_export.formats.gguf.llama_eval import open_llama

    from cvxq_export.calibrate import CalibrationSettings
    from cvxq_export.model import load_model
    from cvxq_export.pipeline import calibrate_cached
    from cvxq_export.plan import Plan
    from cvxq_export.textdata import evaluation_windows

    loaded = load_model(str(tiny_gguf))
    original = {r.name: loaded.weight_tensor(r).detach().clone() for r in loaded.weights}
    sens = calibrate_cached(loaded, None, CalibrationSettings(n_windows=2, seq_len=64, n_pcs=8)).sens
    windows = evaluation_windows(loaded.tokenizer, eval_text, 2, 64).ids
    budget = 4_000_000
    info = export_gguf(loaded, sens, budget, tmp_path, bias_correction=True, eval_windows=windows)
    plan = Plan.load(tmp_path / "plan.json")
    lossy = [t for t in plan.tensors if t.distortion > 0 and "embed" not in t.name]
    names = {t.name for t in gguf.GGUFReader(info["path"]).tensors}
    biases = sorted(n for n in names if n.endswith(".bias"))
    assert len(biases) == 14 and info["readback_tensors_bit_exact"] == 15  # every linear of the 2 layers is lossy here
    assert len(lossy) == 14
    assert str(len(biases)) in info["bias_correction"]
    assert os.path.getsize(info["path"]) <= budget
    assert info["eval"]["within_0.5_percent"], info["eval"]
    # the PyTorch model now carries the biases: its logits are the file's
    ids = loaded.tokenizer("The river delta forms where a slow river meets a calm sea.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = loaded.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = open_llama(info["path"], n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()
    # b' = -(W_hat - W) x_mean: the layer's mean output over the calibration inputs is unchanged
    for ref_w in loaded.weights:
        if ref_w.kind != "linear":
            continue
        module = loaded.model.get_submodule(ref_w.module)
        mean = torch.from_numpy(sens[ref_w.name].input_mean).double()
        before = original[ref_w.name].double() @ mean
        after = module.weight.double() @ mean + module.bias.double()
        assert torch.allclose(after, before, atol=1e-4 * float(before.abs().max()) + 1e-6), ref_w.name


def test_gguf_infeasible_budget(capsys, tmp_path, tiny_gguf):
    code = main(["fit", str(tiny_gguf), "--format", "gguf", "--budget", "100kB", "-o", str(tmp_path / "x"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "smallest achievable size" in err and "choose a budget between" in err


def test_eval_any_gguf(capsys, tiny_gguf, eval_text):
    """`cvxq-export eval FILE.gguf` compares llama.cpp with PyTorch and generates text."""
    code = main(["eval", str(tiny_gguf), "--eval-text", eval_text, "--eval-windows", "2", "--seq-len", "64", "--json", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["llama_cpp"]["within_0.5_percent"], result
    assert result["llama_cpp"]["decode_tokens_per_s"] > 0


def test_gguf_from_hf_directory(tmp_path, tiny_llama_bpe_dir, eval_text):
    """An HF directory (no GGUF) becomes a GGUF llama.cpp loads: metadata from
    config.json, tokenizer from tokenizer.json (same token ids as HF in llama.cpp),
    and logits that match PyTorch on the same dequantized weights."""
    import gguf
    import torch
    from cvxq_export.formats.gguf.llama_eval import open_llama

    from cvxq_export.calibrate import CalibrationSettings
    from cvxq_export.model import load_model
    from cvxq_export.pipeline import calibrate_cached

    loaded = load_model(str(tiny_llama_bpe_dir))
    sens = calibrate_cached(loaded, None, CalibrationSettings(n_windows=2, seq_len=64, n_pcs=8)).sens
    info = export_gguf(loaded, sens, 250_000, tmp_path)
    assert info["file_bytes"] <= 250_000
    assert any("tokenizes the test text exactly like Hugging Face" in n for n in info["notes"]), info["notes"]
    reader = gguf.GGUFReader(info["path"])
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    text = "The river delta forms where a slow river meets a calm sea, 42 times."
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    llm = open_llama(info["path"], n_ctx=64, logits_all=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False) == ids
    with torch.no_grad():
        ref = loaded.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()


def test_bias_correction_keeps_source_biases(tmp_path, tiny_llama_bpe_dir):
    """A source with attention biases: --bias-correction corrects them in place (Q/K in
    llama.cpp's row order) and adds biases only where the source had none."""
    import shutil

    import gguf
    import torch
    from cvxq_export.formats.gguf.llama_eval import open_llama
    from transformers import LlamaConfig, LlamaForCausalLM

    from cvxq_export.calibrate import CalibrationSettings
    from cvxq_export.model import load_model
    from cvxq_export.pipeline import calibrate_cached

    src = tmp_path / "src"
    shutil.copytree(tiny_llama_bpe_dir, src)
    config = LlamaConfig.from_pretrained(src)
    config.attention_bias = True
    torch.manual_seed(3)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(src)
    loaded = load_model(str(src))
    before = {}
    for ref in loaded.weights:
        module = loaded.model.get_submodule(ref.module)
        before[ref.name] = (loaded.weight_tensor(ref).detach().double().clone(),
                            None if getattr(module, "bias", None) is None else module.bias.detach().double().clone())
    sens = calibrate_cached(loaded, None, CalibrationSettings(n_windows=2, seq_len=64, n_pcs=8)).sens
    info = export_gguf(loaded, sens, 250_000, tmp_path / "out", bias_correction=True)
    assert info["file_bytes"] <= 250_000
    names = {t.name for t in gguf.GGUFReader(info["path"]).tensors}
    for i in range(2):
        for proj in ("attn_q", "attn_k", "attn_v", "attn_output"):
            assert f"blk.{i}.{proj}.bias" in names
    for ref in loaded.weights:
        if ref.kind != "linear":
            continue
        w, b = before[ref.name]
        module = loaded.model.get_submodule(ref.module)
        mean = torch.from_numpy(sens[ref.name].input_mean).double()
        want = w @ mean + (0 if b is None else b)
        got = module.weight.double() @ mean + module.bias.double()
        assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()) + 1e-6), ref.name
    ids = loaded.tokenizer("The river delta forms where a slow river meets a calm sea.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref_logits = loaded.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = open_llama(info["path"], n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    assert np.abs(got - ref_logits).max() < 2e-2 * np.abs(ref_logits).max()


def test_gguf_hf_unsupported_tokenizer(tmp_path, tiny_llama_dir):
    """A WordLevel tokenizer has no llama.cpp equivalent: a clear error, no file."""
    from cvxq_export.errors import CvxqError
    from cvxq_export.formats.gguf.target import fixed_bytes
    from cvxq_export.model import load_model

    loaded = load_model(str(tiny_llama_dir))
    with pytest.raises(CvxqError, match="byte-level BPE"):
        fixed_bytes(loaded)


@pytest.mark.parametrize("type_name", ["Q2_0", "MXFP4", "IQ4_NL"])
def test_single_type_file_runs_in_llama_cpp(tmp_path, tiny_gguf, type_name):
    """Every tensor in one type (Q2_0 is newer than gguf-py's enum): the file reads
    back bit-exact through llama.cpp's dequantizer, and llama.cpp's logits match
    PyTorch running the same dequantized weights."""
    import torch
    from cvxq_export.formats.gguf.llama_eval import open_llama

    from cvxq_export.formats.gguf.target import read_back_check, tensor_inputs, write_float_gguf
    from cvxq_export.model import load_model

    loaded = load_model(str(tiny_gguf))
    result = write_float_gguf(loaded, tmp_path / "m.gguf", type_name=type_name, progress=False)
    counts = read_back_check(result, tensor_inputs(loaded, None, loaded.weights))
    assert counts["llama_cpp_dequantizer"] == len(loaded.weights)
    with torch.no_grad():
        for ref in loaded.weights:
            loaded.model.get_parameter(ref.name).copy_(torch.from_numpy(result.dequantized[ref.name]))
    ids = loaded.tokenizer("The river delta forms where a slow river meets a calm sea.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref_logits = loaded.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = open_llama(result.path, n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    assert np.abs(got - ref_logits).max() < 3e-2 * np.abs(ref_logits).max()


def test_error_feedback_lowers_layer_output_error(tmp_path, tiny_gguf):
    """GPTQ-style feedback: the file stays valid (bit-exact read-back) and every
    layer's output error E||(W - Q) x||^2 on calibration inputs goes down in total."""
    from cvxq_export.calibrate import CalibrationSettings
    import gguf

    from cvxq_export.formats.gguf.target import build_menu, plan_gguf, read_back_check, tensor_inputs, write_gguf
    from cvxq_export.model import load_model
    from cvxq_export.pipeline import calibrate_cached, input_hessians

    loaded = load_model(str(tiny_gguf))
    settings = CalibrationSettings(n_windows=4, seq_len=64, n_pcs=8)
    sens = calibrate_cached(loaded, None, settings).sens
    hessians = input_hessians(loaded, None, settings, progress=False)
    gmenu = build_menu(tensor_inputs(loaded, sens, loaded.weights), progress=False)
    plan, _ = plan_gguf(loaded, sens, 4_000_000, gmenu=gmenu, progress=False)
    plain = write_gguf(loaded, plan, gmenu.inputs, tmp_path / "plain.gguf", progress=False)
    fed = write_gguf(loaded, plan, gmenu.inputs, tmp_path / "fed.gguf", progress=False, hessians=hessians)
    assert abs(fed.size - plain.size) <= 32 and max(fed.size, plain.size) <= 4_000_000  # only the provenance string differs
    assert read_back_check(fed, gmenu.inputs)["llama_cpp_dequantizer"] == 15
    field = gguf.GGUFReader(str(fed.path)).fields["cvxq.error_feedback"]  # provenance says how it was made
    assert bytes(field.parts[field.data[0]]).decode() == "gptq-blockwise"

    def output_error(result):
        total = 0.0
        for ref in loaded.weights:
            w = loaded.weight_tensor(ref).detach().float().numpy()  # [rows, cols]
            d = w - result.dequantized[ref.name]
            total += float(np.einsum("ij,jk,ik->", d, hessians[ref.name], d))
        return total

    assert output_error(fed) < 0.95 * output_error(plain)


def test_speed_limit_keeps_the_modeled_llama_cpp_time(tiny_gguf):
    """--decode-speed for GGUF: the plan's modeled time per token stays within 1/R of the
    fastest type mix of the same size, under the same byte budget."""
    import re

    from cvxq_export.calibrate import CalibrationSettings
    from cvxq_export.formats.gguf import speed as gs
    from cvxq_export.formats.gguf.target import build_menu, plan_gguf, size_range, tensor_inputs
    from cvxq_export.model import load_model
    from cvxq_export.pipeline import calibrate_cached

    loaded = load_model(str(tiny_gguf))
    sens = calibrate_cached(loaded, None, CalibrationSettings(n_windows=2, seq_len=64, n_pcs=8), progress=False).sens
    gmenu = build_menu(tensor_inputs(loaded, sens, loaded.weights), progress=False)
    names = [t.gguf_name for t in gmenu.inputs]
    weights = [t.ref.rows * t.ref.cols for t in gmenu.inputs]

    def modeled(plan) -> float:
        return sum(gs.modeled_us(names, weights, [t.option for t in plan.tensors]).values())

    budget = 4_500_000
    free, _ = plan_gguf(loaded, sens, budget, gmenu=gmenu, progress=False)
    assert not free.notes  # no limit asked: no speed note
    for speed in (0.9, 1.0):
        timed, _ = plan_gguf(loaded, sens, budget, gmenu=gmenu, progress=False, speed=speed)
        note = next(n for n in timed.notes if n.startswith("llama.cpp speed: modeled"))
        limit = float(re.search(r"limit (\d+) us", note).group(1))
        fastest = float(re.search(r"the fastest file of this size (\d+) us", note).group(1))
        assert limit == pytest.approx(fastest / speed, abs=1.0)
        assert modeled(timed) <= limit + 1.0
        assert timed.total_bytes <= budget
        assert timed.distortion >= free.distortion  # a limit can only cost accuracy
        # the note says the limit leaves bytes unspent only when it does (the free plan spends them)
        if "binds before the byte budget" in note:
            assert timed.total_bytes < 0.99 * budget, note
            assert free.total_bytes > timed.total_bytes + 0.01 * budget and free.distortion < timed.distortion, note
    assert modeled(timed) <= modeled(free) + 1e-6

    # At the largest file size the fastest mix is far smaller: the limit binds first, and the plan says so
    big = size_range(loaded)[1]
    capped, _ = plan_gguf(loaded, sens, big, gmenu=gmenu, progress=False, speed=1.0)
    assert capped.total_bytes < 0.99 * big
    unspent = re.search(r"the file is ([\d,]+) of ([\d,]+) bytes", " ".join(capped.notes))
    assert unspent, capped.notes
    assert int(unspent.group(1).replace(",", "")) == capped.total_bytes
    # a limit that never binds gives the unlimited plan (this once returned the fastest plan: with the
    # embedding pinned the tiny model's largest file is under the budget, and every pinned type was skipped)
    loose, _ = plan_gguf(loaded, sens, budget, gmenu=gmenu, progress=False, speed=0.01)
    assert loose.distortion == pytest.approx(free.distortion, rel=1e-9)
    assert not any("binds before the byte budget" in n for n in loose.notes), loose.notes
