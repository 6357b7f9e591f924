"""The demo's reusable pieces: predict/score/evaluate, run_demo's rows and format_table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qpack
import qpack.demo as demo
from qpack.demo import evaluate, format_table, predict, run_demo, score
from qpack.synthetic import make_patches
from qpack.unet import UNet, default_checkpoint_path

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
    return run_demo(fresh_checkpoint, samples=SAMPLES, bits=BITS)


def check_rows(rows, bits=BITS):
    assert [r["model"] for r in rows] == ["float32", *(f"{b}-bit" for b in bits)]
    assert [r["bits"] for r in rows] == [32, *bits]
    float_row, *quantized = rows
    assert float_row["ratio"] == 1.0
    assert float_row["mean_abs_dp"] == 0.0
    n_params = sum(p.numel() for p in UNet().parameters())
    assert float_row["param_bytes"] == 4 * n_params
    # the float32 .pt file is 4 bytes per parameter plus a small container overhead
    assert 4 * n_params <= float_row["bytes"] < 4 * n_params * 1.02
    sizes = [r["bytes"] for r in rows]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    for r in quantized:
        assert r["scheme"] == qpack.DEFAULT_SCHEME
        assert r["ratio"] == pytest.approx(float_row["bytes"] / r["bytes"])
    by_bits = {r["bits"]: r for r in rows}
    assert 3.8 < by_bits[8]["ratio"] < 4.1
    for r in rows:
        assert 0.0 <= r["dice"] <= 1.0
        assert 0.0 <= r["iou"] <= r["dice"] + 1e-12
        assert 0.0 <= r["mean_abs_dp"] <= 1.0
    assert by_bits[8]["mean_abs_dp"] < 0.005  # under half a percent
    assert by_bits[8]["mean_abs_dp"] <= min(r["mean_abs_dp"] for r in quantized)


def test_rows_fresh_model(fresh_rows):
    check_rows(fresh_rows)


def test_format_table(fresh_rows):
    text = format_table(fresh_rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["model", "bits", "scheme"]
    for column in ("size (kB)", "ratio", "dice %", "IoU %", "mean|dp| %"):
        assert column in lines[0]
    assert [line.split()[0] for line in lines[2:6]] == ["float32", "8-bit", "4-bit", "3-bit"]
    assert f"{fresh_rows[0]['bytes'] / 1000:.1f}" in lines[2]
    assert f"{fresh_rows[1]['ratio']:.2f}x" in lines[3]
    assert "torch.save" in text  # says what the float32 size is


def test_run_demo_other_scheme_and_workdir(fresh_checkpoint, tmp_path):
    before = torch.get_num_threads()
    rows = run_demo(
        fresh_checkpoint,
        samples=8,
        bits=[2],
        scheme="symmetric-per-layer",
        workdir=tmp_path,
        threads=1,
    )
    assert torch.get_num_threads() == before
    assert [r["model"] for r in rows] == ["float32", "2-bit"]
    assert rows[1]["scheme"] == "symmetric-per-layer"
    kept = tmp_path / "unet_2bit_symmetric-per-layer.qpk"
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
    rows = run_demo(samples=SAMPLES, bits=BITS)
    check_rows(rows)
    float_row, row8 = rows[0], rows[1]
    assert float_row["dice"] > 0.3  # the trained model actually finds grooves
    assert abs(row8["dice"] - float_row["dice"]) < 0.02
