"""Per-group scales (format 1.3, granularity "group"): the layout of groups in a row (the
last possibly short), binary16 parameters, one shared zero point, both decoders and the
device path agreeing bit for bit with a direct reading of spec section 6.1, the schemes,
error-compensating rounding on grouped grids, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qpack
from qpack import kernels
from qpack.container import split_file
from qpack.errors import EncodeError
from qpack.gptq import gptq_codes
from qpack.reader import Reader
from qpack.schemes import GROUP_SCHEMES, HALF_MIN, parse_scheme, quantize

torch = pytest.importorskip("torch")


def spec_values(codes, shape, group_size, scale, zero) -> np.ndarray:
    """Spec 6.1 read literally, one code at a time: code i of a row of ``inner`` codes is in
    group ``(i // inner) * n + (i % inner) // group_size``."""
    inner = int(np.prod(shape[1:], dtype=np.int64))
    n = -(-inner // group_size)
    out = np.empty(len(codes), dtype=np.float32)
    for i, q in enumerate(codes):
        g = (i // inner) * n + (i % inner) // group_size
        z = zero[0] if zero.size == 1 else zero[g]
        t = np.float32(np.float32(q) - np.float32(z))
        out[i] = np.float32(np.float32(scale[g]) * t)
    return out


def decode_all_ways(blob: bytes) -> list[dict]:
    """The file decoded by the compiled kernels (where built), numpy, the lazy reader and
    torch's device path (on the CPU)."""
    ways = [qpack.decode(blob)]
    native = kernels.native
    kernels.native = None
    try:
        ways.append(qpack.decode(blob))
    finally:
        kernels.native = native
    return ways


shapes = st.tuples(st.integers(1, 5), st.integers(1, 41)) | st.tuples(
    st.integers(1, 4), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)
)


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    size=st.integers(1, 50),
    base=st.sampled_from(GROUP_SCHEMES),
    bits=st.sampled_from([1, 2, 3, 4, 4.5, 6, 8]),
    entropy=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trip_matches_the_spec_rule(shape, size, base, bits, entropy, seed):
    if bits == 1 and base == "symmetric-per-group":
        bits = 2  # one level each side of zero needs two levels
    w = (np.random.default_rng(seed).standard_t(3, size=shape) * 0.1).astype(np.float32)
    blob = qpack.encode({"w": w}, bits=bits, scheme=f"{base}-{size}", entropy=entropy)
    entry = Reader(blob).header.tensors[0]
    assert entry.granularity == "group" and entry.group_size == size
    assert Reader(blob).header.version == (1, 3)
    codes = quantize(w, bits, f"{base}-{size}").codes
    want = spec_values(codes, shape, size, entry.scale, entry.zero_point)
    for decoded in decode_all_ways(blob):
        assert decoded["w"].shape == w.shape
        assert decoded["w"].reshape(-1).tobytes() == want.tobytes()
    with qpack.open(blob) as f:
        assert f.get_tensor("w").numpy().reshape(-1).tobytes() == want.tobytes()
    on_device = qpack.load(blob, device="cpu")["w"].numpy().reshape(-1)
    assert on_device.tobytes() == want.tobytes()


@pytest.mark.parametrize("shape,size", [((3, 10), 4), ((2, 5), 2), ((4, 64), 16), ((2, 7), 9)])
def test_asymmetric_groups_are_within_half_a_step(shape, size):
    w = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    q = quantize(w, 4, f"asymmetric-per-group-{size}")
    inner = shape[1]
    n = -(-inner // size)
    group = (np.arange(w.size) // inner) * n + (np.arange(w.size) % inner) // size
    step = q.scale[group]
    assert (np.abs(q.values() - w.reshape(-1)) <= step / 2 * (1 + 1e-3) + 1e-7).all()
    assert q.scale.size == shape[0] * n


def test_float16_parameters_and_one_shared_zero_point_in_the_header():
    w = np.random.default_rng(2).normal(size=(8, 96)).astype(np.float32)
    blob = qpack.encode({"w": w}, bits=4, scheme="symmetric-per-group-32", entropy=False)
    header, _, version = split_file(blob)
    raw = header["tensors"][0]
    assert version == (1, 3)
    assert raw["granularity"] == "group" and raw["group_size"] == 32
    assert raw["scale_dtype"] == "float16"
    assert len(raw["scale"]) == 2 * 8 * 3 and len(raw["zero_point"]) == 2
    assert np.frombuffer(raw["zero_point"], "<f2")[0] == 8
    # Q4_0's grid: the weight of largest magnitude of every group is code 0 exactly
    q = quantize(w, 4, "symmetric-per-group-32")
    groups = w.reshape(8, 3, 32)
    peaks = np.take_along_axis(groups, np.abs(groups).argmax(axis=2)[..., None], axis=2)
    assert np.allclose(q.scale, (peaks.reshape(-1) / -8).astype(np.float16), rtol=0, atol=0)


def test_scales_outside_binary16_normals_are_stored_as_float32():
    w = np.random.default_rng(3).normal(size=(4, 64)).astype(np.float32) * np.float32(1e-5)
    q = quantize(w, 4, "asymmetric-per-group-32")
    assert q.scale_dtype == "float32" and (np.abs(q.scale) < HALF_MIN).any()
    raw = split_file(qpack.encode({"w": w}, bits=4, scheme="asymmetric-per-group-32"))[0]
    assert "scale_dtype" not in raw["tensors"][0]
    assert len(raw["tensors"][0]["scale"]) == 4 * 4 * 2


def test_other_files_keep_their_minor_version():
    w = np.random.default_rng(4).normal(size=(4, 8)).astype(np.float32)
    assert Reader(qpack.encode({"w": w}, bits=4, entropy=False)).header.version == (1, 0)


def test_scheme_names():
    assert parse_scheme("symmetric-per-group") == ("symmetric-per-group", 32)
    assert parse_scheme("mse-per-group-128") == ("mse-per-group", 128)
    assert parse_scheme("asymmetric-per-channel") == ("asymmetric-per-channel", None)
    for bad in (
        "asymmetric-per-group-0",
        "asymmetric-per-group-x",
        "per-group-8",
        "mse-per-channel-8",
    ):
        with pytest.raises(ValueError, match="unknown scheme"):
            parse_scheme(bad)
    with pytest.raises(EncodeError, match="unknown scheme"):
        qpack.encode({"w": np.ones((2, 2), np.float32)}, scheme="symmetric-per-group-07")
    with pytest.raises(EncodeError, match="at least one dimension"):
        qpack.encode({"w": np.float32(1.0)}, bits={"w": 4}, scheme="symmetric-per-group")


def test_gptq_on_a_grouped_grid():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(16, 50)).astype(np.float32)
    q = quantize(w, 3, "asymmetric-per-group-16")
    identity = gptq_codes(
        w, np.eye(50), q.scale, q.zero_point, 8, granularity="group", group_size=16
    )
    assert (identity == q.codes).all()  # no correlation to use: round to nearest
    x = rng.normal(size=(4000, 50))
    x[:, 1:] += 0.7 * x[:, :-1]  # correlated inputs: compensation pays
    h = x.T @ x / len(x)
    codes = gptq_codes(w, h, q.scale, q.zero_point, 8, granularity="group", group_size=16)
    assert codes.max() < 8

    def error(c):
        d = qpack.schemes.dequantize(c, q.scale, q.zero_point, row=50, run=16).reshape(w.shape) - w
        return float(np.einsum("ij,jk,ik->", d, h, d))

    assert error(codes) < 0.9 * error(q.codes)


def test_cli_pack_and_inspect_group_scheme(tmp_path):
    sd = {"w": torch.randn(6, 70), "b": torch.randn(6)}
    src, out = tmp_path / "m.pt", tmp_path / "m.qpk"
    torch.save(sd, src)
    run = [sys.executable, "-m", "qpack"]
    done = subprocess.run(
        [*run, "pack", str(src), "-o", str(out), "--bits", "4"]
        + ["--scheme", "asymmetric-per-group-64"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    shown = subprocess.run([*run, "inspect", str(out)], capture_output=True, text=True).stdout
    assert "group/64 f16" in shown and "qpack format 1.3" in shown
    info = json.loads(
        subprocess.run([*run, "inspect", "--json", str(out)], capture_output=True, text=True).stdout
    )
    row = next(t for t in info["tensors"] if t["name"] == "w")
    assert row["group_size"] == 64 and row["scale_dtype"] == "float16"
    assert row["param_bytes"] == 2 * 6 * 2 * 2  # scale and zero point of 12 groups
    loaded = qpack.load(str(out))
    assert torch.equal(loaded["b"], sd["b"])
    assert (loaded["w"] - sd["w"]).abs().max() < 0.5
    bad = subprocess.run(
        [*run, "pack", str(src), "-o", str(tmp_path / "x.qpk"), "--scheme", "group-64"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown scheme" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_header_bytes_of_groups_are_counted_by_inspect():
    w = np.random.default_rng(6).normal(size=(4, 64)).astype(np.float32)
    blob = qpack.encode({"w": w}, bits=4, scheme="asymmetric-per-group-32", entropy=False)
    header = msgpack.unpackb(blob[24 : 24 + int.from_bytes(blob[16:24], "little")])
    raw = header["tensors"][0]
    row = qpack.inspect(blob)["tensors"][0]
    assert row["param_bytes"] == len(raw["scale"]) + len(raw["zero_point"]) == 32
    assert row["bits_per_weight"] == pytest.approx(8 * (128 + 32) / 256)
