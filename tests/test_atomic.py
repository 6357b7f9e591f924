"""qpack.atomic: outputs are written atomically and never destroy a user's data."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from qpack import errors as E
from qpack.atomic import (
    SPARSE_MIN,
    WRITE_CHUNK,
    check_output,
    same_file,
    write_atomic,
)

ROOT = Path(__file__).resolve().parent.parent
POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX file types and permissions")


class FileRange:
    """A chunk copied file to file, like the writer's spool ranges: kernel copy where it
    works, else read and written; appends to ``out``, which it seeks to its end."""

    def __init__(self, data: bytes):
        self.data = data

    def copy_to(self, out) -> None:
        with tempfile.TemporaryFile() as spool:
            spool.write(self.data)
            spool.flush()
            out.flush()
            offset, left = 0, len(self.data)
            try:
                while left:
                    done = os.copy_file_range(spool.fileno(), out.fileno(), left, offset)
                    if not done:
                        break
                    offset, left = offset + done, left - done
            except (AttributeError, OSError):
                pass  # a pipe or a device: not a regular file
            out.seek(0, os.SEEK_END)
            spool.seek(offset)
            out.write(spool.read(left))


class Untouched:
    """Chunks that fail the test if anyone starts reading them."""

    def __iter__(self):
        raise AssertionError("chunks were read although the output was refused")


def leftovers(*folders: Path) -> list[str]:
    """Temporary files left in ``folders``."""
    return [p.name for folder in folders for p in folder.iterdir() if p.name.endswith(".tmp")]


def _no_rename(*args, **kwargs):
    raise AssertionError("a pipe or device output must be written into, never renamed over")


@pytest.fixture
def no_renames(monkeypatch):
    """Fail a write through a pipe or device that tries to replace it: run as root, such a
    bug would otherwise turn /dev/null into a regular file for the whole machine."""
    for name in ("replace", "rename", "link"):
        monkeypatch.setattr(os, name, _no_rename)


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


# ---------------------------------------------------------------------------- basics


def test_new_file_written_and_no_temporary_left(tmp_path):
    out = tmp_path / "model.qpk"
    write_atomic(out, [b"head", bytearray(b"-"), memoryview(b"tail")])
    assert out.read_bytes() == b"head-tail"
    assert out.stat().st_nlink == 1  # the temporary name is gone, not a second link
    assert leftovers(tmp_path) == []


def test_missing_folder_is_a_write_error_naming_the_path(tmp_path):
    out = tmp_path / "nowhere" / "model.qpk"
    with pytest.raises(E.WriteError, match="cannot write") as info:
        write_atomic(out, [b"x"])
    assert isinstance(info.value, OSError)
    assert info.value.path == str(out)
    assert str(out) in str(info.value)


# ------------------------------------------------------------------ output == input


def _spellings(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "sub").mkdir()
    return {
        "same path": tmp_path / "model.pt",
        "another spelling": tmp_path / "sub" / ".." / "." / "model.pt",
        "symlink to it": tmp_path / "link.pt",
        "hard link": tmp_path / "hard.pt",
    }


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(
    "spelling", ["same path", "another spelling", "symlink to it", "hard link"]
)
def test_output_that_is_the_input_is_refused(tmp_path, spelling, overwrite):
    model = tmp_path / "model.pt"
    model.write_bytes(b"float checkpoint")
    (tmp_path / "link.pt").symlink_to("model.pt")
    os.link(model, tmp_path / "hard.pt")
    out = _spellings(tmp_path)[spelling]
    with pytest.raises(E.OutputError, match="same file as the input") as info:
        write_atomic(out, Untouched(), overwrite=overwrite, inputs=[str(model)])
    assert info.value.code == "bad-output"
    assert str(out) in str(info.value)
    assert model.read_bytes() == b"float checkpoint"
    assert (tmp_path / "link.pt").is_symlink()
    assert leftovers(tmp_path) == []
    with pytest.raises(E.OutputError):
        check_output(out, overwrite=overwrite, inputs=[model])


def test_input_given_through_a_symlink_is_caught(tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"float checkpoint")
    (tmp_path / "link.pt").symlink_to(model)
    with pytest.raises(E.OutputError, match="same file"):
        write_atomic(model, Untouched(), overwrite=True, inputs=[tmp_path / "link.pt"])
    with pytest.raises(E.OutputError, match="same file"):
        write_atomic(model, Untouched(), overwrite=True, inputs=tmp_path / "link.pt")
    assert model.read_bytes() == b"float checkpoint"


def test_other_and_missing_inputs_do_not_block(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"float")
    out = tmp_path / "model.qpk"
    inputs = [tmp_path / "model.pt", tmp_path / "missing.pt"]
    check_output(out, inputs=inputs)
    check_output(out, inputs=str(tmp_path / "model.pt"))  # one input given bare
    write_atomic(out, [b"packed"], inputs=inputs)
    assert out.read_bytes() == b"packed"


def test_same_file(tmp_path):
    a = tmp_path / "a"
    a.write_bytes(b"x")
    (tmp_path / "b").write_bytes(b"x")
    (tmp_path / "s").symlink_to(a)
    os.link(a, tmp_path / "h")
    assert same_file(a, tmp_path / "s") and same_file(a, tmp_path / "h")
    assert same_file(a, tmp_path / "." / "a")
    assert not same_file(a, tmp_path / "b")
    assert not same_file(a, tmp_path / "missing")


# ------------------------------------------------------------------ existing outputs


def test_existing_output_refused_without_overwrite(tmp_path):
    out = tmp_path / "model.qpk"
    out.write_bytes(b"precious")
    with pytest.raises(E.OutputError, match="already exists; not overwritten .*--force"):
        write_atomic(out, Untouched())
    with pytest.raises(E.OutputError, match="already exists"):
        check_output(out)
    assert out.read_bytes() == b"precious"
    assert leftovers(tmp_path) == []


def test_existing_output_replaced_with_overwrite(tmp_path):
    out = tmp_path / "model.qpk"
    out.write_bytes(b"old bytes, longer than the new ones")
    check_output(out, overwrite=True)
    write_atomic(out, [b"new"], overwrite=True)
    assert out.read_bytes() == b"new"
    assert leftovers(tmp_path) == []


def test_directory_refused(tmp_path):
    with pytest.raises(E.OutputError, match="is a directory"):
        write_atomic(tmp_path, Untouched(), overwrite=True)
    assert tmp_path.is_dir()


def test_replacing_leaves_other_hard_links_with_the_old_bytes(tmp_path):
    out = tmp_path / "model.qpk"
    out.write_bytes(b"old")
    os.link(out, tmp_path / "backup.qpk")
    write_atomic(out, [b"new"], overwrite=True)
    assert out.read_bytes() == b"new"
    assert (tmp_path / "backup.qpk").read_bytes() == b"old"


# --------------------------------------------------------------------------- symlinks


@POSIX
def test_symlink_stays_a_link_and_its_target_is_replaced(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "links").mkdir()
    real = tmp_path / "store" / "model.qpk"
    real.write_bytes(b"old")
    real.chmod(0o640)
    link = tmp_path / "links" / "model.qpk"
    link.symlink_to(Path("..") / "store" / "model.qpk")  # relative to the link's folder
    with pytest.raises(E.OutputError, match="already exists"):
        write_atomic(link, Untouched())
    write_atomic(link, [b"new"], overwrite=True)
    assert link.is_symlink() and os.readlink(link) == str(Path("..") / "store" / "model.qpk")
    assert real.read_bytes() == b"new"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert leftovers(tmp_path / "store", tmp_path / "links") == []


@POSIX
def test_symlink_chain_is_followed(tmp_path):
    real = tmp_path / "real.qpk"
    real.write_bytes(b"old")
    (tmp_path / "one").symlink_to("real.qpk")
    (tmp_path / "two").symlink_to(tmp_path / "one")
    write_atomic(tmp_path / "two", [b"new"], overwrite=True)
    assert (tmp_path / "two").is_symlink() and (tmp_path / "one").is_symlink()
    assert real.read_bytes() == b"new"


@POSIX
def test_dangling_symlink_creates_the_file_it_names(tmp_path):
    link = tmp_path / "model.qpk"
    link.symlink_to("target.qpk")
    write_atomic(link, [b"new"])
    assert link.is_symlink()
    assert (tmp_path / "target.qpk").read_bytes() == b"new"


@POSIX
def test_dangling_symlink_into_a_missing_folder_is_a_write_error(tmp_path):
    link = tmp_path / "model.qpk"
    link.symlink_to(tmp_path / "missing" / "target.qpk")
    with pytest.raises(E.WriteError):
        write_atomic(link, [b"new"])
    assert link.is_symlink()


@POSIX
def test_symlink_loop_refused(tmp_path):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(E.OutputError, match="symlink loop"):
        write_atomic(tmp_path / "a", Untouched(), overwrite=True)
    assert (tmp_path / "a").is_symlink() and (tmp_path / "b").is_symlink()


# ----------------------------------------------------------------- pipes and devices


def _payload() -> tuple[list, bytes]:
    """Chunks with a large zero run (must be written, not seeked, on a stream) and a
    file-to-file chunk, and the bytes they stand for."""
    zeros = bytes(SPARSE_MIN + 5)
    chunks = [b"head", zeros, FileRange(b"spooled"), np.arange(3, dtype="<u2")]
    return chunks, b"head" + zeros + b"spooled" + np.arange(3, dtype="<u2").tobytes()


@POSIX
def test_fifo_is_written_through(tmp_path, no_renames):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    chunks, expected = _payload()
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_atomic(fifo, chunks)  # no overwrite needed: a pipe holds no data to lose
    reader.join(30)
    assert received == [expected]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert leftovers(tmp_path) == []


@POSIX
@pytest.mark.skipif(not os.access("/dev/null", os.W_OK), reason="/dev/null not writable")
def test_dev_null_is_written_through_and_stays_a_device(no_renames):
    before = os.lstat("/dev/null")
    chunks, _ = _payload()
    write_atomic("/dev/null", chunks)
    after = os.lstat("/dev/null")
    assert stat.S_ISCHR(after.st_mode)
    assert (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)


@POSIX
@pytest.mark.skipif(not os.access("/dev/full", os.W_OK), reason="no writable /dev/full")
def test_device_write_failure_is_a_write_error(no_renames):
    with pytest.raises(E.WriteError, match="/dev/full: cannot write") as info:
        write_atomic("/dev/full", [b"x" * 100])
    assert info.value.__cause__.errno == errno.ENOSPC
    assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)


_TO_STDOUT = (  # renames disabled, as in no_renames: /dev/stdout must stay a link
    "import os, sys; from qpack.atomic import write_atomic; "
    "os.replace = os.rename = os.link = None; "
    "write_atomic('/dev/stdout', [b'qpk'] * 3, overwrite=sys.argv[1] == 'force')"
)


def _to_stdout(stdout, force: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-c", _TO_STDOUT, "force" if force else "-"]
    return subprocess.run(args, stdout=stdout, stderr=subprocess.PIPE, env=env, timeout=60)


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc/self/fd")
def test_dev_stdout_into_a_pipe_and_into_a_redirected_file(tmp_path):
    done = _to_stdout(subprocess.PIPE)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"qpkqpkqpk"
    # `-o /dev/stdout > file`: the shell made the file; it is written in place
    out = tmp_path / "out.qpk"
    with open(out, "wb") as f:
        done = _to_stdout(f)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == b"qpkqpkqpk"
    assert leftovers(tmp_path) == []
    # a file that already holds data is not written over without overwrite
    with open(out, "r+b") as f:
        done = _to_stdout(f)
    assert done.returncode != 0 and b"already exists" in done.stderr
    assert out.read_bytes() == b"qpkqpkqpk"
    # ... and with overwrite it is written over in place, and cut to the new length
    out.write_bytes(b"an older and longer file")
    with open(out, "r+b") as f:
        done = _to_stdout(f, force=True)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == b"qpkqpkqpk"


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc/self/fd")
def test_open_file_reached_through_proc_is_rewritten_in_place(tmp_path, no_renames):
    out = tmp_path / "out.qpk"
    out.write_bytes(b"an older and much longer file" * 1000)
    with open(out, "r+b") as f:
        fd_path = f"/proc/self/fd/{f.fileno()}"
        with pytest.raises(E.OutputError, match="already exists"):
            write_atomic(fd_path, Untouched())
        write_atomic(fd_path, [b"head", bytes(SPARSE_MIN), FileRange(b"tail")], overwrite=True)
    assert out.read_bytes() == b"head" + bytes(SPARSE_MIN) + b"tail"


# ------------------------------------------------------------------------ permissions


@POSIX
@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_file_mode_follows_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    out = tmp_path / "model.qpk"
    write_atomic(out, [b"x"])
    assert stat.S_IMODE(out.stat().st_mode) == mode


@POSIX
@pytest.mark.parametrize(("old", "mask"), [(0o640, 0o022), (0o640, 0o077), (0o600, 0o000)])
def test_replaced_file_keeps_its_mode(tmp_path, umask, old, mask):
    umask(mask)
    out = tmp_path / "model.qpk"
    out.write_bytes(b"old")
    out.chmod(old)
    write_atomic(out, [b"new"], overwrite=True)
    assert stat.S_IMODE(out.stat().st_mode) == old


@POSIX
def test_replacement_is_private_until_published(tmp_path, umask):
    """A 0600 file is never readable by others while its replacement is written."""
    umask(0o000)
    out = tmp_path / "secret.qpk"
    out.write_bytes(b"old")
    out.chmod(0o600)
    seen = []

    def chunks():
        yield b"new"
        seen.extend(stat.S_IMODE(p.stat().st_mode) for p in tmp_path.glob(".*.tmp"))

    write_atomic(out, chunks(), overwrite=True)
    assert seen == [0o600]


@POSIX
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_replaced_file_keeps_its_owner(tmp_path):
    out = tmp_path / "model.qpk"
    out.write_bytes(b"old")
    os.chown(out, 4242, 4343)
    write_atomic(out, [b"new"], overwrite=True)
    assert (out.stat().st_uid, out.stat().st_gid) == (4242, 4343)


# -------------------------------------------------------------- failures and races


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_midway_leaves_the_old_file_and_no_temporary(tmp_path, error):
    out = tmp_path / "model.qpk"
    out.write_bytes(b"old")

    def chunks():
        yield b"half of the new"
        yield bytes(SPARSE_MIN)
        raise error("interrupted")

    with pytest.raises(error):
        write_atomic(out, chunks(), overwrite=True)
    assert out.read_bytes() == b"old"
    assert leftovers(tmp_path) == []
    with pytest.raises(error):
        write_atomic(tmp_path / "new.qpk", chunks())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.qpk"]


def _appearing(target: Path):
    """Chunks during whose writing someone else creates ``target``."""
    yield b"ours"
    target.write_bytes(b"theirs")
    yield b" and more"


def test_output_appearing_while_writing_is_not_clobbered(tmp_path):
    out = tmp_path / "model.qpk"
    with pytest.raises(E.OutputError, match="appeared while it was being written"):
        write_atomic(out, _appearing(out))
    assert out.read_bytes() == b"theirs"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP])
def test_without_hard_links_the_rename_is_checked(tmp_path, monkeypatch, code):
    def no_link(src, dst, **kwargs):
        raise OSError(code, os.strerror(code), str(dst))

    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "model.qpk"
    with pytest.raises(E.OutputError, match="appeared"):
        write_atomic(out, _appearing(out))
    assert out.read_bytes() == b"theirs"
    assert leftovers(tmp_path) == []
    out.unlink()
    write_atomic(out, [b"ours"])
    assert out.read_bytes() == b"ours"
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_an_output_that_appeared(tmp_path):
    out = tmp_path / "model.qpk"
    write_atomic(out, _appearing(out), overwrite=True)
    assert out.read_bytes() == b"ours and more"


# -------------------------------------------------------------------------- contents


def test_holes_read_back_as_zeros(tmp_path):
    out = tmp_path / "sparse.qpk"
    chunks = [
        b"head",
        bytes(SPARSE_MIN),  # a hole in the middle
        np.zeros(SPARSE_MIN // 4, np.float32),  # counted in bytes, not elements
        np.arange(12, dtype="<i4").reshape(3, 4)[:, ::2],  # not contiguous
        b"mid",
        bytes(SPARSE_MIN + 1),  # a trailing hole: the size must still be set
    ]
    expected = b"".join(np.ascontiguousarray(c).tobytes() for c in chunks)
    write_atomic(out, chunks)
    assert out.stat().st_size == len(expected)
    assert out.read_bytes() == expected


def test_hole_inside_a_chunk_larger_than_CHUNK(tmp_path):
    data = bytearray(2 * WRITE_CHUNK + 10)
    data[-10:] = b"0123456789"
    out = tmp_path / "big.qpk"
    write_atomic(out, [data, FileRange(b"end")])
    assert out.read_bytes() == bytes(data) + b"end"
    st = out.stat()
    if hasattr(st, "st_blocks") and _makes_holes(tmp_path):
        assert st.st_blocks * 512 < WRITE_CHUNK  # the zero pieces were seeked over


def _makes_holes(folder: Path) -> bool:
    probe = folder / "probe"
    with open(probe, "wb") as f:
        f.seek(4 * SPARSE_MIN)
        f.write(b"x")
    sparse = probe.stat().st_blocks * 512 < SPARSE_MIN
    probe.unlink()
    return sparse
