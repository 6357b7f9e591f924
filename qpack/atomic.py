"""Writing outputs without ever losing a user's data.

:func:`write_atomic` writes a file so that a crash, a full disk or Ctrl-C leaves the output
path holding either its previous content or the complete new file, never a mix, and so
that a mistyped command cannot destroy anything: an output that is one of the inputs is
refused, an existing file is replaced only when asked, a symlink stays a symlink, a pipe or
device (``-o /dev/stdout``, ``-o /dev/null``) is written into rather than replaced by a
regular file, and permissions follow the umask or the file being replaced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterable
from typing import Any, BinaryIO, NamedTuple, Protocol

import numpy as np

from . import errors as E

SPARSE_MIN = 1 << 20  # smallest all-zero piece left as a hole; smaller ones are not worth a seek
# Bytes written at a time: large enough for full-speed I/O, small enough that checking a
# piece for zeros stays cheap and that holes are found inside large chunks too.
WRITE_CHUNK = 1 << 24

_MAX_HOPS = 40  # symlinks followed before giving up, as Linux does (ELOOP)
_O_FLAGS = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}
_FORCE_HINT = "not overwritten (use --force to replace it)"


class CopiesTo(Protocol):
    """A chunk that appends itself to an output file (e.g. a range of a spool file copied
    inside the kernel); on a pipe or device ``out`` is unseekable but for ``seek(0, 2)``."""

    def copy_to(self, out: BinaryIO) -> None: ...


Chunk = bytes | bytearray | memoryview | np.ndarray | CopiesTo


class _Plan(NamedTuple):
    kind: str  # "new", "replace" (an existing regular file) or "through" (written in place)
    target: str  # the name to publish at (symlinks followed), or the path written through
    st: os.stat_result | None  # the existing output, symlinks followed


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True where ``a`` and ``b`` name one existing file after following symlinks: the
    same path spelled differently, a symlink to it or a hard link; False where either
    cannot be found."""
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except (OSError, ValueError):
        return False


def check_output(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> None:
    """Raise :class:`~qpack.errors.OutputError` now for an output :func:`write_atomic`
    would refuse, so that a command can fail before its slow work; writes nothing."""
    shown = os.fsdecode(os.fspath(path))
    try:
        _plan(shown, overwrite, inputs)
    except OSError as exc:
        raise _write_error(exc, shown) from exc


def write_atomic(
    path: str | os.PathLike,
    chunks: Iterable[Chunk],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> None:
    """Write ``chunks`` to ``path`` without ever losing data.

    A regular output is written to a temporary file beside it, fsynced and renamed into
    place, so ``path`` holds its previous content or the complete new file, never a mix;
    the temporary file is removed on any failure, Ctrl-C included. All-zero pieces of at
    least :data:`SPARSE_MIN` bytes become holes; chunks with a ``copy_to(file)`` method
    copy themselves. Before anything is written, :class:`~qpack.errors.OutputError`
    refuses an output that is the same file as one of ``inputs``, a directory, and an
    existing file unless ``overwrite`` (also one that appears while writing). A symlink
    output stays a link and the file it names is replaced; a pipe or a character device is
    written into in place. A new file gets ``0o666 & ~umask``, a replaced one keeps its
    permission bits (and owner where allowed). I/O failures raise
    :class:`~qpack.errors.WriteError` (also an ``OSError``)."""
    shown = os.fsdecode(os.fspath(path))
    try:
        plan = _plan(shown, overwrite, inputs)
        if plan.kind == "through":
            _write_through(plan.target, chunks)
        else:
            _write_replace(plan, chunks, overwrite, shown)
    except OSError as exc:
        if isinstance(exc, E.QpackError):
            raise
        raise _write_error(exc, shown) from exc


def _write_error(exc: OSError, shown: str) -> E.WriteError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return E.WriteError(f"cannot write ({reason})", path=shown)


def _plan(path: str, overwrite: bool, inputs: Iterable[str | os.PathLike]) -> _Plan:
    """Decide how ``path`` is written, refusing (OutputError) what would lose data."""
    if isinstance(inputs, (str, bytes, os.PathLike)):
        inputs = [inputs]  # one input given bare, not its characters
    st = _stat(path)
    if st is None:
        target, _ = _resolve(path)  # a dangling symlink names the file to create
        return _Plan("new", target, None)
    for name in inputs:
        try:
            other = os.stat(name)
        except (OSError, ValueError):
            continue  # an input that is not there cannot be overwritten
        if os.path.samestat(st, other):
            raise E.OutputError(
                f"is the same file as the input {os.fsdecode(os.fspath(name))}; "
                "not overwritten (choose another output)",
                path=path,
            )
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        raise E.OutputError("is a directory; give a file name", path=path)
    if stat.S_ISSOCK(mode):
        raise E.OutputError("is a socket; cannot write to it", path=path)
    if stat.S_ISBLK(mode) and not overwrite:  # a disk holds data, unlike a pipe or a tty
        raise E.OutputError(f"is a block device; {_FORCE_HINT}", path=path)
    if not stat.S_ISREG(mode):
        return _Plan("through", path, st)  # a pipe or device: writing into it destroys nothing
    target, fd_link = _resolve(path)
    if fd_link:
        # /dev/stdout redirected to a file: it names an open file, not a path to rename
        # over; the shell has just made it (empty), so it is written in place
        if st.st_size and not overwrite:
            raise E.OutputError(f"already exists; {_FORCE_HINT}", path=path)
        return _Plan("through", path, st)
    if not overwrite:
        raise E.OutputError(f"already exists; {_FORCE_HINT}", path=path)
    return _Plan("replace", target, st)


def _stat(path: str) -> os.stat_result | None:
    """``os.stat(path)``, None where nothing is there (a dangling symlink included)."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None  # creating it will say what is wrong, if anything
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise E.OutputError("is a symlink loop; cannot write through it", path=path) from exc
        raise


def _resolve(path: str) -> tuple[str, bool]:
    """Follow symlinks from ``path`` to the name the file itself has (it may not exist:
    a dangling link names it). True with it where a hop is a /proc file-descriptor link
    (``/dev/stdout`` -> ``/proc/self/fd/1``): it names an open file, maybe a pipe or a
    deleted file, not a path one can rename over."""
    current = path
    for _ in range(_MAX_HOPS):
        try:
            link = os.readlink(current)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR):
                return current, False  # not a link, or nothing there
            raise
        folder = os.path.dirname(current)
        if os.path.realpath(folder or ".").startswith("/proc/"):
            return current, True
        # unnormalized, so that ".." after a linked folder means what it means to the kernel
        current = os.path.join(folder, link)
    raise E.OutputError("is a symlink loop; cannot write through it", path=path)


def _write_replace(plan: _Plan, chunks: Iterable[Chunk], overwrite: bool, shown: str) -> None:
    """Write a temporary file beside ``plan.target`` and rename it into place."""
    target, old = plan.target, plan.st
    # a new file gets 0o666 and the kernel applies the umask (and any default ACL), with
    # no process-wide umask change; a replacement starts private and gets the old bits
    fd, tmp = _create_temp(target, 0o666 if old is None else 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            if old is not None:
                _keep_owner_and_mode(out.fileno(), old)
            _write_chunks(out, chunks, seekable=True)
            out.truncate()  # a trailing hole needs the size set
            out.flush()
            os.fsync(out.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            _publish_new(tmp, target, shown)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(target) or ".")


def _create_temp(target: str, mode: int) -> tuple[int, str]:
    """Create a new, empty temporary file beside ``target`` (same file system, so the
    rename is atomic); returns its descriptor and name."""
    folder, name = os.path.split(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_FLAGS
    for _ in range(100):
        # name cut so that the temporary name fits where the target's does
        tmp = os.path.join(folder, f".{name[:200]}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", folder or ".")


def _keep_owner_and_mode(fd: int, old: os.stat_result) -> None:
    """Give the new file the replaced file's owner, group and permission bits, as far as
    this process may; setuid/setgid are dropped, they were never about the new bytes."""
    own = os.fstat(fd)
    if hasattr(os, "fchown") and (own.st_uid, own.st_gid) != (old.st_uid, old.st_gid):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except OSError:
            with contextlib.suppress(OSError):  # a member of the group may still set it
                os.fchown(fd, -1, old.st_gid)
    if hasattr(os, "fchmod"):
        # after chown, which may clear bits; on failure the file stays 0600, never wider
        with contextlib.suppress(OSError):
            os.fchmod(fd, stat.S_IMODE(old.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))


def _publish_new(tmp: str, target: str, shown: str) -> None:
    """Move ``tmp`` to ``target`` only if nothing is there: a hard link fails if the name
    was taken meanwhile, where a rename would silently replace what took it."""
    appeared = E.OutputError(f"appeared while it was being written; {_FORCE_HINT}", path=shown)
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise appeared from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # no hard links on this file system (FAT, some FUSE): check, then rename; the
        # window between the two is all that is left of the race
        if os.path.lexists(target):
            raise appeared from None
        os.replace(tmp, target)
    else:
        os.unlink(tmp)


def _write_through(path: str, chunks: Iterable[Chunk]) -> None:
    """Write into an existing pipe, device, or file open elsewhere (``/dev/stdout``),
    without creating, truncating first or renaming anything."""
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOCTTY", 0) | _O_FLAGS)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            # emptied first: copy_to appends at the end, and holes must read back as zeros
            os.ftruncate(fd, 0)
            with os.fdopen(fd, "wb", closefd=False) as out:
                _write_chunks(out, chunks, seekable=True)
                out.truncate()
                out.flush()
                os.fsync(fd)
        else:
            # zeros are written, never seeked over: a pipe cannot seek and seeking on a
            # disk would leave its old bytes where the zeros belong
            _write_chunks(_Stream(fd), chunks, seekable=False)
            if stat.S_ISBLK(mode):
                os.fsync(fd)  # a disk can fail at the flush; pipes and ttys cannot fsync
    finally:
        os.close(fd)


class _Stream:
    """An unseekable output (pipe, tty, device) with what ``copy_to`` uses of a file."""

    def __init__(self, fd: int):
        self._fd, self._written = fd, 0

    def fileno(self) -> int:
        return self._fd

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self._written

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        # a stream is always at its end; only "go to the end" is meaningful
        if offset == 0 and whence in (os.SEEK_CUR, os.SEEK_END):
            return self._written
        raise OSError(errno.ESPIPE, "cannot seek on a pipe or device")

    def write(self, data: Any) -> int:
        view = _byte_view(data)
        done = 0
        while done < len(view):  # pipes may take part of a write
            done += os.write(self._fd, view[done:])
        self._written += done
        return done


def _byte_view(chunk: Any) -> memoryview:
    """The bytes of a buffer (bytes, memoryview, numpy array of any dtype) as a flat
    unsigned-byte view, so that lengths are in bytes, not elements."""
    view = memoryview(chunk)
    if view.ndim != 1 or not view.c_contiguous:
        view = memoryview(np.ascontiguousarray(view).reshape(-1))
    return view.cast("B")


def _write_chunks(out: Any, chunks: Iterable[Chunk], *, seekable: bool) -> None:
    """Write ``chunks`` to ``out`` in pieces of at most :data:`WRITE_CHUNK` bytes; on a regular
    file, all-zero pieces of at least :data:`SPARSE_MIN` bytes are seeked over (holes)."""
    for chunk in chunks:
        copy_to = getattr(chunk, "copy_to", None)
        if copy_to is not None:
            copy_to(out)
            continue
        view = _byte_view(chunk)
        for start in range(0, len(view), WRITE_CHUNK):
            piece = view[start : start + WRITE_CHUNK]
            if seekable and len(piece) >= SPARSE_MIN and not np.frombuffer(piece, np.uint8).any():
                out.seek(len(piece), os.SEEK_CUR)  # reads back as zeros
            else:
                out.write(piece)


def _fsync_dir(folder: str) -> None:
    """Make a rename durable; not every platform or file system can open a directory."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY | _O_FLAGS)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
