"""report.md / report.html / report.json: self-contained HTML, plot data in JSON, the size-vs-distortion
curve, and the analysis at the end of ``fit`` on tiny models."""
from __future__ import annotations

import base64
import json
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from cvxq_export.errors import CvxqError

FAST = ["--windows", "3", "--seq-len", "32", "--n-pcs", "8", "-q"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _Collector(HTMLParser):
    """Every tag with its attributes, and whether the document parsed to the end."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def check_png(data: bytes) -> tuple[int, int]:
    """A valid PNG: signature, IHDR first with a correct CRC, IEND last; returns (width, height)."""
    assert data[:8] == PNG_SIGNATURE
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append((kind, body))
        pos += 12 + n
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND" and pos == len(data)
    w, h = struct.unpack(">II", chunks[0][1][:8])
    assert w > 50 and h > 50
    return w, h


def check_self_contained_html(path: Path) -> _Collector:
    """Parses; every <img> is a data: URI holding a valid PNG; nothing refers outside the file."""
    text = path.read_text("utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    doc = _Collector()
    doc.feed(text)
    doc.close()
    imgs = [a for t, a in doc.tags if t == "img"]
    assert imgs, "no images in the report"
    for a in imgs:
        src = a.get("src", "")
        assert src.startswith("data:image/png;base64,"), src[:60]
        check_png(base64.b64decode(src.split(",", 1)[1], validate=True))
        assert a.get("alt")
    for tag, a in doc.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for key in ("src", "href"):
            if key in a:
                assert a[key].startswith("data:") or a[key].startswith("#"), (tag, a[key][:60])
    assert "url(" not in text  # no CSS fetches either
    return doc


# --------------------------------------------------------------------------- Markdown -> HTML


def test_markdown_to_html_subset_and_escaping():
    from cvxq_export.report import markdown_to_html

    md = ("# Title <x>\n\nSome **bold** and `a<b>` text\ncontinued.\n\n- item `one`\n- item **two**\n\n"
          "| a | b |\n|---|---:|\n| 1 | 2 & 3 |\n\n![plot](p.png)\n\n![missing](gone.png)\n")
    out = markdown_to_html(md, {"p.png": PNG_SIGNATURE + b"fake"}, "t")
    assert "<h1>Title &lt;x&gt;</h1>" in out
    assert "<p>Some <strong>bold</strong> and <code>a&lt;b&gt;</code> text continued.</p>" in out
    assert "<ul><li>item <code>one</code></li><li>item <strong>two</strong></li></ul>" in out
    assert '<th>a</th><th class="r">b</th>' in out and '<td class="r">2 &amp; 3</td>' in out
    assert 'alt="plot" src="data:image/png;base64,' + base64.b64encode(PNG_SIGNATURE + b"fake").decode() in out
    assert "gone.png" not in out  # an image we do not have is left out, never linked


# --------------------------------------------------------------------------- size vs distortion


def _random_menu(n_units=300, seed=0):
    from cvxq_export.allocate import Menu

    rng = np.random.default_rng(seed)
    bits = np.arange(9)
    cost = (bits[None, :] * 64 + 32 * (bits[None, :] > 0)).repeat(n_units, 0).astype(np.int64)
    scale = rng.lognormal(0, 1.5, n_units)[:, None]
    dist = scale * 4.0 ** (-bits[None, :]) * (1 + 0.05 * rng.random((n_units, 9)))
    return Menu(cost, dist, unit="bits")


def test_rd_curve_is_the_allocators_frontier():
    from cvxq_export.allocate import allocate
    from cvxq_export.analysis.rd_curve import rd_curve

    menu = _random_menu()
    fixed = 8 * 1000
    lo, hi = int(menu.cost.min(1).sum()) + fixed, int(menu.cost.max(1).sum()) + fixed
    budget_bits = (lo + hi) // 2
    alloc = allocate(menu, budget_bits, fixed, unit="bits")
    curve = rd_curve(menu, fixed // 8, budget_bits // 8, chosen=alloc.choice)
    x, y = np.array(curve.bytes), np.array(curve.distortion)
    assert np.all(np.diff(x) >= 0) and np.all(np.diff(y) <= 1e-12)
    assert x[0] == pytest.approx(lo / 8, abs=1) and x[-1] == pytest.approx(hi / 8, abs=1)
    assert curve.chosen_distortion == pytest.approx(alloc.distortion)
    # the hull (evaluated exactly at these budgets) is a lower bound, and the allocator sits on it up to
    # about one step; between the plotted points the curve is interpolated, within a fraction of a percent
    fracs = (0.1, 0.3, 0.5, 0.8, 0.95)
    budgets = [int(lo + f * (hi - lo)) for f in fracs]
    exact = rd_curve(menu, fixed // 8, 1, budget_factors=[b / 8 for b in budgets])
    assert len(exact.at_budgets) == len(budgets)
    for b, point in zip(budgets, exact.at_budgets):
        a = allocate(menu, b, fixed, unit="bits")
        assert a.distortion >= point["distortion"] * (1 - 1e-9)
        assert a.distortion <= point["distortion"] * 1.02 + 1e-9, (b, a.distortion, point)
        assert curve.distortion_at(b / 8) == pytest.approx(point["distortion"], rel=0.01)
    assert [p["factor"] for p in curve.at_budgets][:4] == [0.7, 0.8, 0.9, 1.0]


# --------------------------------------------------------------------------- write_report on synthetic inputs


def _plan():
    from cvxq_export.native import encode_map
    from cvxq_export.plan import Plan, TensorPlan

    rng = np.random.default_rng(3)
    tensors = []
    for layer in range(3):
        for kind in ("self_attn.q_proj", "mlp.up_proj"):
            bits = rng.integers(0, 9, 16)
            tensors.append(TensorPlan(f"model.layers.{layer}.{kind}.weight", 64, 64, "native", 16, 16,
                                      encode_map(bits, np.zeros(16, np.uint8)), int(64 * 64 * bits.mean() / 8) + 96, 1.0))
    tensors.append(TensorPlan("model.embed_tokens.weight", 100, 64, "native", 4, 16,
                              encode_map(np.full(100, 4), np.zeros(100, np.uint8)), 3300, 2.0))
    total = sum(t.bytes for t in tensors) + 5000
    return Plan("packed", 60_000, total, 5000, 1e-3, 9.0, 20_000, 120_000, "synthetic-model", "fp", tensors)


@pytest.fixture(scope="module")
def analysed_blob(tmp_path_factory):
    from cvxq_export.analysis.analyze import analyze_file
    from cvxq_export.devices import load_device

    pytest.importorskip("zstandard")
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("blob") / "model.bin"
    path.write_bytes(np.clip(np.rint(rng.laplace(0, 4, 200_000)), -127, 127).astype(np.int8).tobytes())
    devices = [load_device("raspberry-pi-5-4gb"), load_device("android-8gb")]
    return path, analyze_file(path, devices, codecs=["zstd-3", "lz4"], chunk_sizes=(64 << 10,), min_seconds=0.02).to_dict()


def test_write_report_html_is_self_contained_and_json_holds_the_plot_data(tmp_path, analysed_blob):
    pytest.importorskip("matplotlib")
    from cvxq_export.analysis.rd_curve import rd_curve
    from cvxq_export.report import Artifact, FormatSection, bits_table, write_report

    plan = _plan()
    blob, result = analysed_blob
    device = {"device": "raspberry-pi-5-4gb", "ram": 4 << 30, "os_reserved": 600 << 20, "usable": (4 << 30) - (600 << 20),
              "kv_cache": 120 << 20, "runtime": 200 << 20, "context": 2048}
    device["weights"] = device["usable"] - device["kv_cache"] - device["runtime"]  # as devices.weight_budget computes it
    curve = rd_curve(_random_menu(), 1000, 20_000)
    section = FormatSection("packed", plan, Artifact("packed", str(blob), blob.stat().st_size), curve=curve)
    md = write_report(tmp_path, [section], model="tiny", device_budgets={"packed": device}, timings={"total_s": 1.0},
                      analysis={"packed": result})
    assert md == tmp_path / "report.md"
    doc = check_self_contained_html(tmp_path / "report.html")
    imgs = [a for t, a in doc.tags if t == "img"]
    assert len(imgs) == 4  # heatmap, size-vs-distortion, budget, load times
    text = " ".join(doc.text)
    assert "Compressibility and load time" in text and "raspberry-pi-5-4gb" in text
    # report.md links the PNGs saved next to it
    body = md.read_text()
    for name in ("bits_heatmap.png", "size_distortion.png", "budget_breakdown.png", "load_times_packed.png"):
        assert f"]({name})" in body and (tmp_path / name).is_file()
        check_png((tmp_path / name).read_bytes())
    # report.json: the numbers behind every plot
    data = json.loads((tmp_path / "report.json").read_text())
    plots = data["plots"]
    assert set(plots) == {"bits_heatmap", "size_distortion", "budget", "load_times_packed"}
    heat = plots["bits_heatmap"]
    assert heat["file"] == "bits_heatmap.png" and heat["layers"] == [0, 1, 2]
    assert heat["types"] == ["self_attn.q_proj", "mlp.up_proj"]
    want = bits_table(plan)["heatmap"]["bits_per_weight"]
    assert heat["bits_per_weight"] == want
    q0 = plan.tensor("model.layers.0.self_attn.q_proj.weight")
    assert heat["bits_per_weight"][0][0] == pytest.approx(8 * q0.bytes / (64 * 64))
    assert "model.embed_tokens.weight" in heat["outside_layers"]
    sd = plots["size_distortion"]
    assert sd["bytes"] == curve.bytes and sd["distortion"] == curve.distortion
    bud = plots["budget"]
    assert bud["total"] == 4 << 30 and sum(i["bytes"] for i in bud["items"]) == 4 << 30
    assert [i["name"] for i in bud["items"]][-1] == "headroom"
    assert {i["name"]: i["bytes"] for i in bud["items"]}["weights file"] == blob.stat().st_size
    lt = plots["load_times_packed"]["devices"]
    assert [r["device"] for r in lt] == [d["device"] for d in result["devices"]]
    for row, d in zip(lt, result["devices"]):
        assert row["plain_s"] == pytest.approx(d["plain_s"]) and row["overlapped_s"] == pytest.approx(d["overlapped_s"])
    assert data["analysis"]["packed"]["file_bytes"] == blob.stat().st_size


def test_write_report_without_matplotlib_or_analysis_still_writes(tmp_path, monkeypatch):
    import builtins

    from cvxq_export.report import write_report

    real_import = builtins.__import__

    def no_mpl(name, *args, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    from cvxq_export.report import FormatSection

    write_report(tmp_path, [FormatSection("packed", _plan())], model="tiny", timings={"total_s": 1.0})
    text = (tmp_path / "report.html").read_text()
    assert "<img" not in text and "matplotlib is not installed" in text
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["plots"]["bits_heatmap"]["file"] is None and data["plots"]["bits_heatmap"]["layers"] == [0, 1, 2]


# --------------------------------------------------------------------------- the end of fit


def _run(capsys, *argv):
    from cvxq_export.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fit_packed_runs_the_analysis_and_writes_the_container(capsys, tmp_path, tiny_llama_dir):
    pytest.importorskip("matplotlib")
    pytest.importorskip("zstandard")
    from cvxq_export.formats.packed.container import FILE_NAME, read_packed
    from cvxq_export.formats.packed.compressed import compressed_name

    out = tmp_path / "fit"
    code, stdout, err = _run(capsys, "fit", str(tiny_llama_dir), "--budget", "60kB", "--format", "packed",
                             "--compress", "zstd-3", "-o", str(out), "--json", *FAST)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["report_html"] == str(out / "report.html")
    doc = check_self_contained_html(out / "report.html")
    assert len([1 for t, _ in doc.tags if t == "img"]) == 4
    data = json.loads((out / "report.json").read_text())
    a = data["analysis"]["packed"]
    assert a["path"] == FILE_NAME and a["file_bytes"] == (out / FILE_NAME).stat().st_size  # relative to the report
    assert a["codecs"] and a["devices"] and a["entropy"]["bits_per_symbol"] > 0
    assert {"bits_heatmap", "size_distortion", "budget", "load_times_packed"} <= set(data["plots"])
    sd = data["plots"]["size_distortion"]
    plan = json.loads((out / "plan.json").read_text())
    assert sd["chosen_distortion"] == pytest.approx(plan["distortion"], rel=1e-9)
    assert sd["bytes"][0] <= plan["total_bytes"] <= sd["bytes"][-1]
    assert "timings" not in data and data["packed"]["verified"] is True
    assert "analysis_s" in json.loads((out / "timings.json").read_text())["timings"]
    # the forced container: read back bit-exact through read_packed
    comp = compressed_name(out / FILE_NAME)
    assert result["compressed"]["path"] == str(comp) and "Forced" in result["compressed"]["reason"]
    with read_packed(out / FILE_NAME) as plain, read_packed(comp) as packed_z:
        for name in plain.tensors:
            assert np.array_equal(plain.weight(name).view(np.uint32), packed_z.weight(name).view(np.uint32))
    assert any(x["format"] == "packed-compressed" for x in data["artifacts"])
    md = (out / "report.md").read_text()
    assert "### Compressibility and load time: `model.cvxq.safetensors`" in md and "Compressed container" in md


def test_fit_compress_auto_without_gain_writes_no_container(capsys, tmp_path, tiny_llama_dir):
    """A 50 kB file loads in under a millisecond everywhere: no device gains, so 'auto' writes nothing."""
    pytest.importorskip("zstandard")
    out = tmp_path / "auto"
    code, stdout, err = _run(capsys, "fit", str(tiny_llama_dir), "--budget", "60kB", "--format", "packed",
                             "--compress", "auto", "-o", str(out), "--json", *FAST)
    assert code == 0, err
    assert json.loads(stdout)["compressed"] is None
    assert not list(out.glob("*.cvxqz"))
    assert "compressed container: not written" in (out / "report.md").read_text()


def test_fit_no_analysis(capsys, tmp_path, tiny_llama_dir):
    pytest.importorskip("matplotlib")
    out = tmp_path / "packed"
    code, stdout, err = _run(capsys, "fit", str(tiny_llama_dir), "--budget", "60kB", "--format", "packed", "--no-analysis",
                             "-o", str(out), "--json", *FAST)
    assert code == 0, err
    data = json.loads((out / "report.json").read_text())
    assert data["analysis"] == {} and "analysis: skipped (--no-analysis)" in data["notes"]
    assert data["plots"]["size_distortion"]["chosen_distortion"] is not None  # the fit keeps its menu
    doc = check_self_contained_html(out / "report.html")
    assert len([1 for t, _ in doc.tags if t == "img"]) == 3  # no analysis, so no load-time plot


@pytest.mark.parametrize("argv, expect", [
    (["--compress", "zstd-3"], "needs the packed format"),
    (["--format", "packed", "--compress", "brotli-5"], "zstd or lz4"),
    (["--format", "packed", "--compress", "auto", "--no-analysis"], "--no-analysis"),
])
def test_fit_report_flags_fail_fast(capsys, tmp_path, tiny_llama_dir, argv, expect):
    code, _, err = _run(capsys, "fit", str(tiny_llama_dir), "--budget", "60kB", *argv, "-o", str(tmp_path / "o"), *FAST)
    assert code == 2 and expect in err and "fix:" in err
    assert not (tmp_path / "o").exists()  # failed before anything was written


def test_container_choice_only_picks_container_codecs_with_a_gain():
    from cvxq_export.analysis.advice import container_choice

    def dev(name, compress, plain, options):
        return {"device": name, "compress": compress, "plain_s": plain, "options": options}

    opts = [{"codec": "brotli-11", "chunk_bytes": 1 << 20, "overlapped_s": 0.5, "compressed_bytes": 50},
            {"codec": "zstd-19", "chunk_bytes": 1 << 18, "overlapped_s": 0.7, "compressed_bytes": 70},
            {"codec": "lz4", "chunk_bytes": 1 << 20, "overlapped_s": 0.9, "compressed_bytes": 90}]
    r = {"devices": [dev("slow", True, 1.0, opts), dev("fast", False, 0.1, opts)]}
    c = container_choice(r)
    assert (c["codec"], c["chunk_bytes"], c["device"]) == ("zstd-19", 1 << 18, "slow")
    assert c["saving_s"] == pytest.approx(0.3) and not c["forced"]
    assert container_choice({"devices": [dev("fast", False, 0.1, opts)]}) is None
    forced = container_choice({"devices": [dev("fast", False, 0.1, opts)]}, force_codec="lz4")
    assert forced["codec"] == "lz4" and forced["forced"]
    with pytest.raises(CvxqError):
        from cvxq_export.formats.packed.compressed import parse_codec

        parse_codec("ans")
