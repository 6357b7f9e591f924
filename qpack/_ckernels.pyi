"""Type stub of the optional compiled kernels (``qpack/_ckernels.c``). Every function has
a numpy twin that gives the same bits; :mod:`qpack.kernels` chooses between them.
"""

import numpy as np

# anything exposing a contiguous byte buffer
Buffer = bytes | bytearray | memoryview | np.ndarray

def dequantize(
    src: Buffer,
    bits: int,
    group: int,
    count: int,
    scale: np.ndarray,
    zero: np.ndarray,
    out: np.ndarray,
    row: int = ...,
    run: int = ...,
    first: int = ...,
    last: int = ...,
) -> None: ...
def histogram(data: Buffer, counts: np.ndarray) -> None: ...
def huffman_decode(data: Buffer, lengths: np.ndarray, count: int, out: np.ndarray) -> int: ...
def huffman_decode_chunks(
    data: Buffer,
    lengths: np.ndarray,
    count: int,
    chunk: int,
    starts: np.ndarray,
    out: np.ndarray,
    lanes: int,
    first: int = ...,
    last: int = ...,
) -> int: ...
def huffman_dequantize(
    data: Buffer,
    lengths: np.ndarray,
    count: int,
    scale: np.ndarray,
    zero: np.ndarray,
    out: np.ndarray,
    chunk: int = ...,
    starts: np.ndarray | None = ...,
    row: int = ...,
    run: int = ...,
    first: int = ...,
    last: int = ...,
) -> int: ...
def huffman_encode(
    symbols: np.ndarray,
    lengths: np.ndarray,
    out: np.ndarray,
    chunk: int = ...,
    starts: np.ndarray | None = ...,
) -> int: ...
def pack(codes: np.ndarray, bits: int, out: np.ndarray) -> None: ...
def quantize(
    w: np.ndarray, scale: np.ndarray, zero: np.ndarray, top: int, out: np.ndarray
) -> None: ...
