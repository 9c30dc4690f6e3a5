"""The zip records an ``.npz`` is made of, and the short way through one that came whole.

:class:`~gpu_matrix_service.npz_stream.NpzStream` reads these records as bytes arrive.
When a whole file arrives in one piece, as small uploads do, :func:`decode_in_one_piece` reads
the layout ``numpy.save`` and ``numpy.savez`` write (a bare ``.npy``, or an ``.npz`` of one
stored or deflated member whose sizes are in its local header) in a few steps instead of
through the stream's state machines. It only ever succeeds or declines: anything else, and
anything wrong, goes back to the stream, which reads it and words the error, so both paths
give one answer.
"""

from __future__ import annotations

import struct
from typing import Final

import numpy as np

# zlib-ng: the same API as zlib, with SIMD CRC-32 (about 4x zlib's) and a faster inflate.
from zlib_ng import zlib_ng as zlib

from gpu_matrix_service.arrays import (
    MAX_KNOWN_HEADERS,
    MOST_KNOWN_TEXT,
    NPY_MAGIC,
    Allocator,
    ArrayLimits,
    NpyHeader,
    check_limits,
    header_fields,
    parse_npy_header,
)
from gpu_matrix_service.errors import ServiceError

LOCAL_HEADER: Final = struct.Struct("<4sHHHHHIIIHH")
LOCAL_SIGNATURE: Final = b"PK\x03\x04"
# Records after the members: central directory, zip64 end records, end of central directory.
TRAILER_SIGNATURES: Final = (b"PK\x01\x02", b"PK\x06\x06", b"PK\x06\x07", b"PK\x05\x06")
ZIP64_EXTRA_ID: Final = 0x0001
# A zip64 extra field of one record with both sizes: tag, length 16, size, compressed size.
ZIP64_BOTH: Final = struct.Struct("<HHQQ")
STORED, DEFLATED = 0, 8
# Flags the short way declines: 0x1 encrypted, 0x8 sizes in a trailing data descriptor.
DECLINED_FLAGS: Final = 0x1 | 0x8
# A deflated member inflating to more than this is left to the stream, which inflates it in
# bounded steps.
MOST_INFLATED_BYTES: Final = 1 << 20


def zip64_sizes(extra: bytes | memoryview, packed: int, size: int) -> tuple[int, int]:
    """Sizes from the zip64 extra field where the 32-bit fields say 0xFFFFFFFF."""
    if len(extra) == ZIP64_BOTH.size and packed == size == 0xFFFFFFFF:
        tag, length, size_64, packed_64 = ZIP64_BOTH.unpack(extra)
        if (tag, length) == (ZIP64_EXTRA_ID, 16):  # what numpy.savez writes: one record
            return packed_64, size_64
    position = 0
    while position + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, position)
        body = extra[position + 4 : position + 4 + length]
        if tag == ZIP64_EXTRA_ID:
            values = [v for (v,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
            if size == 0xFFFFFFFF and values:
                size = values.pop(0)
            if packed == 0xFFFFFFFF and values:
                packed = values.pop(0)
        position += 4 + length
    return packed, size


def decode_in_one_piece(
    data: memoryview, *, name: str, limits: ArrayLimits, allocate: Allocator
) -> np.ndarray | None:
    """The array of a whole ``.npy``/``.npz`` file in the layout numpy writes, or None when
    the file is laid out otherwise or anything about it is wrong (the stream then reads it)."""
    try:
        if data[:4] == LOCAL_SIGNATURE:
            member = _only_member(data, limits)
            return None if member is None else _native_npy(member, name, limits, allocate)
        if data[:6] == NPY_MAGIC:
            return _native_npy(data, name, limits, allocate)
    except ServiceError:
        pass
    return None


def _native_npy(
    data: memoryview, name: str, limits: ArrayLimits, allocate: Allocator
) -> np.ndarray | None:
    """A C-ordered native-byte-order ``.npy`` copied into ``allocate``'s array, or None."""
    header = parse_npy_header(data, name=name, limits=limits)
    return _native_copy(header, data[header.data_offset :], allocate)


class LaidOutNpyDecoder:
    """``decode(name, header_text, encoding, data)``: the array of a ``.npy`` whose header's
    dictionary text and data the native reader found (``native/whole_body.c``), as
    :func:`decode_in_one_piece` would decode that file, or None where it would decline.

    What each header text allows (shape, dtype and data bytes, checked against ``limits``,
    or a refusal) is remembered, up to ``MAX_KNOWN_HEADERS`` texts of at most
    ``MOST_KNOWN_TEXT`` bytes (numpy writes about 120; longer ones are checked each time, so
    crafted headers cannot fill memory): clients send many arrays of one shape, and the checks
    cost about 4 us a file in place.
    """

    def __init__(self, limits: ArrayLimits, allocate: Allocator) -> None:
        self._limits, self._allocate = limits, allocate
        self._known: dict[tuple[bytes, str], tuple[tuple[int, ...], np.dtype, int] | None] = {}

    def __call__(
        self, name: str, header_text: bytes, encoding: str, data: memoryview
    ) -> np.ndarray | None:
        key = (header_text, encoding)
        try:
            known = self._known[key]
        except KeyError:
            known = self._allowed(name, header_text, encoding)
            if len(self._known) < MAX_KNOWN_HEADERS and len(header_text) <= MOST_KNOWN_TEXT:
                self._known[key] = known
        if known is None or len(data) != known[2]:
            return None
        return _filled(self._allocate, known[0], known[1], data)

    def _allowed(
        self, name: str, header_text: bytes, encoding: str
    ) -> tuple[tuple[int, ...], np.dtype, int] | None:
        try:
            header = NpyHeader(*header_fields(header_text, encoding, name), 0)
            check_limits(header, name=name, limits=self._limits)
        except ServiceError:
            return None
        if not _copied_as_is(header):
            return None
        return header.shape, header.dtype, header.nbytes


def _copied_as_is(header: NpyHeader) -> bool:
    """Whether the data is the array's C-ordered native bytes (else a reorder or byte swap is
    the stream's, which moves a large one off the event loop)."""
    return header.dtype.isnative and not header.fortran_order


def _native_copy(header: NpyHeader, data: memoryview, allocate: Allocator) -> np.ndarray | None:
    if not _copied_as_is(header) or len(data) != header.nbytes:
        return None
    return _filled(allocate, header.shape, header.dtype, data)


def _filled(
    allocate: Allocator, shape: tuple[int, ...], dtype: np.dtype, data: memoryview
) -> np.ndarray:
    """A C-ordered array from ``allocate`` holding ``data``, its bytes exactly."""
    out = allocate(shape, dtype)
    if len(data):  # a view with a 0 in its shape has no flat cast
        out.data.cast("B")[:] = data  # C-contiguous: one flat view (a third of a reshape's)
    return out


def _only_member(data: memoryview, limits: ArrayLimits) -> memoryview | None:
    """The checked content of an archive's only member, or None."""
    if len(data) < LOCAL_HEADER.size:
        return None
    fields = LOCAL_HEADER.unpack_from(data)
    _, _, flags, method, _, _, crc, packed, size, name_len, extra_len = fields
    start = LOCAL_HEADER.size + name_len + extra_len
    if flags & DECLINED_FLAGS or method not in (STORED, DEFLATED) or len(data) < start:
        return None
    name_end = LOCAL_HEADER.size + name_len
    if name_len and data[name_end - 1 : name_end] == b"/":
        return None  # a directory entry first: the stream skips it
    packed, size = zip64_sizes(data[name_end:start], packed, size)
    end = start + packed
    rest = len(data) - end
    # The archive ends there, or its trailer follows: another member is the stream's to choose.
    if rest < 0 or (rest and (rest < LOCAL_HEADER.size or data[end : end + 4] not in
                              TRAILER_SIGNATURES)):  # fmt: skip
        return None
    member = data[start:end]
    if method == STORED:
        if packed != size or (limits.verify_stored_crc and zlib.crc32(member) != crc):
            return None
        return member
    if size > MOST_INFLATED_BYTES:
        return None
    inflater = zlib.decompressobj(-15)
    try:
        content = inflater.decompress(member, size + 1)
    except zlib.error:
        return None
    if (
        len(content) != size
        or not inflater.eof
        or inflater.unconsumed_tail
        or inflater.unused_data
        or zlib.crc32(content) != crc
    ):
        return None
    return memoryview(content)
