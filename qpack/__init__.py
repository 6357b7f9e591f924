"""qpack: a packed, checksummed file format and codec for quantized neural-network weights.

``save``/``load``/``open``/``inspect`` work with PyTorch models and state_dicts (torch is
imported only when tensors are made); :mod:`qpack.numpy` has the same verbs for numpy
arrays, and ``encode``/``decode``/``load_numpy`` and ``pack_codes``/``unpack_codes`` need
only numpy and msgpack.
"""

from ._version import __version__
from .api import inspect, load, load_into, open, save
from .bitpack import pack_codes, unpack_codes
from .budget import allocate
from .errors import QpackError
from .numpy import encode
from .reader import decode, load_numpy
from .schemes import DEFAULT_SCHEME, SCHEMES

__all__ = [
    "__version__",
    "save",
    "load",
    "inspect",
    "open",
    "load_into",
    "allocate",
    "encode",
    "decode",
    "load_numpy",
    "pack_codes",
    "unpack_codes",
    "QpackError",
    "SCHEMES",
    "DEFAULT_SCHEME",
]
