"""The optional compiled kernels (``qpack/_ckernels.c``), or None.

They are built when qpack is installed on a machine with a C compiler and compute exactly
what the numpy code computes (the tests hold every pair bit-identical), several times
faster and without holding the GIL. Without them qpack runs its numpy code. Setting the
environment variable ``QPACK_PURE=1`` before import makes qpack ignore them;
``QPACK_NO_AVX2=1`` keeps them but holds back their AVX2 loops (the tests use it to run
the plain loops on machines that have AVX2).
"""

from __future__ import annotations

import os
from types import ModuleType

native: ModuleType | None
try:
    if os.environ.get("QPACK_PURE", "") not in ("", "0"):
        raise ImportError("QPACK_PURE is set")
    from . import _ckernels as native
except ImportError:
    native = None

BACKEND = "c" if native is not None else "numpy"
