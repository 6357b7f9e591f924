"""Files over 4 GiB: 64-bit offsets end to end, without the test needing the memory.

The input is a 4 GiB+ raw tensor memory-mapped from a sparse file; the writer streams it
(and leaves its all-zero chunks as holes), so neither side holds it in memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import qpack
from qpack.reader import Reader

BIG = (1 << 32) + 3 * 4096 + 17  # bytes of the raw tensor: offsets past it need 33 bits


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("large")
    source = folder / "zeros.bin"
    with open(source, "wb") as f:
        f.truncate(BIG)
    if os.stat(source).st_blocks * 512 > 1 << 20:
        pytest.skip("this file system does not keep sparse files")
    rng = np.random.default_rng(0)
    small = (rng.standard_normal((32, 3, 3, 3)) * 0.1).astype(np.float32)
    state = {
        "big": np.memmap(source, dtype=np.uint8, mode="r", shape=(BIG,)),
        "small": small,
        "bias": np.arange(32, dtype=np.float32),
    }
    path = folder / "big.qpk"
    qpack.save(state, path, bits=4)
    return path, small


def test_offsets_past_4_gib_and_a_sparse_output(big_file):
    path, _ = big_file
    assert os.path.getsize(path) > BIG
    assert os.stat(path).st_blocks * 512 < 64 << 20  # the zeros are holes, not written bytes
    with Reader(path) as reader:
        entries = {e.name: e for e in reader.header.tensors}
        assert entries["big"].length == BIG and entries["big"].storage == "raw"
        assert entries["small"].offset > 1 << 32
        assert reader.header.data_start + entries["bias"].offset + 128 == os.path.getsize(path)


def test_get_reads_only_that_tensors_bytes(big_file, monkeypatch):
    path, small = big_file
    read = []
    real_preadv = os.preadv

    def counting_preadv(fd, buffers, offset):
        got = real_preadv(fd, buffers, offset)
        read.append((offset, got))
        return got

    monkeypatch.setattr(os, "preadv", counting_preadv)
    with qpack.open(path) as f:
        read.clear()  # the header was read on opening
        out = f.get("small")
        bias = f.get("bias")
    assert sum(size for _, size in read) < 4096
    assert all(offset > 1 << 32 for offset, _ in read)
    assert out.shape == small.shape and out.dtype == torch.float32
    assert np.abs(out.numpy() - small).max() <= np.abs(small).max() / 7 + 1e-6
    assert torch.equal(bias, torch.arange(32, dtype=torch.float32))


@pytest.mark.skipif(sys.platform != "linux", reason="uses RLIMIT_AS")
def test_reading_one_tensor_fits_in_far_less_memory_than_the_file(big_file):
    path, small = big_file
    script = textwrap.dedent(
        f"""
        import resource, sys
        limit = 1 << 30  # 1 GiB of address space, a quarter of the file
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        import numpy as np
        from qpack.reader import Reader
        with Reader({str(path)!r}) as reader:
            np.save(sys.stdout.buffer, reader.array("small"))
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    import io

    got = np.load(io.BytesIO(res.stdout))
    with qpack.open(path) as f:
        assert np.array_equal(got, f.get("small").numpy())
