"""The qpack error hierarchy.

Every problem with a file raises a subclass of :class:`QpackError`. Each class carries a
stable ``code`` string; spec/FORMAT.md section 8 lists the codes, and the conformance
vectors name the code each invalid file must raise, so decoders in other languages can map
them to their own errors.
"""

from __future__ import annotations


class QpackError(Exception):
    """Base class of every error qpack raises about a file or its input."""

    code = "error"

    def __init__(self, message: str, *, path: object = None, tensor: str | None = None):
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.reason = message
        where = []
        if self.path is not None:
            where.append(self.path)
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        super().__init__(": ".join([*where, message]))


class NotQpackError(QpackError):
    """The file does not start with the qpack magic bytes."""

    code = "bad-magic"


class TruncatedError(QpackError):
    """The file is shorter than its preamble or header says."""

    code = "truncated"


class VersionError(QpackError):
    """The file's major format version is not one this reader implements."""

    code = "unsupported-version"


class HeaderTooLargeError(QpackError):
    """The header length exceeds the reader's limit."""

    code = "header-too-large"


class ChecksumError(QpackError):
    """A CRC-32 does not match the bytes it covers."""


class HeaderChecksumError(ChecksumError):
    code = "header-checksum"


class DataChecksumError(ChecksumError):
    code = "data-checksum"


class HeaderError(QpackError):
    """The header is not valid msgpack or does not follow the schema."""

    code = "bad-header"


class UnsupportedError(HeaderError):
    """The header asks for a storage kind or dequantization this reader does not know."""

    code = "unsupported-feature"


class LayoutError(QpackError):
    """Tensor byte ranges are out of bounds, misaligned, overlapping or inconsistent."""

    code = "bad-layout"


class DataError(QpackError):
    """Tensor bytes are inconsistent with the header (e.g. nonzero padding bits)."""

    code = "bad-data"


class WriteError(QpackError, OSError):
    """The output file could not be written (the previous file, if any, is left intact)."""

    code = "write-failed"


class EncodeError(QpackError, ValueError):
    """The input given to the encoder cannot be stored (NaN weights, bad options...)."""

    code = "bad-input"


class OutputError(QpackError):
    """The output path is refused before anything is written: it exists and overwriting
    was not asked for, or it is one of the command's inputs."""

    code = "bad-output"


class CheckpointError(QpackError):
    """An input given as a checkpoint cannot be read as a state_dict."""

    code = "not-a-checkpoint"


ERROR_CLASSES: dict[str, type[QpackError]] = {
    cls.code: cls
    for cls in (
        NotQpackError,
        TruncatedError,
        VersionError,
        HeaderTooLargeError,
        HeaderChecksumError,
        DataChecksumError,
        HeaderError,
        UnsupportedError,
        LayoutError,
        DataError,
    )
}
