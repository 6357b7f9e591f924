"""Half storage (spec section 6.4, format 1.4): tensors stored as binary16 values decode
to exactly the binary16 rounding of their weights, in every reader, and restore their
dtype; the writer refuses values binary16 cannot hold."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qpack
from qpack import device as qdevice
from qpack import kernels
from qpack.errors import EncodeError
from qpack.reader import Reader

HALF_MAX = 65504.0
finite_halves = st.floats(-HALF_MAX, HALF_MAX, width=32, allow_subnormal=True)


@settings(max_examples=60, deadline=None)
@given(
    array=hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=1, max_dims=4, max_side=9), elements=finite_halves
    ),
)
def test_round_trip_is_the_binary16_rounding(array):
    blob = qpack.encode({"w": array}, bits={"w": 16})
    want = array.astype(np.float16).astype(np.float32)
    native = kernels.native
    try:
        for compiled in (native, None):
            kernels.native = compiled
            got = qpack.decode(blob)["w"]
            assert got.dtype == np.float32 and got.shape == array.shape
            assert got.tobytes() == want.tobytes()  # bit for bit: signed zeros count
    finally:
        kernels.native = native


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_load_restores_the_dtype(dtype, tmp_path):
    weight = (torch.randn(12, 7, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    path = tmp_path / "m.qpk"
    qpack.save({"w": weight, "b": torch.ones(12)}, path, bits={"w": 16})
    out = qpack.load(path)
    assert out["w"].dtype == dtype
    assert torch.equal(out["w"], weight.half().float().to(dtype))
    assert torch.equal(out["b"], torch.ones(12))
    with qpack.open(path) as f:
        assert torch.equal(f.get_tensor("w"), out["w"])
    with Reader(path) as reader:
        entry = reader.entry("w")
        assert entry.storage == "half" and entry.length == 2 * weight.numel()
        assert reader.header.version == (1, 4)


def test_device_path_decodes_alike(tmp_path):
    weight = torch.randn(33, 5, dtype=torch.float64)
    path = tmp_path / "m.qpk"
    qpack.save({"w": weight}, path, bits={"w": 16})
    with Reader(path) as reader:
        entry = reader.entry("w")
        staged = qdevice.stage(entry, reader.checked_payload("w"), torch.device("cpu"))
        got = qdevice.finish(entry, staged, torch.device("cpu"))
    assert got.dtype == torch.float64
    assert torch.equal(got, weight.half().double())


def test_infinities_and_nan_are_kept():
    array = np.array([[np.inf, -np.inf], [np.nan, 1.0]], np.float32)
    got = qpack.decode(qpack.encode({"w": array}, bits={"w": 16}))["w"]
    assert np.isposinf(got[0, 0]) and np.isneginf(got[0, 1]) and np.isnan(got[1, 0])
    assert got[1, 1] == 1.0


def test_values_beyond_binary16_are_refused():
    array = np.array([[1.0, 70000.0]], np.float32)
    with pytest.raises(EncodeError, match="float16's range") as info:
        qpack.encode({"big": array}, bits={"big": 16})
    assert "big" in str(info.value)


def test_only_floating_tensors_can_be_stored_half():
    with pytest.raises(EncodeError, match="floating"):
        qpack.encode({"n": np.arange(6, dtype=np.int32).reshape(2, 3)}, bits={"n": 16})


def test_files_without_half_keep_their_minor_version(tmp_path):
    blob = qpack.encode({"w": np.ones((4, 4), np.float32)}, bits=8, entropy=False)
    assert blob[10:12] == (0).to_bytes(2, "little")


def test_cli_inspect_shows_half(tmp_path):
    path = tmp_path / "m.qpk"
    qpack.save({"w": torch.randn(8, 8)}, path, bits={"w": 16})
    out = _qpack("inspect", path).stdout
    assert "format 1.4" in out
    row = next(line for line in out.splitlines() if line.startswith("w "))
    assert " half " in row and " 16 " in row and "16.00" in row


def _qpack(*args) -> subprocess.CompletedProcess:
    """The command line as a user runs it."""
    command = [sys.executable, "-m", "qpack", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True)


def test_cli_pack_bits_16_stores_float16_values(tmp_path):
    weights = {"w": torch.randn(16, 40), "b": torch.randn(16)}
    torch.save(weights, tmp_path / "m.pt")
    out = tmp_path / "m.qpk"
    run = _qpack("pack", tmp_path / "m.pt", "-o", out, "--bits", "16")
    assert run.returncode == 0, run.stderr
    assert "float16 values" in run.stdout
    loaded = qpack.load(out)
    assert torch.equal(loaded["w"], weights["w"].half().float())
    assert torch.equal(loaded["b"], weights["b"])
    bad = _qpack("pack", tmp_path / "m.pt", "-o", tmp_path / "x.qpk", "--bits", "12")
    assert bad.returncode == 2 and "or 16" in bad.stderr and "Traceback" not in bad.stderr
