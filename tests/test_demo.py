"""The demo's reusable pieces: predict/score/evaluate, run_demo's rows and format_table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qpack
import qpack.demo as demo
from qpack.demo import evaluate, format_table, predict, run_demo, score
from qpack.demo.synthetic import make_patches
from qpack.demo.unet import UNet, default_checkpoint_path

SAMPLES = 64
BITS = (8, 4, 3)


@pytest.fixture(scope="module")
def fresh_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("demo") / "fresh_unet.pt"
    torch.save(UNet().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def fresh_rows(fresh_checkpoint):
    return run_demo(fresh_checkpoint, samples=SAMPLES, bits=BITS, uniform=True)


def check_rows(rows, bits=BITS):
    names = ["float32", *(f"{who} {b}-bit" for b in bits for who in ("origin", "qpack"))]
    assert [r["model"] for r in rows] == names
    assert [r["bits"] for r in rows] == [32, *(b for b in bits for _ in range(2))]
    float_row, *quantized = rows
    assert float_row["ratio"] == 1.0
    assert float_row["mean_abs_dp"] == 0.0
    n_params = sum(p.numel() for p in UNet().parameters())
    n_biases = sum(p.numel() for p in UNet().parameters() if p.dim() == 1)
    assert float_row["param_bytes"] == 4 * n_params
    # the float32 .pt file is 4 bytes per parameter plus a small container overhead
    assert 4 * n_params <= float_row["bytes"] < 4 * n_params * 1.02
    for who in ("origin", "qpack"):
        sizes = [r["bytes"] for r in quantized if r["model"].startswith(who)]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    for r in quantized:
        assert r["ratio"] == pytest.approx(float_row["bytes"] / r["bytes"])
        if r["model"].startswith("origin"):
            # the origin's quantizer, now actually stored: n*bits/8 + 4 per bias + header
            ideal = (n_params - n_biases) * r["bits"] / 8 + 4 * n_biases
            assert ideal <= r["bytes"] <= ideal * 1.01 + 8192
            assert r["scheme"].startswith("symmetric-per-layer")
        else:  # uniform widths name the scheme; chosen ones describe the choice
            assert r["scheme"].startswith((qpack.DEFAULT_SCHEME, "Huffman, "))
    for r in rows:
        assert 0.0 <= r["dice"] <= 1.0
        assert 0.0 <= r["iou"] <= r["dice"] + 1e-12
        assert 0.0 <= r["mean_abs_dp"] <= 1.0
    eight = [r for r in quantized if r["bits"] == 8]
    assert all(r["mean_abs_dp"] < 0.005 for r in eight)  # under half a percent
    three = [r for r in quantized if r["bits"] == 3]
    assert max(r["mean_abs_dp"] for r in eight) <= min(r["mean_abs_dp"] for r in three)


def test_rows_fresh_model(fresh_rows):
    check_rows(fresh_rows)


def test_format_table(fresh_rows):
    text = format_table(fresh_rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["model", "stored", "as"]
    for column in ("size (kB)", "ratio", "dice %", "IoU %", "mean|dp| %"):
        assert column in lines[0]
    assert [" ".join(line.split()[:2]) for line in lines[2:5]] == [
        f"float32 {lines[2].split()[1]}",
        "origin 8-bit",
        "qpack 8-bit",
    ]
    assert f"{fresh_rows[0]['bytes'] / 1000:.1f}" in lines[2]
    assert f"{fresh_rows[1]['ratio']:.2f}x" in lines[3]
    assert "torch.save" in text  # says what the float32 size is


def test_run_demo_allocates_widths_per_layer(fresh_checkpoint):
    """Default qpack rows choose widths per layer: at least the quality of fixed-width."""
    rows = run_demo(fresh_checkpoint, samples=SAMPLES, bits=[4], origin=False)
    uniform = run_demo(fresh_checkpoint, samples=SAMPLES, bits=[4], origin=False, uniform=True)
    assert [r["model"] for r in rows] == ["float32", "qpack 4-bit"]
    assert rows[1]["scheme"].startswith("Huffman, ")
    assert rows[1]["mean_abs_dp"] <= 1.5 * uniform[1]["mean_abs_dp"]


def test_run_demo_other_scheme_and_workdir(fresh_checkpoint, tmp_path):
    before = torch.get_num_threads()
    rows = run_demo(
        fresh_checkpoint,
        samples=8,
        bits=[2],
        scheme="symmetric-per-layer",
        workdir=tmp_path,
        threads=1,
        origin=False,
        uniform=True,
    )
    assert torch.get_num_threads() == before
    assert [r["model"] for r in rows] == ["float32", "qpack 2-bit"]
    assert rows[1]["scheme"].startswith("symmetric-per-layer")
    kept = tmp_path / "unet_qpack_2bit.qpk"
    assert kept.stat().st_size == rows[1]["bytes"]
    info = qpack.inspect(kept)
    assert info["metadata"]["source"] == fresh_checkpoint.name
    assert {t["scheme"] for t in info["tensors"]} == {"symmetric-per-layer", "raw"}


def test_run_demo_rejects_bad_arguments(fresh_checkpoint):
    with pytest.raises(ValueError):
        run_demo(fresh_checkpoint, samples=4, bits=[9])
    with pytest.raises(ValueError):
        run_demo(fresh_checkpoint, samples=4, scheme="nope")
    with pytest.raises(ValueError):
        run_demo(fresh_checkpoint, samples=0)


def test_run_demo_bad_checkpoints(tmp_path, monkeypatch):
    wrong = tmp_path / "wrong.pt"
    torch.save({"weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(qpack.QpackError, match="does not fit the UNet"):
        run_demo(wrong, samples=4)
    monkeypatch.setattr(demo, "default_checkpoint_path", lambda: tmp_path / "missing.pt")
    with pytest.raises(qpack.QpackError, match="--checkpoint"):
        run_demo(None, samples=4)


def test_predict_score_evaluate():
    torch.manual_seed(1)
    model = UNet().eval()
    x, y = make_patches(10, 5)
    prob = predict(model, x, batch_size=3)
    assert prob.shape == x.shape and prob.dtype == np.float32
    assert np.all((prob >= 0) & (prob <= 1))
    np.testing.assert_allclose(prob, predict(model, x, batch_size=10), atol=1e-5)
    result = evaluate(model, x, y, reference=prob, batch_size=4)
    assert result["mean_abs_dp"] == pytest.approx(0.0, abs=1e-5)
    assert evaluate(model, x, y)["mean_abs_dp"] is None
    perfect = score(y, y, reference=np.zeros_like(y))
    assert perfect["dice"] == 1.0 and perfect["iou"] == 1.0
    assert perfect["mean_abs_dp"] == pytest.approx(float(y.mean()))


@pytest.mark.skipif(
    not default_checkpoint_path().is_file(), reason="embedded checkpoint not trained yet"
)
def test_rows_embedded_model():
    """On the trained model, qpack's files beat the origin's quantizer at every width."""
    rows = run_demo(samples=SAMPLES, bits=BITS)
    check_rows(rows)
    float_row = rows[0]
    assert float_row["dice"] > 0.6  # the trained model actually finds grooves
    by_name = {r["model"]: r for r in rows}
    for b in BITS:
        origin, ours = by_name[f"origin {b}-bit"], by_name[f"qpack {b}-bit"]
        assert ours["mean_abs_dp"] <= origin["mean_abs_dp"]
    assert abs(by_name["qpack 8-bit"]["dice"] - float_row["dice"]) < 0.005
    assert abs(by_name["qpack 3-bit"]["dice"] - float_row["dice"]) < 0.05
