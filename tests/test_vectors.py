"""Conformance: every committed vector decodes (or fails) exactly as the manifest says, and
the committed files are exactly what tools/make_vectors.py builds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import qpack
from qpack.reader import Reader

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())


def _generator():
    spec = importlib.util.spec_from_file_location("make_vectors", ROOT / "tools/make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_enough_vectors():
    assert len(MANIFEST["valid"]) >= 12
    assert len(MANIFEST["invalid"]) >= 8
    bits = {
        t["bits"]
        for v in MANIFEST["valid"]
        for t in json.loads((VECTORS / v["expected"]).read_text())["tensors"]
        if t["storage"] in ("packed", "huffman")
    }
    assert bits == set(range(1, 9))


def test_committed_vectors_match_generator(tmp_path):
    generated = _generator().build()
    committed = {
        p.relative_to(VECTORS).as_posix(): p.read_bytes() for p in VECTORS.rglob("*") if p.is_file()
    }
    assert sorted(generated) == sorted(committed)
    drift = [name for name in generated if generated[name] != committed[name]]
    assert not drift, f"spec/vectors drifted from tools/make_vectors.py: {drift}"


@pytest.mark.parametrize("case", MANIFEST["valid"], ids=lambda c: c["file"])
def test_valid_vector_decodes_bit_exactly(case):
    blob = (VECTORS / case["file"]).read_bytes()
    expected = json.loads((VECTORS / case["expected"]).read_text())
    with Reader(blob) as reader:
        assert reader.metadata == expected["metadata"]
        decoded = list(reader.arrays())
    assert [e.name for e, _ in decoded] == [t["name"] for t in expected["tensors"]]
    for (entry, array), want in zip(decoded, expected["tensors"], strict=True):
        assert list(array.shape) == want["shape"]
        assert entry.dtype == want["dtype"] and entry.storage == want["storage"]
        le = array.astype(array.dtype.newbyteorder("<"))
        assert le.tobytes().hex() == want["data"], entry.name


@pytest.mark.parametrize("case", MANIFEST["valid"], ids=lambda c: c["file"])
def test_valid_vector_loads_through_every_api(case, tmp_path):
    path = VECTORS / case["file"]
    numpy_arrays = qpack.load_numpy(path)
    tensors = qpack.load(path)
    assert list(numpy_arrays) == list(tensors)
    for name, tensor in tensors.items():
        # numpy has no bfloat16: load_numpy widens it exactly to float32
        as_numpy = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        expected = numpy_arrays[name]
        if as_numpy.dtype == np.float64:  # a decoded float32 tensor restored exactly
            expected = expected.astype(np.float64)
        assert as_numpy.dtype == expected.dtype
        np.testing.assert_array_equal(as_numpy, expected)


@pytest.mark.parametrize("case", MANIFEST["invalid"], ids=lambda c: c["file"])
def test_invalid_vector_raises_its_code(case):
    path = VECTORS / case["file"]
    cls = qpack.errors.ERROR_CLASSES[case["error"]]
    with pytest.raises(cls) as info:
        qpack.load_numpy(path)
    assert info.value.code == case["error"]
    assert str(path) in str(info.value)
    with pytest.raises(cls):
        qpack.decode(path.read_bytes())


def test_per_tensor_defects_name_their_tensor():
    """Spec section 10: an invalid vector found by a check of one tensor names it."""
    for case in MANIFEST["invalid"]:
        if case["error"] in ("bad-data", "data-checksum"):
            assert "tensor" in case, case["file"]
        if "tensor" in case:
            with Reader((VECTORS / case["file"]).read_bytes()) as reader:
                assert case["tensor"] in [e.name for e in reader.header.tensors], case["file"]


@pytest.mark.parametrize(
    "case", [c for c in MANIFEST["invalid"] if "tensor" in c], ids=lambda c: c["file"]
)
def test_invalid_vector_raises_when_only_its_tensor_is_decoded(case):
    cls = qpack.errors.ERROR_CLASSES[case["error"]]
    with Reader((VECTORS / case["file"]).read_bytes()) as reader, pytest.raises(cls) as info:
        reader.array(case["tensor"])
    assert info.value.code == case["error"]
    assert info.value.tensor in (case["tensor"], None)
