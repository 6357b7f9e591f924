"""qpack.open: lazy per-tensor access that reads only the tensor asked for."""

from __future__ import annotations

import os

import pytest
import torch

import qpack


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    state = {
        "big.weight": torch.randn(256, 128, 3, 3),
        "big.bias": torch.randn(256),
        "small.weight": torch.randn(4, 4).to(torch.bfloat16),
        "count": torch.tensor(7),
    }
    path = tmp_path / "m.qpk"
    qpack.save(state, path, bits=4, metadata={"model": "lazy"})
    return path, state


def test_open_matches_load(saved):
    path, state = saved
    full = qpack.load(path)
    with qpack.open(path) as f:
        assert f.keys() == list(state)
        assert f.metadata()["model"] == "lazy"
        for name in reversed(f.keys()):  # any order
            got = f.get(name)
            assert got.dtype == full[name].dtype and torch.equal(got, full[name])
        with pytest.raises(KeyError, match="nope"):
            f.get("nope")


def test_get_reads_only_that_tensor(saved, monkeypatch):
    path, _ = saved
    sizes = {t["name"]: t["bytes"] for t in qpack.inspect(path)["tensors"]}
    read = []
    real_preadv = os.preadv

    def counting_preadv(fd, buffers, offset):
        got = real_preadv(fd, buffers, offset)
        read.append(got)
        return got

    monkeypatch.setattr(os, "preadv", counting_preadv)
    with qpack.open(path) as f:
        header_bytes = sum(read)
        read.clear()
        f.get("small.weight")
    assert sum(read) == sizes["small.weight"]  # not a byte of the big tensor
    assert header_bytes < os.path.getsize(path) - sizes["big.weight"]


def test_get_checks_that_tensor(saved):
    """A damaged tensor fails on its own get(); the others still decode exactly."""
    path, _ = saved
    before = qpack.load(path)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01  # inside the last tensor's bytes ("count", raw)
    path.write_bytes(bytes(blob))
    with qpack.open(path) as f:
        assert torch.equal(f.get("big.bias"), before["big.bias"])
        with pytest.raises(qpack.QpackError, match="checksum"):
            f.get("count")
    with pytest.raises(qpack.QpackError):
        qpack.load(path)


def test_load_into_fits_or_explains(tmp_path):
    from qpack.demo.unet import UNet

    torch.manual_seed(1)
    model = UNet()
    path = tmp_path / "unet.qpk"
    qpack.save(model.state_dict(), path, bits=8)
    fresh = UNet()
    qpack.load_into(fresh, path)
    w = "decoder_list.2.conv_block.conv_stage.0.conv.weight"
    assert torch.allclose(fresh.state_dict()[w], model.state_dict()[w], atol=0.01)

    other = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(qpack.QpackError) as info:
        qpack.load_into(other, path)
    text = str(info.value)
    assert "missing from the file: 0.weight, 0.bias (2)" in text
    assert "not in the model:" in text and "(20)" in text and str(path) in text

    state = model.state_dict()
    state["refinement_stage.conv_stage.0.conv.bias"] = torch.zeros(2)
    bad = tmp_path / "bad.qpk"
    qpack.save(state, bad)
    with pytest.raises(qpack.QpackError, match=r"shape mismatch: refinement_stage.* \[2\]"):
        qpack.load_into(UNet(), bad, strict=False)  # a shape mismatch never loads
