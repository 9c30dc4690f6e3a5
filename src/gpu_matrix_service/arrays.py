"""Safe decoding of uploaded ``.npy``/``.npz`` bytes into arrays, and encoding of results.

Nothing here unpickles: the ``.npy`` header is read with :func:`ast.literal_eval` and object
dtypes are refused before any data is touched. Limits (bytes, elements, dimensions) are checked
against what a file *declares* before anything is allocated or inflated, which is also the
zip-bomb guard for ``.npz`` members. Data is copied once, from the request bytes (or the
inflating zip stream) straight into an array from the caller's allocator, which on a GPU
backend is pinned staging memory.
"""

from __future__ import annotations

import ast
import io
import lzma
import math
import re
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Final, NamedTuple

import numpy as np

from gpu_matrix_service.errors import BadArrayInput, PayloadTooLarge, UnsupportedDType
from gpu_matrix_service.ops import check_numeric_dtype

NPY_MAGIC: Final = b"\x93NUMPY"
ZIP_MAGICS: Final = (b"PK\x03\x04", b"PK\x05\x06")
# numpy itself refuses headers over 10 000 bytes unless told otherwise; 64 KiB leaves room for
# very many dimensions while keeping literal_eval's input small.
MAX_HEADER_BYTES: Final = 64 * 1024
# Keys tried, in order, when an .npz holds several arrays.
PREFERRED_KEYS: Final = ("matrix", "arr_0")
# Inflate .npz members in pieces this large, so a bad member costs no more than this at once.
INFLATE_CHUNK_BYTES: Final = 8 * 1024 * 1024

Allocator = Callable[[tuple[int, ...], np.dtype], np.ndarray]

# What zipfile (and the decompressors under it) raise on a malformed archive. Each was seen
# from fuzzed input: bad offsets (ValueError), names (UnicodeDecodeError, IndexError),
# versions (NotImplementedError), encryption (RuntimeError), LZMA/bzip2/zlib data errors.
ZIP_ERRORS: Final = (
    zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, IndexError,
    KeyError, NotImplementedError, RuntimeError, UnicodeDecodeError, lzma.LZMAError,
    zlib.error, struct.error,
)  # fmt: skip


def _numpy_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


@dataclass(frozen=True)
class ArrayLimits:
    """What one decoded operand may be: raw data bytes, element count, dimensions."""

    max_bytes: int
    max_elements: int
    max_dims: int
    # Check the CRC-32 of uncompressed (stored) .npz members while streaming; compressed ones
    # are always checked. The whole-file decoder always checks (zipfile does).
    verify_stored_crc: bool = True


class NpyHeader(NamedTuple):  # a tuple: built on every upload, a frozen dataclass costs 3x
    """A parsed ``.npy`` header: the array's dtype and shape, and where its data starts."""

    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    data_offset: int

    @property
    def nbytes(self) -> int:
        """Bytes of array data that must follow the header."""
        return math.prod(self.shape) * self.dtype.itemsize


def decode_array(
    data: bytes | bytearray | memoryview,
    *,
    name: str,
    limits: ArrayLimits,
    allocate: Allocator = _numpy_empty,
) -> np.ndarray:
    """Decode one uploaded ``.npy`` or ``.npz`` file into a native-byte-order array.

    ``name`` names the upload in error messages. Raises :class:`BadArrayInput` (not an array
    file, corrupt, truncated), :class:`UnsupportedDType` or :class:`PayloadTooLarge`.
    """
    view = memoryview(data).cast("B")
    if len(view) == 0:
        raise BadArrayInput(f"{name} is empty")
    head = bytes(view[:6])
    if head == NPY_MAGIC:
        return decode_npy(view, name=name, limits=limits, allocate=allocate)
    if head[:4] in ZIP_MAGICS:
        return decode_npz(view, name=name, limits=limits, allocate=allocate)
    raise BadArrayInput(
        f"{name} is neither a .npy nor a .npz file (it starts with {head[:6]!r}); save arrays "
        "with numpy.save or numpy.savez"
    )


def parse_npy_header(prefix: bytes | memoryview, *, name: str, limits: ArrayLimits) -> NpyHeader:
    """Parse the header at the start of ``prefix`` and check it against ``limits``.

    ``prefix`` must hold at least the whole header (its length is in the first 12 bytes).
    """
    whole, prefix = prefix, bytes(prefix[:12])  # the header itself is copied below
    if len(prefix) < 10 or prefix[:6] != NPY_MAGIC:
        raise BadArrayInput(f"{name} is not a .npy file (bad magic or too short)")
    major = prefix[6]
    if major == 1:
        (header_len,) = struct.unpack("<H", prefix[8:10])
        start, encoding = 10, "latin1"
    elif major in (2, 3):
        if len(prefix) < 12:
            raise BadArrayInput(f"{name}: truncated .npy header")
        (header_len,) = struct.unpack("<I", prefix[8:12])
        start, encoding = 12, "latin1" if major == 2 else "utf8"
    else:
        raise BadArrayInput(f"{name}: unsupported .npy format version {major}.{prefix[7]}")
    if header_len > MAX_HEADER_BYTES:
        raise BadArrayInput(f"{name}: .npy header of {header_len} bytes is too long")
    raw = bytes(whole[start : start + header_len])
    if len(raw) < header_len:
        raise BadArrayInput(f"{name}: truncated .npy header")
    header = NpyHeader(*header_fields(raw, encoding, name), start + header_len)
    check_limits(header, name=name, limits=limits)
    return header


def header_fields(raw: bytes, encoding: str, name: str) -> tuple[np.dtype, tuple[int, ...], bool]:
    """Dtype, shape and Fortran order from a header's dictionary text (``encoding``: latin1
    or utf8), remembered; :class:`BadArrayInput` or :class:`UnsupportedDType` if invalid."""
    known = _KNOWN_HEADERS.get((raw, encoding))
    if known is None:
        known = _header_fields(raw, encoding, name)
        if len(_KNOWN_HEADERS) < MAX_KNOWN_HEADERS and len(raw) <= MOST_KNOWN_TEXT:
            _KNOWN_HEADERS[raw, encoding] = known
    return known


# Headers already parsed, and what they said: clients send many arrays of one shape and dtype,
# and parsing one costs about 15 us. Only valid headers are kept; once this many are, no more
# (a client sending endless new shapes just parses them each time).
MAX_KNOWN_HEADERS: Final = 1024
# Longer header texts are parsed each time: numpy writes about 120 bytes, and valid headers
# padded to 64 KiB must not be able to fill 1024 places with 64 MiB.
MOST_KNOWN_TEXT: Final = 1024
_KNOWN_HEADERS: dict[tuple[bytes, str], tuple[np.dtype, tuple[int, ...], bool]] = {}


def _header_fields(raw: bytes, encoding: str, name: str) -> tuple[np.dtype, tuple[int, ...], bool]:
    """Dtype, shape and Fortran order from a header's dictionary text, checked."""
    fields = _literal_header(raw, encoding, name)
    dtype = _header_dtype(fields.get("descr"), name)
    shape = _header_shape(fields.get("shape"), name)
    fortran = fields.get("fortran_order")
    if not isinstance(fortran, bool):
        raise BadArrayInput(f"{name}: .npy header has no valid 'fortran_order'")
    return dtype, shape, fortran


# The header numpy.save writes for a plain dtype, read without the (slower) literal_eval:
# {'descr': '<f4', 'fortran_order': False, 'shape': (64, 64), }
NUMPY_HEADER = re.compile(
    rb"\{'descr': '([<>|=][a-zA-Z]\d*)', 'fortran_order': (True|False), "
    rb"'shape': \(((?:\d+, ?)*\d*)\), \}[ \n]*"
)


def _literal_header(raw: bytes, encoding: str, name: str) -> dict[str, object]:
    plain = NUMPY_HEADER.fullmatch(raw)
    if plain is not None:
        descr, fortran, dims = plain.groups()
        try:
            shape = tuple(int(d) for d in dims.split(b",") if d.strip())
        except ValueError:  # more digits than int() converts (4300): no real dimension
            raise BadArrayInput(f"{name}: .npy header has an invalid shape") from None
        return {"descr": descr.decode(), "fortran_order": fortran == b"True", "shape": shape}
    try:
        fields = ast.literal_eval(raw.decode(encoding))
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError, TypeError):
        raise BadArrayInput(f"{name}: .npy header is not a valid dictionary") from None
    if not isinstance(fields, dict) or not {"descr", "fortran_order", "shape"} <= fields.keys():
        raise BadArrayInput(f"{name}: .npy header lacks descr, fortran_order or shape")
    return fields


def _header_dtype(descr: object, name: str) -> np.dtype:
    try:
        dtype = np.lib.format.descr_to_dtype(descr)
    except (ValueError, TypeError, KeyError, IndexError, SyntaxError):
        raise BadArrayInput(f"{name}: .npy header names an invalid dtype {descr!r}") from None
    if dtype.hasobject:
        raise UnsupportedDType(
            f"{name} holds Python objects (dtype {dtype}); object arrays are never loaded, "
            "since that would mean unpickling untrusted data"
        )
    try:
        check_numeric_dtype(dtype)
    except UnsupportedDType as exc:
        raise UnsupportedDType(f"{name}: {exc.detail}") from None
    return dtype


def _header_shape(shape: object, name: str) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
    ):
        raise BadArrayInput(f"{name}: .npy header has an invalid shape {shape!r}")
    return shape


def check_limits(header: NpyHeader, *, name: str, limits: ArrayLimits) -> None:
    """Raise :class:`PayloadTooLarge` when the declared array exceeds ``limits``."""
    if len(header.shape) > limits.max_dims:
        raise PayloadTooLarge(
            f"{name} has {len(header.shape)} dimensions; the limit is {limits.max_dims}"
        )
    elements = math.prod(header.shape)
    # With a zero among them the other dimensions could be anything: bound them too, or an
    # empty array of shape (0, 2**63) would reach numpy (which cannot even describe it).
    extent = elements or math.prod(dim for dim in header.shape if dim)
    if elements > limits.max_elements or extent > limits.max_elements:
        raise PayloadTooLarge(
            f"{name} has {elements} elements {list(header.shape)}; the limit is "
            f"{limits.max_elements}"
        )
    if header.nbytes > limits.max_bytes:
        raise PayloadTooLarge(
            f"{name} holds {header.nbytes} bytes of data; the limit is {limits.max_bytes}"
        )


def decode_npy(
    view: memoryview, *, name: str, limits: ArrayLimits, allocate: Allocator = _numpy_empty
) -> np.ndarray:
    """Decode a whole ``.npy`` file held in memory (one copy into the allocated array)."""
    header = parse_npy_header(view, name=name, limits=limits)
    payload = view[header.data_offset :]
    if len(payload) != header.nbytes:
        raise BadArrayInput(
            f"{name}: array data is {len(payload)} bytes, but its header {header.dtype} "
            f"{list(header.shape)} needs {header.nbytes} (truncated or corrupt file)"
        )
    source = np.frombuffer(payload, dtype=header.dtype, count=math.prod(header.shape))
    return _into_native(source, header, allocate)


def _into_native(source: np.ndarray, header: NpyHeader, allocate: Allocator) -> np.ndarray:
    """Copy flat file data into a C-ordered native-byte-order array from ``allocate``."""
    order = "F" if header.fortran_order else "C"
    out = allocate(header.shape, header.dtype.newbyteorder("="))
    out[...] = source.reshape(header.shape, order=order)  # one pass: reorders and byte-swaps
    return out


def decode_npz(
    view: memoryview, *, name: str, limits: ArrayLimits, allocate: Allocator = _numpy_empty
) -> np.ndarray:
    """Decode the chosen array of an ``.npz`` archive held in memory.

    One member is read whatever its key; with several, ``matrix`` or ``arr_0``, else a 400
    naming the keys. Declared sizes are checked before anything is inflated.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(view))
        members = [info for info in archive.infolist() if not info.is_dir()]
    except ZIP_ERRORS:
        raise BadArrayInput(f"{name} is not a valid .npz (zip) archive") from None
    member = _choose_member(members, name)
    label = f"{name}[{member.filename.removesuffix('.npy')}]"
    # The zip-bomb guard: the declared inflated size bounds what we will ever inflate.
    if member.file_size > limits.max_bytes + 12 + MAX_HEADER_BYTES:
        raise PayloadTooLarge(
            f"{label} inflates to {member.file_size} bytes; the limit is {limits.max_bytes}"
        )
    if member.flag_bits & 0x1:
        raise BadArrayInput(f"{label} is encrypted")
    try:
        with archive.open(member) as stream:
            return _read_npy_stream(stream, member.file_size, label, limits, allocate)
    except ZIP_ERRORS:
        raise BadArrayInput(f"{label} is corrupt (bad compressed data or checksum)") from None


def _choose_member(members: list[zipfile.ZipInfo], name: str) -> zipfile.ZipInfo:
    if not members:
        raise BadArrayInput(f"{name} is an .npz archive with no arrays in it")
    if len(members) == 1:
        return members[0]
    by_key = {info.filename.removesuffix(".npy"): info for info in members}
    for key in PREFERRED_KEYS:
        if key in by_key:
            return by_key[key]
    raise BadArrayInput(
        f"{name} holds several arrays {sorted(by_key)}; name the one to use 'matrix' "
        "(or send a single array)"
    )


def _read_npy_stream(
    stream: BinaryIO, declared_size: int, label: str, limits: ArrayLimits, allocate: Allocator
) -> np.ndarray:
    prefix = stream.read(min(declared_size, 12 + MAX_HEADER_BYTES))
    header = parse_npy_header(prefix, name=label, limits=limits)
    if declared_size != header.data_offset + header.nbytes:
        raise BadArrayInput(
            f"{label}: member is {declared_size} bytes, but its header {header.dtype} "
            f"{list(header.shape)} needs {header.data_offset + header.nbytes}"
        )
    already = memoryview(prefix)[header.data_offset :]
    native = header.dtype.isnative and not header.fortran_order
    out = allocate(header.shape, header.dtype) if native else np.empty(header.nbytes, np.uint8)
    target = memoryview(out.reshape(-1).view(np.uint8))
    target[: len(already)] = already
    filled = len(already)
    while filled < header.nbytes:
        chunk = target[filled : filled + INFLATE_CHUNK_BYTES]
        got = stream.readinto(chunk)
        if not got:
            raise BadArrayInput(f"{label}: array data ends early (truncated member)")
        filled += got
    if native:
        return out
    source = np.frombuffer(out, dtype=header.dtype, count=math.prod(header.shape))
    return _into_native(source, header, allocate)


def encode_npz(array: np.ndarray, key: str = "result") -> bytes:
    """An uncompressed ``.npz`` holding ``array`` under ``key`` (what ``numpy.load`` reads)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{key: array})
    return buffer.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    """A ``.npy`` file of ``array``."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
