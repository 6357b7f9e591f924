"""tools/evaluate.py on a fresh UNet and a handful of patches: every method's rows, sizes
that follow their formulas, and the table, JSON and plot outputs.

The fresh UNet's weights are redrawn from a normal distribution: PyTorch's default
(kaiming-uniform) init spreads the codes evenly over every level, which no entropy coder can
shrink (zstd then adds a few bytes), whereas trained weights are bell-shaped. The allocator
runs with its weight-error distortion (``calibration=0``) to keep the test fast.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import qpack
from qpack.demo.synthetic import HELDOUT_SEED, make_patches
from qpack.demo.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 8
CALIBRATION = 0  # qpack.allocate's own weight-error distortion: no model evaluations
BITS = (8, 4, 3)


@pytest.fixture(scope="module")
def ev():
    spec = importlib.util.spec_from_file_location("qpack_evaluate", ROOT / "tools/evaluate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def fresh_unet(seed: int = 0) -> UNet:
    """A fresh UNet with bell-shaped (normal) weights, as trained weights are."""
    torch.manual_seed(seed)
    model = UNet()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, 0.0, 1.0 / p[0].numel() ** 0.5)
    return model


@pytest.fixture(scope="module")
def state(ev):
    return ev.state_to_numpy(fresh_unet().state_dict())


@pytest.fixture(scope="module")
def result(ev, state):
    """Every method but the allocator's (slow: it encodes each tensor at ~14 widths per
    request), which test_optimized_rows runs on fewer requests."""
    methods = [m for m in ev.METHODS if m != "qpack optimized"]
    return ev.run(state, SAMPLES, bits=BITS, methods=methods)


def param_counts():
    params = list(UNet().parameters())
    weights = sum(p.numel() for p in params if p.dim() >= 2)
    return weights, sum(p.numel() for p in params) - weights


def rows_of(result, method):
    return {r["setting"]: r for r in result.rows if r["method"] == method}


def test_float_row(result):
    first = result.rows[0]
    weights, biases = param_counts()
    assert first["method"] == "float32"
    assert first["bytes"] == 4 * (weights + biases)
    assert first["ratio"] == 1.0
    assert first["mean_abs_dp"] == 0.0


def test_origin_sizes_follow_the_formula(result):
    weights, biases = param_counts()
    origin = rows_of(result, "origin")
    assert list(origin) == [f"{b}-bit" for b in BITS]
    for b in BITS:
        row = origin[f"{b}-bit"]
        assert row["bytes"] == weights * b / 8 + 4 * biases
        assert row["ratio"] == pytest.approx(4 * (weights + biases) / row["bytes"])
        assert 0 < row["mean_abs_dp"] < 1


def test_origin_formula_matches_qpack_symmetric_per_layer(ev, state):
    for b in (8, 4, 3):
        direct, _, _ = ev.origin_state(state, b)
        via_qpack = qpack.decode(
            qpack.encode(state, bits=b, scheme="symmetric-per-layer", entropy=False)
        )
        for name in state:
            np.testing.assert_array_equal(direct[name], via_qpack[name], err_msg=name)


def test_origin_stream_is_the_packed_size_plus_scales(ev, state):
    n_layers = sum(1 for a in state.values() if a.ndim >= 2)
    for b in BITS:
        stream = ev.origin_stream(state, b)
        assert len(stream) == ev.origin_packed_size(state, b) + 4 * n_layers


def test_origin_zstd_rows(result):
    pytest.importorskip("zstandard")
    origin, zstd = rows_of(result, "origin"), rows_of(result, "origin+zstd")
    assert list(zstd) == list(origin)
    for setting, row in zstd.items():
        assert row["bytes"] < origin[setting]["bytes"]
        assert row["mean_abs_dp"] == origin[setting]["mean_abs_dp"]


def test_gguf_rows(result, state):
    pytest.importorskip("gguf")
    rows = rows_of(result, "gguf")
    assert list(rows) == ["Q8_0", "Q4_0"]
    assert rows["Q8_0"]["bytes"] > rows["Q4_0"]["bytes"]
    weights, biases = param_counts()
    # Q8_0: 34 bytes per 32 weights; Q4_0: 18; fallbacks 2 bytes per weight; biases 4
    blockable = sum(
        a.size
        for a in state.values()
        if a.ndim >= 2 and a.reshape(a.shape[0], -1).shape[1] % 32 == 0
    )
    fallback = weights - blockable
    assert fallback > 0 and "float16" in rows["Q8_0"]["note"]
    for name, block_bytes in (("Q8_0", 34), ("Q4_0", 18)):
        expected = blockable // 32 * block_bytes + 2 * fallback + 4 * biases
        assert rows[name]["bytes"] == expected
        assert 0 < rows[name]["mean_abs_dp"] < 1


def test_qpack_rows(result):
    fixed, entropy = rows_of(result, "qpack fixed"), rows_of(result, "qpack entropy")
    assert list(fixed) == list(entropy) == [f"{b}-bit" for b in BITS]
    for rows in (fixed, entropy):
        sizes = [rows[f"{b}-bit"]["bytes"] for b in BITS]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    for setting in fixed:
        assert entropy[setting]["bytes"] <= fixed[setting]["bytes"]
        # Huffman coding is lossless: the same weights, the same scores
        assert entropy[setting]["mean_abs_dp"] == fixed[setting]["mean_abs_dp"]


def test_optimized_rows(ev, state, tmp_path):
    x, y = make_patches(4, HELDOUT_SEED)
    bench = ev.Bench(state, x, y)
    budget = ev.origin_packed_size(state, 4) // 2
    rows, skipped = ev.optimized_rows(bench, tmp_path, (4,), budget, calibration=CALIBRATION)
    if not hasattr(qpack, "allocate"):
        assert not rows and any("not available" in s for s in skipped)
        return
    assert not skipped
    assert [r["setting"] for r in rows] == ["bits=4", f"max_size={budget:,}"]
    assert all(r["method"] == "qpack optimized" and r["basis"] == "file" for r in rows)
    assert rows[1]["bytes"] <= budget
    for row in rows:
        assert row["plan"] and 0 <= row["mean_abs_dp"] < 1
    # the plans are real mappings of the quantized weights to widths
    weights = {n for n, a in state.items() if a.ndim >= 2}
    assert set(rows[0]["plan"]["bits"]) == weights


def test_ratios_and_outputs(result, ev, tmp_path):
    ratios = ev.ratios(result.rows)
    assert {r["bits"] for r in ratios} == set(BITS)
    for r in ratios:
        assert r["size_over_origin"] > 0 and math.isfinite(r["dp_over_origin"])
    text = ev.format_markdown(result)
    for row in result.rows:
        assert f"| {row['method']} | {row['setting']}" in text
    dumped = json.loads(json.dumps(ev.to_json(result)))
    assert len(dumped["rows"]) == len(result.rows)
    assert dumped["meta"]["samples"] == SAMPLES


def test_caching_evaluator(ev, state):
    calls = []

    def evaluate(replaced):
        calls.append(sorted(replaced))
        return float(sum(np.sum(v) for v in replaced.values()))

    cached = ev.caching(evaluate)
    name = next(iter(state))
    first = cached({name: state[name]})
    assert cached({name: state[name].copy()}) == first  # same content: not measured again
    cached({name: state[name] * 2})
    assert len(calls) == 2


def test_plots(result, ev, state, tmp_path):
    pytest.importorskip("matplotlib")
    written = ev.write_plots(result, state, tmp_path)
    names = {Path(p).name for p in written}
    assert names == {"size_vs_error.png", "layer_error.png", "histograms.png"}
    for p in written:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_writes_markdown_and_json(ev, tmp_path):
    checkpoint = tmp_path / "fresh.pt"
    torch.save(fresh_unet(1).state_dict(), checkpoint)
    md, js = tmp_path / "table.md", tmp_path / "rows.json"
    argv = ["--checkpoint", str(checkpoint), "--samples", "4", "--methods", "float32,origin"]
    assert ev.main([*argv, "--markdown", str(md), "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("float32", "float32"),
        *(("origin", f"{b}-bit") for b in BITS),
    ]
    assert "| origin | 4-bit |" in md.read_text()
    assert ev.main(["--checkpoint", str(tmp_path / "missing.pt"), "--samples", "4"]) == 2


def test_optimized_rows_without_allocate(ev, state, monkeypatch):
    monkeypatch.delattr(qpack, "allocate", raising=False)
    bench = ev.Bench(state, *make_patches(1, HELDOUT_SEED))
    rows, skipped = ev.optimized_rows(bench, Path("unused"), (4,), None)
    assert rows == [] and skipped == ["qpack optimized: skipped (qpack.allocate not available)"]
