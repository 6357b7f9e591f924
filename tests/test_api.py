"""Tests of the torch API: save -> load round trips, dtypes, options, inspect and the
file-system behaviour of save."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qpack
from qpack import errors as E
from qpack.bitpack import packed_size

SYM = "symmetric-per-layer"
ASYM = "asymmetric-per-channel"
SCHEMES = [SYM, ASYM]
HYPO = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PREAMBLE = 24


def data_start(blob: bytes) -> int:
    (header_len,) = struct.unpack_from("<Q", blob, 16)
    return -(-(PREAMBLE + header_len) // 64) * 64


def as_f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality of two tensors of the same dtype and shape (NaNs included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(width), b.contiguous().view(width))


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------- strategies


@st.composite
def weights(draw, dtypes=(torch.float32,)):
    """A float tensor of rank 2-4 (small dims, some zero) with values of a random style and
    magnitude, built by numpy from a drawn seed."""
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=2, max_size=4)))
    dtype = draw(st.sampled_from(dtypes))
    lo_exp, hi_exp = (-3, 3) if dtype == torch.float16 else (-20, 20)
    magnitude = 10.0 ** draw(st.integers(lo_exp, hi_exp))
    style = draw(st.sampled_from(["normal", "positive", "negative", "constant", "sparse"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = rng.standard_normal(shape)
    if style == "positive":
        w = np.abs(w) + 0.1
    elif style == "negative":
        w = -np.abs(w)
    elif style == "constant":
        w = np.full(shape, rng.choice([-1.0, 0.0, 1.0]) * rng.uniform(0.5, 2.0))
    elif style == "sparse":
        w = w * (rng.uniform(size=shape) < 0.3)
    return torch.from_numpy(w * magnitude).to(dtype)


names = st.text(min_size=1, max_size=12)


@st.composite
def state_dicts(draw, dtypes=(torch.float32,)):
    keys = draw(st.lists(names, min_size=1, max_size=5, unique=True))
    out = {}
    for key in keys:
        kind = draw(st.sampled_from(["weight", "weight", "bias", "buffer"]))
        if kind == "weight":
            out[key] = draw(weights(dtypes))
        elif kind == "bias":
            n = draw(st.integers(0, 6))
            out[key] = torch.from_numpy(np.random.default_rng(n).standard_normal(n)).float()
        else:
            dtype = draw(st.sampled_from([torch.int64, torch.bool, torch.uint8, torch.int32]))
            shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
            ints = np.random.default_rng(len(shape)).integers(-100, 100, size=shape)
            out[key] = torch.from_numpy(ints).to(dtype)
    return out


def check_state(original: dict, loaded: dict, bits: int, scheme: str, within_step) -> None:
    assert list(loaded) == list(original)
    for name, t in original.items():
        got = loaded[name]
        assert isinstance(got, torch.Tensor)
        assert got.dtype == t.dtype, name
        assert got.shape == t.shape, name
        assert got.device.type == "cpu"
        if t.is_floating_point() and t.dim() >= 2:
            if t.dtype == torch.float32:
                within_step(as_f32(t), as_f32(got), bits, scheme)
        else:
            assert same_bits(got, t), name


# --------------------------------------------------------------------------- round trips


@HYPO
@given(
    state=state_dicts(),
    bits=st.integers(1, 8),
    scheme=st.sampled_from(SCHEMES),
)
def test_save_load_round_trip(tmp_path, within_step, state, bits, scheme):
    path = tmp_path / "m.qpk"
    qpack.save(state, path, bits=bits, scheme=scheme)
    loaded = qpack.load(path)
    check_state(state, loaded, bits, scheme, within_step)
    info = qpack.inspect(path)
    assert [t["name"] for t in info["tensors"]] == list(state)
    for row, (name, t) in zip(info["tensors"], state.items(), strict=True):
        assert row["shape"] == list(t.shape)
        quantized = t.is_floating_point() and t.dim() >= 2
        assert (row["storage"] in ("packed", "huffman")) == quantized, name
        assert (row["storage"] == "raw") == (not quantized), name
        if quantized:
            assert row["bits"] == bits and row["scheme"] == scheme
            # Huffman is chosen only where it is smaller than fixed-width packing
            if row["storage"] == "packed":
                assert row["bytes"] == packed_size(t.numel(), bits)
            else:
                assert row["bytes"] < packed_size(t.numel(), bits)


@HYPO
@given(
    w=weights((torch.float16, torch.bfloat16, torch.float64)),
    bits=st.integers(1, 8),
    scheme=st.sampled_from(SCHEMES),
)
def test_other_float_dtypes_come_back_in_their_dtype(tmp_path, within_step, w, bits, scheme):
    path = tmp_path / "w.qpk"
    qpack.save({"w": w}, path, bits=bits, scheme=scheme)
    got = qpack.load(path)["w"]
    assert got.dtype == w.dtype and got.shape == w.shape
    # the decoder yields float32 (checked against the bound); the loader rounds it to dtype
    decoded = qpack.load_numpy(path)["w"]
    assert decoded.dtype == np.float32
    within_step(as_f32(w), decoded, bits, scheme)
    assert same_bits(got, torch.from_numpy(decoded).to(w.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_raw_floats_are_bit_exact_including_nan_and_inf(tmp_path, dtype):
    bias = torch.tensor([1.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-3, 3.14159])
    bias = bias.to(dtype)
    scalar = torch.tensor(2.5, dtype=dtype)
    qpack.save({"bias": bias, "scalar": scalar}, tmp_path / "b.qpk")
    got = qpack.load(tmp_path / "b.qpk")
    assert same_bits(got["bias"], bias)
    assert same_bits(got["scalar"], scalar) and got["scalar"].dim() == 0


@pytest.mark.parametrize(
    "dtype",
    [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool],
)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (2, 0, 3), (2, 3, 2, 2)])
def test_integer_buffers_are_exact(tmp_path, dtype, shape):
    rng = np.random.default_rng(len(shape))
    if dtype == torch.bool:
        t = torch.from_numpy(rng.integers(0, 2, size=shape).astype(bool))
    else:
        info = torch.iinfo(dtype)
        t = torch.from_numpy(
            rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=np.int64)
        ).to(dtype)
    qpack.save({"buf": t, "w": torch.ones(2, 2)}, tmp_path / "i.qpk", bits=2)
    got = qpack.load(tmp_path / "i.qpk")["buf"]
    assert same_bits(got, t)
    row = qpack.inspect(tmp_path / "i.qpk")["tensors"][0]
    assert row["storage"] == "raw" and row["bits"] == 8 * t.element_size()


def test_extreme_integer_values(tmp_path):
    t = torch.tensor([torch.iinfo(torch.int64).min, -1, 0, 1, torch.iinfo(torch.int64).max])
    qpack.save({"n": t}, tmp_path / "n.qpk")
    assert torch.equal(qpack.load(tmp_path / "n.qpk")["n"], t)


def test_tensor_variants_are_accepted(tmp_path):
    base = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    state = {
        "transposed": base.t(),  # non-contiguous
        "sliced": base[::2, 1:],
        "param": torch.nn.Parameter(base.clone()),
        "grad": base.clone().requires_grad_(True),
        "numpy": base.numpy().copy(),  # save accepts numpy arrays too
    }
    qpack.save(state, tmp_path / "v.qpk", bits=8)
    got = qpack.load(tmp_path / "v.qpk")
    for name in ("transposed", "sliced", "param", "grad"):
        want = state[name].detach()
        assert got[name].shape == want.shape
        check = qpack.decode(qpack.encode({"x": want.contiguous().numpy()}, bits=8))["x"]
        assert np.array_equal(got[name].numpy(), check), name
    assert got["numpy"].shape == (8, 6)
    assert not got["param"].requires_grad


# --------------------------------------------------------------------------- options


def test_bits_mapping_is_honoured(tmp_path):
    gen = torch.Generator().manual_seed(1)
    state = {
        "a.weight": torch.randn(4, 3, generator=gen),
        "b.weight": torch.randn(4, 3, generator=gen),
        "c.bias": torch.randn(5, generator=gen),
        "d.weight": torch.randn(4, 3, generator=gen),
        "e.bias": torch.randn(5, generator=gen),
    }
    qpack.save(state, tmp_path / "m.qpk", bits={"a.weight": 3, "b.weight": None, "c.bias": 5})
    rows = {r["name"]: r for r in qpack.inspect(tmp_path / "m.qpk")["tensors"]}
    assert rows["a.weight"]["storage"] in ("packed", "huffman") and rows["a.weight"]["bits"] == 3
    assert rows["b.weight"]["storage"] == "raw" and rows["b.weight"]["bits"] == 32
    assert rows["c.bias"]["storage"] in ("packed", "huffman") and rows["c.bias"]["bits"] == 5
    assert (
        rows["d.weight"]["storage"] in ("packed", "huffman") and rows["d.weight"]["bits"] == 8
    )  # default
    assert rows["e.bias"]["storage"] == "raw"
    got = qpack.load(tmp_path / "m.qpk")
    assert torch.equal(got["b.weight"], state["b.weight"])
    assert torch.equal(got["e.bias"], state["e.bias"])
    assert not torch.equal(got["a.weight"], state["a.weight"])


def test_bits_mapping_with_unknown_name_raises(tmp_path):
    path = tmp_path / "m.qpk"
    with pytest.raises(E.QpackError) as info:
        qpack.save({"w": torch.ones(2, 2)}, path, bits={"w": 4, "nope": 3})
    assert "nope" in str(info.value)
    assert info.value.code == "bad-input"
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("bad", [0, 9, True, 0.5, 8.5, float("nan"), "4", -1])
def test_bad_bits_raise(tmp_path, bad):
    with pytest.raises(E.QpackError):
        qpack.save({"w": torch.ones(2, 2)}, tmp_path / "m.qpk", bits=bad)
    with pytest.raises(E.QpackError):
        qpack.save({"w": torch.ones(2, 2)}, tmp_path / "m.qpk", bits={"w": bad})
    assert files_in(tmp_path) == []


def test_bits_for_integer_tensor_and_unknown_scheme_raise(tmp_path):
    with pytest.raises(E.QpackError) as info:
        qpack.save({"n": torch.arange(4).reshape(2, 2)}, tmp_path / "m.qpk", bits={"n": 4})
    assert "'n'" in str(info.value)
    with pytest.raises(E.QpackError):
        qpack.save({"w": torch.ones(2, 2)}, tmp_path / "m.qpk", scheme="nope")
    assert files_in(tmp_path) == []


def test_scheme_choice_is_recorded(tmp_path):
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    for scheme in SCHEMES:
        qpack.save({"w": w}, tmp_path / "m.qpk", bits=4, scheme=scheme)
        row = qpack.inspect(tmp_path / "m.qpk")["tensors"][0]
        assert row["scheme"] == scheme
        assert row["granularity"] == ("tensor" if scheme == SYM else "channel")
        assert len(row["scale"]) == (1 if scheme == SYM else 6)
    qpack.save({"w": w}, tmp_path / "d.qpk", bits=4, uniform=True)
    assert qpack.inspect(tmp_path / "d.qpk")["tensors"][0]["scheme"] == qpack.DEFAULT_SCHEME


# --------------------------------------------------------------------------- determinism, numpy


def sample_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {
        "conv.weight": torch.randn(6, 3, 3, 3, generator=gen),
        "conv.bias": torch.randn(6, generator=gen),
        "bn.running_mean": torch.randn(6, generator=gen),
        "bn.num_batches_tracked": torch.tensor(17),
        "fc.weight": torch.randn(5, 24, generator=gen).to(torch.bfloat16),
        "fc.bias": torch.randn(5, generator=gen).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "half.weight": torch.randn(4, 4, generator=gen).half(),
    }


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_save_is_deterministic(tmp_path, scheme, bits):
    state = sample_state()
    qpack.save(state, tmp_path / "a.qpk", bits=bits, scheme=scheme)
    qpack.save(state, tmp_path / "b.qpk", bits=bits, scheme=scheme)
    a = (tmp_path / "a.qpk").read_bytes()
    assert a == (tmp_path / "b.qpk").read_bytes()
    # and a different option gives a different file
    qpack.save(state, tmp_path / "c.qpk", bits=bits % 8 + 1, scheme=scheme)
    assert a != (tmp_path / "c.qpk").read_bytes()


def test_save_matches_numpy_encode(tmp_path):
    state = {k: v for k, v in sample_state().items() if v.dtype != torch.bfloat16}
    qpack.save(state, tmp_path / "a.qpk", bits=5, metadata={"model": "x"})
    blob = qpack.encode({k: v.numpy() for k, v in state.items()}, bits=5, metadata={"model": "x"})
    assert (tmp_path / "a.qpk").read_bytes() == blob


@pytest.mark.parametrize("budget", [0, 50, 1 << 26])
@pytest.mark.parametrize("kernel_copy", [True, False])
def test_payloads_past_the_memory_budget_wait_in_a_spool_file(
    tmp_path, monkeypatch, budget, kernel_copy
):
    """A save keeps encoded payloads in memory up to writer.SPOOL_MEMORY bytes and spools
    the rest to a temporary file (copied in the kernel, or through Python where that
    fails): the file is the same byte for byte, and the spool is gone afterwards."""
    from qpack import reader, writer

    state = {k: v for k, v in sample_state().items() if v.dtype != torch.bfloat16}
    blob = qpack.encode({k: v.numpy() for k, v in state.items()}, bits=5)
    header = reader.Reader(blob).header
    coded = [e.length for e in header.tensors if e.storage != "raw"]
    assert min(coded) < 50 < max(coded)  # the middle budget holds one payload, not the other
    spools = []
    made = writer.tempfile.TemporaryFile

    def spool(*args, **kwargs):
        spools.append(made(*args, **kwargs))
        return spools[-1]

    monkeypatch.setattr(writer, "SPOOL_MEMORY", budget)
    monkeypatch.setattr(writer.tempfile, "TemporaryFile", spool)
    if not kernel_copy:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    qpack.save(state, tmp_path / "a.qpk", bits=5)
    assert (tmp_path / "a.qpk").read_bytes() == blob
    assert len(spools) == (budget < sum(coded)) and all(f.closed for f in spools)
    assert files_in(tmp_path) == ["a.qpk"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_numpy_path_matches_torch_load(tmp_path, scheme):
    state = sample_state()
    path = tmp_path / "m.qpk"
    qpack.save(state, path, bits=4, scheme=scheme)
    torch_sd = qpack.load(path)
    from_file = qpack.load_numpy(path)
    from_bytes = qpack.decode(path.read_bytes())
    assert list(from_file) == list(from_bytes) == list(torch_sd)
    for name, t in torch_sd.items():
        for arrays in (from_file, from_bytes):
            a = arrays[name]
            assert isinstance(a, np.ndarray) and a.shape == tuple(t.shape)
            if t.dtype == torch.bfloat16 or (t.is_floating_point() and t.dim() >= 2):
                # decoded packed tensors (and raw bfloat16, which numpy lacks) are float32
                assert a.dtype == np.float32
                assert same_bits(torch.from_numpy(a).to(t.dtype), t), name
            else:
                assert same_bits(torch.from_numpy(a), t), name


def small_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 5),
    ).eval()


def test_load_strict_into_model(tmp_path):
    torch.manual_seed(0)
    model = small_model()
    path = tmp_path / "model.qpk"
    qpack.save(model.state_dict(), path, bits=8)
    fresh = small_model()
    result = fresh.load_state_dict(qpack.load(path), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, t in model.state_dict().items():
        got = fresh.state_dict()[name]
        if t.dim() < 2:
            assert torch.equal(got, t), name  # biases and BN buffers exact
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref, out = model(x), fresh(x)
    assert torch.allclose(ref, out, rtol=0.05, atol=0.05)
    assert not torch.equal(ref, out)  # the weights really were quantized


# --------------------------------------------------------------------------- inspect, metadata


def test_inspect_reports_header(tmp_path):
    state = sample_state()
    path = tmp_path / "m.qpk"
    qpack.save(state, path, bits=3, scheme=ASYM, metadata={"model": "unet", "note": "é ü"})
    info = qpack.inspect(path)
    assert info["version"] == "1.0"
    assert info["file_size"] == os.path.getsize(path)
    assert info["metadata"]["model"] == "unet" and info["metadata"]["note"] == "é ü"
    assert info["metadata"]["producer"] == f"qpack {qpack.__version__}"
    blob = path.read_bytes()
    start = data_start(blob)
    assert [r["name"] for r in info["tensors"]] == list(state)
    for row, (name, t) in zip(info["tensors"], state.items(), strict=True):
        assert row["shape"] == list(t.shape)
        assert row["dtype"] == str(t.dtype).removeprefix("torch.")
        assert row["offset"] % 64 == 0
        if t.is_floating_point() and t.dim() >= 2:
            assert row["storage"] in ("packed", "huffman")
            assert (row["bits"], row["scheme"]) == (3, ASYM)
            assert row["bytes"] == packed_size(t.numel(), 3)
            assert len(row["scale"]) == len(row["zero_point"]) == t.shape[0]
        else:
            assert (row["storage"], row["scheme"]) == ("raw", "raw")
            assert row["bits"] == 8 * t.element_size()
            assert row["bytes"] == t.numel() * t.element_size()
        payload = blob[start + row["offset"] : start + row["offset"] + row["bytes"]]
        assert row["crc32"] == f"{zlib.crc32(payload):08x}", name
    last = info["tensors"][-1]
    assert start + last["offset"] + last["bytes"] == len(blob)


def test_metadata_rules(tmp_path):
    path = tmp_path / "m.qpk"
    qpack.save({"w": torch.ones(2, 2)}, path, metadata={"a": "1", "": "", "producer": "me"})
    assert qpack.inspect(path)["metadata"] == {"a": "1", "": "", "producer": "me"}
    qpack.save({"w": torch.ones(2, 2)}, path)
    assert qpack.inspect(path)["metadata"] == {"producer": f"qpack {qpack.__version__}"}
    for bad in ({"a": 1}, {1: "a"}, {"a": None}):
        with pytest.raises(E.QpackError):
            qpack.save({"w": torch.ones(2, 2)}, tmp_path / "x.qpk", metadata=bad)
    assert not (tmp_path / "x.qpk").exists()


def test_empty_state_dict(tmp_path):
    qpack.save({}, tmp_path / "e.qpk")
    assert qpack.load(tmp_path / "e.qpk") == {}
    assert qpack.inspect(tmp_path / "e.qpk")["tensors"] == []


# --------------------------------------------------------------------------- bad input to save


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_non_finite_quantized_weight_raises(tmp_path, bad, dtype):
    w = torch.ones(3, 4, dtype=dtype)
    w[1, 2] = bad
    path = tmp_path / "m.qpk"
    with pytest.raises(E.QpackError) as info:
        qpack.save({"ok.weight": torch.ones(2, 2), "layer.weight": w}, path)
    assert info.value.tensor == "layer.weight"
    assert "'layer.weight'" in str(info.value)
    assert str(path) in str(info.value)
    assert info.value.code == "bad-input"
    assert files_in(tmp_path) == []
    # kept raw, the same tensor is stored exactly
    qpack.save({"layer.weight": w}, path, bits={"layer.weight": None})
    assert same_bits(qpack.load(path)["layer.weight"], w)


@pytest.mark.parametrize("value", [3, 2.5, "text", [1.0, 2.0], None, {"a": 1}])
def test_non_tensor_values_raise(tmp_path, value):
    with pytest.raises(E.QpackError) as info:
        qpack.save({"w": torch.ones(2, 2), "odd": value}, tmp_path / "m.qpk")
    assert "'odd'" in str(info.value)
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("value", [None, [("w", torch.ones(2))], torch.ones(2)])
def test_non_mapping_state_dict_raises(tmp_path, value):
    with pytest.raises(E.QpackError):
        qpack.save(value, tmp_path / "m.qpk")
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("dtype", [torch.complex64, torch.uint16, torch.float8_e4m3fn])
def test_unsupported_dtype_raises(tmp_path, dtype):
    with pytest.raises(E.QpackError) as info:
        qpack.save({"z": torch.zeros(2, 2).to(dtype)}, tmp_path / "m.qpk")
    assert "'z'" in str(info.value)


# --------------------------------------------------------------------------- file system


def test_failed_save_keeps_existing_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "m.qpk"
    qpack.save({"w": torch.ones(3, 3)}, path)
    before = path.read_bytes()
    bad = torch.ones(3, 3)
    bad[0, 0] = float("nan")
    # the NaN is found while the file is being written (after the temporary file exists)
    with pytest.raises(E.QpackError):
        qpack.save({"a": torch.zeros(50, 50), "w": bad}, path)
    with pytest.raises(E.QpackError):
        qpack.save({"w": object()}, path)
    with pytest.raises(E.QpackError):
        qpack.save({"w": torch.ones(2, 2)}, path, bits={"x": 2})
    assert files_in(tmp_path) == ["m.qpk"]
    assert path.read_bytes() == before
    assert torch.equal(qpack.load(path)["w"], torch.ones(3, 3))


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_os_failure_during_save_cleans_up(tmp_path, monkeypatch, failing):
    path = tmp_path / "m.qpk"
    qpack.save({"w": torch.ones(3, 3)}, path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError):
        qpack.save({"w": torch.zeros(40, 40)}, path)
    monkeypatch.undo()
    assert files_in(tmp_path) == ["m.qpk"]  # the temporary file is gone
    assert path.read_bytes() == before


def test_save_over_existing_file_replaces_it(tmp_path):
    path = tmp_path / "m.qpk"
    path.write_bytes(b"x" * 100_000)  # something bigger that is not a qpack file
    qpack.save({"first": torch.ones(2, 2)}, path)
    assert list(qpack.load(path)) == ["first"]
    qpack.save({"second": torch.arange(5)}, path)
    got = qpack.load(path)
    assert list(got) == ["second"] and torch.equal(got["second"], torch.arange(5))
    qpack.save({"second": torch.arange(5)}, tmp_path / "fresh.qpk")
    assert path.read_bytes() == (tmp_path / "fresh.qpk").read_bytes()
    assert files_in(tmp_path) == ["fresh.qpk", "m.qpk"]


def test_save_accepts_str_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    qpack.save({"w": torch.ones(2, 2)}, "rel.qpk")
    qpack.save({"w": torch.ones(2, 2)}, str(tmp_path / "abs.qpk"))
    assert (tmp_path / "rel.qpk").read_bytes() == (tmp_path / "abs.qpk").read_bytes()
    assert files_in(tmp_path) == ["abs.qpk", "rel.qpk"]


@pytest.mark.parametrize("reader", [qpack.load, qpack.inspect, qpack.load_numpy])
def test_directory_and_missing_paths_raise(tmp_path, reader):
    with pytest.raises(E.QpackError) as info:
        reader(tmp_path)
    assert str(tmp_path) in str(info.value)
    missing = tmp_path / "nope.qpk"
    with pytest.raises(E.QpackError) as info:
        reader(missing)
    assert str(missing) in str(info.value)


def test_load_device_argument(tmp_path):
    qpack.save({"w": torch.ones(2, 2)}, tmp_path / "m.qpk")
    got = qpack.load(tmp_path / "m.qpk", device=torch.device("cpu"))
    assert got["w"].device.type == "cpu"


@pytest.mark.parametrize("entropy", [False, True])
def test_fast_paths_match_the_numpy_decoder_bit_for_bit(tmp_path, entropy, monkeypatch):
    """Large tensors take the compiled kernels or else torch's CPU dequantizer, and large
    files decode on threads (with the kernels, or for Huffman codes); all must give
    exactly the numpy decoder's values."""
    from qpack import _threads, kernels, reader
    from qpack.device import TORCH_MIN_CODES

    monkeypatch.setattr(reader, "THREADS_MIN_CODES", 1)  # threads for any Huffman tensor
    rng = np.random.default_rng(11)
    rows = -(-TORCH_MIN_CODES // 1000)
    state = {
        f"w{bits}": torch.from_numpy((rng.standard_normal((rows, 1000)) * 0.05).astype(np.float32))
        for bits in (3, 4, 8)
    }
    state["small"] = torch.randn(16, 9)
    path = tmp_path / "big.qpk"
    qpack.save(state, path, bits={f"w{b}": b for b in (3, 4, 8)}, entropy=entropy)
    threaded = entropy or kernels.native is not None
    with reader.Reader(path) as r:
        assert (r.default_workers() > 1) == (threaded and _threads.cpu_count() > 1)
        storages = {e.storage for e in r.header.tensors if e.name != "small"}
        assert storages == {"huffman" if entropy else "packed"}
    with monkeypatch.context() as numpy_only:
        numpy_only.setattr(kernels, "native", None)
        with reader.Reader(path) as r:
            reference = dict((e.name, a) for e, a in r.arrays(workers=1))
    loaded = qpack.load(path)
    for name, tensor in loaded.items():
        assert same_bits(tensor, torch.from_numpy(reference[name])), name


@pytest.mark.parametrize("entropy", [True, False])
def test_quantized_float64_tensors_widen_in_place_to_the_decoded_values(tmp_path, entropy):
    """A quantized float64 tensor loads as float64 holding exactly the float32 values the
    spec decodes (widened in place, block by block, in its own memory)."""
    sd = {
        "big": torch.randn(300, 701, dtype=torch.float64),
        "small": torch.randn(3, 5, dtype=torch.float64),
        "empty": torch.zeros(0, 4, dtype=torch.float64),
    }
    path = tmp_path / "f64.qpk"
    qpack.save(sd, path, bits=6, uniform=True, entropy=entropy)
    loaded, arrays = qpack.load(path), qpack.load_numpy(path)
    with qpack.open(path) as f:
        lazy = f.get_tensor("big")
    for name in sd:
        assert loaded[name].dtype == torch.float64
        assert np.array_equal(loaded[name].numpy(), arrays[name].astype(np.float64))
    assert torch.equal(lazy, loaded["big"])
