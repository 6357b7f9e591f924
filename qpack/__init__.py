"""qpack: a packed, checksummed file format and codec for quantized neural-network weights.

``save``/``load``/``inspect`` work with PyTorch state_dicts (torch is imported only when
tensors are made); ``encode``/``decode``/``load_numpy`` and ``pack_codes``/``unpack_codes``
need only numpy and msgpack.
"""

__version__ = "1.0.0"

from .api import inspect, load, load_into, open, save  # noqa: E402
from .bitpack import pack_codes, unpack_codes  # noqa: E402
from .budget import allocate  # noqa: E402
from .codec import decode, encode, load_numpy  # noqa: E402
from .errors import QpackError  # noqa: E402
from .schemes import DEFAULT_SCHEME, SCHEMES  # noqa: E402

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
