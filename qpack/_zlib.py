"""The CRC-32 and raw-inflate functions qpack uses: zlib's, or ISA-L's when the optional
``isal`` package is installed (``pip install qpack[fast]``). ISA-L computes the same CRC-32
values and inflates to the same bytes, several times faster (about 4x for the CRC and 1.5x
for inflate on one x86 core), so files and decoded values never depend on which is used.
qpack never compresses with either: its writer is deterministic on its own.
"""

from __future__ import annotations

import zlib as _stdlib

try:
    from isal import isal_zlib as _fast
except ImportError:  # the optional accelerator is not installed
    _fast = None

_zlib = _fast or _stdlib
crc32 = _zlib.crc32
decompressobj = _zlib.decompressobj
ERRORS: tuple[type[Exception], ...] = tuple({_stdlib.error, _zlib.error})
BACKEND = "isal" if _fast is not None else "zlib"
