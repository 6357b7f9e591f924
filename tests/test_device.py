"""qpack.device: decoding with torch ops on a device gives exactly the numpy decoder's bits
(compared as integer bit patterns, so -0.0 and NaN payloads count), and fails alike."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qpack
from qpack import device as qdevice
from qpack import errors as E
from qpack import reader as qreader
from qpack.bitpack import pack_codes, packed_size, unpack_codes
from qpack.container import TensorEntry
from qpack.decoder import decode_payload
from qpack.device import _unpack, decode_on_device
from qpack.dtypes import dtype_name
from qpack.numpy import encode
from qpack.plan import resolve
from qpack.reader import Reader
from qpack.schemes import SCHEMES
from qpack.writer import encode_chunks

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# every test runs on the CPU here and, where a GPU is present, on it too
DEVICES = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
HYPO = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOATS = ("float32", "float16", "bfloat16", "float64")
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, on the CPU."""
    return t.detach().cpu().contiguous().view(INT_VIEW[t.element_size()])


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(_bits(got), _bits(want))


def numpy_tensor(entry: TensorEntry, array: np.ndarray) -> torch.Tensor:
    """The numpy decoder's array as a tensor of the original dtype, as qpack.api does."""
    if entry.storage == "raw" and entry.dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array).to(getattr(torch, entry.dtype))


def check_file(blob: bytes, device: str = "cpu") -> list[TensorEntry]:
    """Decode every tensor on ``device`` and compare it with the numpy decoder."""
    with Reader(blob) as reader:
        for entry in reader.header.tensors:
            got = decode_on_device(entry, reader.payload(entry), device, path=reader.path)
            assert got.device.type == torch.device(device).type
            assert_same(got, numpy_tensor(entry, reader.array(entry.name)))
        return reader.header.tensors


def outcome(fn) -> tuple | None:
    """The error a call raises, as (class, message), or None."""
    try:
        fn()
    except E.QpackError as exc:
        return type(exc), str(exc)
    return None


def to_blob(items: list[tuple[str, np.ndarray, str]], **options) -> bytes:
    chunks = encode_chunks(items, resolve(items, **options))
    return b"".join(bytes(c) if isinstance(c, np.ndarray) else c for c in chunks)


# --------------------------------------------------------------------------- vectors


@DEVICES
@pytest.mark.parametrize("case", MANIFEST["valid"], ids=lambda c: c["file"])
def test_valid_vector_decodes_alike(case, device):
    check_file((VECTORS / case["file"]).read_bytes(), device)


def test_vectors_cover_every_width_and_storage():
    seen = set()
    for case in MANIFEST["valid"]:
        with Reader((VECTORS / case["file"]).read_bytes()) as reader:
            seen |= {(e.storage, e.bits) for e in reader.header.tensors}
    assert {("packed", b) for b in range(1, 9)} <= seen
    assert any(s == "huffman" for s, _ in seen) and any(s == "raw" for s, _ in seen)


@DEVICES
@pytest.mark.parametrize("case", MANIFEST["invalid"], ids=lambda c: c["file"])
def test_invalid_vector_fails_alike(case, device):
    """Where a tensor of an invalid file reaches decoding (its header and CRC are fine), the
    device decoder raises what the numpy decoder raises, or returns the same bits."""
    try:
        reader = Reader((VECTORS / case["file"]).read_bytes())
    except E.QpackError:
        return  # rejected before any tensor is decoded
    with reader:
        for entry in reader.header.tensors:
            try:
                payload = reader.payload(entry)
            except E.DataChecksumError:
                continue
            want = outcome(lambda e=entry, p=payload: decode_payload(e, p, reader.path))
            got = outcome(
                lambda e=entry, p=payload: decode_on_device(e, p, device, path=reader.path)
            )
            assert got == want
            if want is None:
                got = decode_on_device(entry, payload, device, path=reader.path)
                assert_same(got, numpy_tensor(entry, decode_payload(entry, payload)))
            else:
                assert want[0].code == case["error"]


# --------------------------------------------------------------------------- round trips


@st.composite
def quantized_files(draw) -> bytes:
    dtype = draw(st.sampled_from(FLOATS))
    scheme = draw(st.sampled_from(sorted(SCHEMES)))
    per_layer = scheme.endswith("per-layer")  # per-channel needs a dimension
    shape = draw(hnp.array_shapes(min_dims=0 if per_layer else 1, max_dims=3, max_side=12))
    limit = 65504.0 if dtype == "float16" else 2.0**100
    elements = st.floats(-limit, limit, width=32)
    if draw(st.booleans()):  # few distinct values: Huffman coding pays off
        elements = st.sampled_from(draw(st.lists(elements, min_size=1, max_size=4)))
    values = draw(hnp.arrays(np.float32, shape, elements=elements))
    if dtype == "bfloat16":
        array = (values.view(np.uint32) >> 16).astype(np.uint16)
    else:
        array = values.astype(dtype)
    bits = draw(st.integers(1, 8) | st.sampled_from([1.6, 2.5, 3.3, 4.5, 6.2, 7.9]))
    entropy = draw(st.booleans())
    bias = np.arange(3, dtype=np.float32)
    try:
        return to_blob(
            [("w", array, dtype), ("b", bias, "float32")],
            bits={"w": bits},
            scheme=scheme,
            entropy=entropy,
        )
    except E.EncodeError:  # symmetric-per-layer takes whole widths only
        assume(False)


@DEVICES
@HYPO
@given(quantized_files())
def test_quantized_round_trip_matches_numpy(device, blob):
    entries = check_file(blob, device)
    assert entries[0].storage in ("packed", "huffman")
    event(f"{entries[0].storage}, {entries[0].granularity}")


@DEVICES
@HYPO
@given(
    hnp.arrays(
        st.sampled_from(["<f4", "<f2", "<f8", "<i8", "<i4", "<i2", "i1", "u1", "?", "<u2"]),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
    )
)
def test_raw_round_trip_is_bit_exact(device, array):
    # "<u2" stands for bfloat16 bit patterns (any, NaN payloads included)
    dtype = "bfloat16" if array.dtype == np.uint16 else None
    items = [("x", array, dtype or dtype_name(array))]
    check_file(to_blob(items, bits={"x": None}), device)


@DEVICES
def test_huffman_and_subnormals_round_trip(device):
    rng = np.random.default_rng(0)
    peaked = rng.laplace(size=(64, 40)).astype(np.float32) * 1e-3
    tiny = (rng.standard_normal((5, 7)) * 1e-40).astype(np.float32)  # subnormal steps
    blob = encode({"peaked": peaked, "tiny": tiny}, bits=4.5, entropy=True)
    entries = check_file(blob, device)
    assert entries[0].storage == "huffman"
    with Reader(blob) as reader:
        assert np.any(np.abs(reader.array("tiny")) < np.finfo(np.float32).tiny)


@DEVICES
@settings(max_examples=150, deadline=None)
@given(st.integers(1, 8), st.data())
def test_unpack_matches_numpy(device, bits, data):
    codes = np.array(data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=70)), np.uint8)
    packed = pack_codes(codes, bits)
    got = _unpack(torch.from_numpy(packed).to(device), bits, codes.size)
    assert got.dtype == torch.uint8 and got.device.type == device
    assert np.array_equal(got.cpu().numpy(), unpack_codes(packed, bits, codes.size))


f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@DEVICES
@HYPO
@given(
    st.integers(1, 8),
    st.sampled_from(["tensor", "channel"]),
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5),
    st.sampled_from(FLOATS),
    st.data(),
)
def test_arbitrary_affine_parameters(device, bits, granularity, shape, dtype, data):
    """Hand-built headers: any finite scale and zero point (negative, subnormal, huge)
    decode alike, and overflow is refused alike."""
    groups = shape[0] if granularity == "channel" else 1
    numel = int(np.prod(shape))
    codes = data.draw(hnp.arrays(np.uint8, numel, elements=st.integers(0, (1 << bits) - 1)))
    entry = TensorEntry(
        "t",
        shape,
        dtype,
        "packed",
        0,
        packed_size(numel, bits),
        0,
        bits=bits,
        dequant="affine",
        granularity=granularity,
        scale=data.draw(hnp.arrays(np.float32, groups, elements=f32)),
        zero_point=data.draw(hnp.arrays(np.float32, groups, elements=f32)),
    )
    payload = pack_codes(codes, bits).tobytes()
    want = outcome(lambda: decode_payload(entry, payload, "p"))
    assert outcome(lambda: decode_on_device(entry, payload, device, path="p")) == want
    if want is None:
        got = decode_on_device(entry, memoryview(payload), torch.device(device))
        assert_same(got, numpy_tensor(entry, decode_payload(entry, payload)))


# --------------------------------------------------------------------------- errors


def _entry_and_payload(blob: bytes, name: str) -> tuple[TensorEntry, bytes]:
    with Reader(blob) as reader:
        entry = reader.entry(name)
        return entry, reader.payload(entry)


@DEVICES
def test_nonzero_padding_bits_are_bad_data(device):
    w = np.linspace(-1, 1, 9, dtype=np.float32).reshape(3, 3)  # 27 bits at 3 bits: 5 spare
    entry, payload = _entry_and_payload(encode({"w": w}, bits=3, entropy=False), "w")
    assert entry.storage == "packed"
    bad = bytearray(payload)
    bad[-1] |= 0x80
    with pytest.raises(E.DataError, match="padding bits") as info:
        decode_on_device(entry, bytes(bad), device, path="f.qpk")
    assert info.value.tensor == "w" and info.value.path == "f.qpk"
    with pytest.raises(E.DataError):
        decode_payload(entry, bytes(bad))
    decode_on_device(entry, np.frombuffer(payload, np.uint8), device)  # the original is fine


@DEVICES
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_overflowing_scale_is_a_header_error(granularity, device):
    w = np.ones((2, 4), dtype=np.float32)
    entry, payload = _entry_and_payload(
        encode({"w": w}, bits=8, entropy=False, scheme="asymmetric-per-channel"), "w"
    )
    scale = np.ones(2 if granularity == "channel" else 1, np.float32)
    scale[-1] = 3e38  # times 255 overflows float32
    bad = dataclasses.replace(
        entry, granularity=granularity, scale=scale, zero_point=np.zeros_like(scale)
    )
    with pytest.raises(E.HeaderError, match="overflows float32") as info:
        decode_on_device(bad, payload, device, path="f.qpk")
    assert info.value.tensor == "w" and info.value.path == "f.qpk"
    assert outcome(lambda: decode_payload(bad, payload, "f.qpk")) == (
        type(info.value),
        str(info.value),
    )


@DEVICES
def test_bool_bytes_must_be_0_or_1(device):
    entry, payload = _entry_and_payload(encode({"m": np.array([True, False, True])}), "m")
    assert_same(decode_on_device(entry, payload, device), torch.tensor([True, False, True]))
    with pytest.raises(E.DataError, match="bool"):
        decode_on_device(entry, b"\x01\x02\x00", device, path="f.qpk")


@DEVICES
def test_payload_of_the_wrong_size_is_refused(device):
    entry, payload = _entry_and_payload(encode({"v": np.zeros(4, np.float32)}), "v")
    with pytest.raises(E.LayoutError):
        decode_on_device(entry, payload[:-1], device)


def test_raw_result_does_not_alias_the_payload():
    entry, payload = _entry_and_payload(encode({"v": np.arange(4, dtype=np.int32)}), "v")
    buf = np.frombuffer(payload, np.uint8).copy()
    out = decode_on_device(entry, buf, "cpu")
    buf[:] = 0
    assert out.tolist() == [0, 1, 2, 3]


def test_import_qpack_does_not_import_the_device_module():
    code = "import sys, qpack; assert 'qpack.device' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --------------------------------------------------------------------------- the API


def _mixed_state() -> dict[str, torch.Tensor]:
    """Tensors of every route: packed and Huffman-coded at several widths and granularities,
    float16, exact biases and integer buffers; some over PINNED_MIN_BYTES, some under."""
    gen = torch.Generator().manual_seed(5)
    return {
        "conv.weight": torch.randn(96, 32, 3, 3, generator=gen) * 0.05,  # 27,648 weights
        "fc.weight": (torch.randn(300, 400, generator=gen) * 0.02).half(),
        "fc.bias": torch.randn(300, generator=gen),
        "peaked.weight": torch.distributions.Laplace(0.0, 1e-3).sample((64, 40)),
        "bn.num_batches_tracked": torch.tensor(7),
    }


@DEVICES
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("pinned_min", [0, 1 << 40])
def test_load_on_device_matches_cpu_load(
    tmp_path, monkeypatch, device, entropy, workers, pinned_min
):
    """qpack.load(device=...) (host checks on worker threads, pinned or plain copies)
    gives the CPU load's names, order, dtypes and bits, on the device."""
    monkeypatch.setattr(qdevice, "PINNED_MIN_BYTES", pinned_min)
    monkeypatch.setattr(qdevice, "host_workers", lambda reader: workers)
    path = tmp_path / "m.qpk"
    bits = {"conv.weight": 3, "fc.weight": 8, "peaked.weight": 4.5}
    qpack.save(_mixed_state(), path, bits=bits, entropy=entropy)
    want = qpack.load(path)
    got = qpack.load(path, device=device)
    assert list(got) == list(want)
    for name, tensor in got.items():
        assert tensor.device.type == device
        assert_same(tensor, want[name])
    with qpack.open(path, device=device) as lazy:
        assert_same(lazy.get("fc.weight"), want["fc.weight"])
        assert lazy.get("conv.weight").device.type == device


@DEVICES
def test_load_on_device_reports_a_corrupt_tensor_like_the_cpu(tmp_path, device):
    path = tmp_path / "m.qpk"
    qpack.save(_mixed_state(), path, bits=4)
    blob = bytearray(path.read_bytes())
    with Reader(bytes(blob)) as reader:
        entry = reader.entry("fc.weight")
        blob[reader.header.data_start + entry.offset + 5] ^= 0x10
    path.write_bytes(bytes(blob))
    want = outcome(lambda: qpack.load(path))
    assert want is not None and want[0] is E.DataChecksumError and "fc.weight" in want[1]
    assert outcome(lambda: qpack.load(path, device=device)) == want


@DEVICES
def test_load_into_a_model_on_the_device(tmp_path, device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16))
    path = tmp_path / "m.qpk"
    qpack.save(model.state_dict(), path, bits=4)
    want = qpack.load(path)
    model.to(device)
    qpack.load_into(model, path)
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == device
        assert_same(tensor, want[name])


def test_host_threads_for_large_tensors_or_huffman_streams(tmp_path, monkeypatch):
    """A device load reads and checks small packed tensors on one thread (hand-offs cost
    more than they save) and uses every CPU for large tensors or many Huffman codes."""
    monkeypatch.setattr(qreader, "cpu_count", lambda: 6)
    monkeypatch.setattr(qdevice, "cpu_count", lambda: 6)
    monkeypatch.setattr(qreader, "THREADS_MIN_CODES", 1 << 14)
    rng = np.random.default_rng(3)
    small = {f"w{i}": rng.standard_normal((64, 64)).astype(np.float32) for i in range(4)}
    big = {"w": rng.standard_normal((1024, 1100)).astype(np.float32)}  # 1.1 MB at 8 bits
    cases = ((small, False, 1), (small, True, 6), (big, False, 6))
    for state, entropy, want in cases:
        blob = encode(state, bits=8, entropy=entropy)
        with Reader(blob) as reader:
            assert {e.storage for e in reader.header.tensors} == {
                "huffman" if entropy else "packed"
            }
            assert qdevice.host_workers(reader) == want, (len(state), entropy)
