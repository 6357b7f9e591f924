"""The public verbs mirror the ones users know: safetensors' safe_open (keys, metadata,
get_tensor, get_tensors), torch's load_state_dict (missing and unexpected keys), and the
same save/load/open for numpy arrays in qpack.numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qpack
import qpack.numpy as qnp


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    return {
        "fc.weight": torch.randn(8, 16, generator=gen),
        "fc.bias": torch.randn(8, generator=gen),
        "half.weight": torch.randn(4, 4, generator=gen).to(torch.bfloat16),
    }


def test_open_has_safe_open_verbs(tmp_path):
    path = tmp_path / "m.qpk"
    state = _state()
    qpack.save(state, path, metadata={"who": "me"})
    loaded = qpack.load(path)
    with qpack.open(path) as f:
        assert f.keys() == list(state)
        assert f.metadata()["who"] == "me"
        for name in state:
            assert torch.equal(f.get_tensor(name), loaded[name])
            assert f.get_tensor(name).dtype == state[name].dtype
        assert [n for n, _ in f.get_tensors()] == list(state)
        with pytest.raises(KeyError):
            f.get_tensor("nope")


def test_load_into_returns_missing_and_unexpected(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 2))
    state = {"0.weight": torch.randn(8, 16), "0.bias": torch.randn(8), "extra": torch.ones(1)}
    qpack.save(state, tmp_path / "p.qpk")
    missing, unexpected = qpack.load_into(model, tmp_path / "p.qpk", strict=False)
    assert sorted(missing) == ["1.bias", "1.weight"]
    assert unexpected == ["extra"]
    with pytest.raises(qpack.QpackError, match="missing from the file"):
        qpack.load_into(model, tmp_path / "p.qpk")


def test_numpy_verbs_mirror_the_torch_ones(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(size=(16, 32)).astype(np.float32), "n": np.arange(5)}
    path = tmp_path / "a.qpk"
    qnp.save(arrays, path, bits=4)
    torch_side = qpack.load(path)
    loaded = qnp.load(path)
    assert list(loaded) == ["w", "n"]
    np.testing.assert_array_equal(loaded["n"], arrays["n"])
    np.testing.assert_array_equal(loaded["w"], torch_side["w"].numpy())
    assert qnp.encode(arrays, bits=4) == path.read_bytes()  # one meaning of bits=4
    assert qpack.encode(arrays, bits=4) == path.read_bytes()
    with qnp.open(path) as f:
        assert f.keys() == ["w", "n"] and "producer" in f.metadata()
        np.testing.assert_array_equal(f.get_tensor("w"), loaded["w"])
        assert dict(f.get_tensors()).keys() == loaded.keys()
    for name, value in qnp.decode(path.read_bytes()).items():
        np.testing.assert_array_equal(value, loaded[name])
