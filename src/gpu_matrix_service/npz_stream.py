"""An ``.npz`` (zip) byte stream decoded as it arrives, member by member.

Stored members are copied as they are, deflated ones inflated chunk by chunk (at most
``INFLATE_STEP`` bytes per call, so a bomb never gets ahead of the size checks), each into an
:class:`~gpu_matrix_service.npy_stream.NpyStream`; trailer records are skipped. An archive it
cannot follow (sizes only in a trailing data descriptor) turns :attr:`NpzStream.
needs_whole_file` true.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from zlib_ng import zlib_ng as zlib

from gpu_matrix_service.array_checks import OffLoop
from gpu_matrix_service.arrays import (
    MAX_HEADER_BYTES,
    PREFERRED_KEYS,
    Allocator,
    ArrayLimits,
)
from gpu_matrix_service.errors import BadArrayInput, PayloadTooLarge
from gpu_matrix_service.lanes import Lane
from gpu_matrix_service.npy_stream import NpyStream
from gpu_matrix_service.zip_records import (
    DEFLATED,
    LOCAL_HEADER,
    LOCAL_SIGNATURE,
    STORED,
    TRAILER_SIGNATURES,
    zip64_sizes,
)

# Inflate at most this much per call, so a bomb never gets ahead of the size checks.
INFLATE_STEP: Final = 4 * 1024 * 1024


class _Member:
    """One ``.npz`` member being read: its sizes, inflater, checksum and (maybe) decoder,
    which keeps the CRC of what it is fed when it is to be verified."""

    def __init__(
        self, key: str, method: int, crc: int, packed: int, size: int, decoder: NpyStream | None
    ) -> None:
        self.key, self.method, self.crc = key, method, crc
        self.packed_left, self.size = packed, size
        self.decoder = decoder
        self.inflater = zlib.decompressobj(-15) if method == DEFLATED else None
        self.produced = 0

    def feed(self, data: memoryview, label: str) -> None:
        if self.decoder is None:
            return  # a member nobody will use: not inflated, not checked
        if self.inflater is None:
            self._content(data, label)
            return
        pending: bytes | memoryview = data
        while pending:
            try:
                out = self.inflater.decompress(pending, INFLATE_STEP)
            except zlib.error:
                raise BadArrayInput(f"{label} is corrupt (bad compressed data)") from None
            pending = self.inflater.unconsumed_tail
            self._content(memoryview(out), label)

    def _content(self, data: memoryview, label: str) -> None:
        self.produced += len(data)
        if self.produced > self.size:
            raise BadArrayInput(f"{label} inflates beyond its declared {self.size} bytes")
        if self.decoder is not None:
            self.decoder.feed(data)

    def close(self, label: str) -> None:
        if self.decoder is None:
            return
        if self.inflater is not None:
            try:
                self._content(memoryview(self.inflater.flush()), label)
            except zlib.error:
                raise BadArrayInput(f"{label} is corrupt (bad compressed data)") from None
        decoder = self.decoder
        if self.produced != self.size:
            raise BadArrayInput(f"{label} is corrupt (bad compressed data or checksum)")

        def check_crc() -> None:
            if decoder.verify_crc and decoder.crc != self.crc:
                raise BadArrayInput(f"{label} is corrupt (bad compressed data or checksum)")

        decoder.after_checks(check_crc)  # at once, or after the CRC's blocks on the lane

    def plain_bytes(self) -> int:
        """How many of the next bytes are array data its decoder checks itself."""
        if self.decoder is None or self.inflater is not None:
            return 0
        return min(self.packed_left, self.decoder.plain_bytes())


class NpzStream:
    """An ``.npz`` (zip) byte stream: members decoded as they pass, trailer records skipped.

    :attr:`needs_whole_file` turns true when the archive cannot be followed as a stream
    (sizes in a data descriptor); the caller then decodes the whole file instead.
    """

    def __init__(
        self,
        name: str,
        limits: ArrayLimits,
        allocate: Allocator,
        off_loop: OffLoop | None = None,
    ) -> None:
        self.name, self.limits, self.allocate, self.off_loop = name, limits, allocate, off_loop
        self._record = bytearray()
        self._member: _Member | None = None
        self._in_trailer = False
        self.keys: list[str] = []
        self.arrays: dict[str, NpyStream] = {}
        self._decoders: list[NpyStream] = []  # every one, a repeated name's too (their checks)
        self.needs_whole_file = False

    def feed(self, data: memoryview) -> None:
        """Take the next bytes of the archive."""
        while data and not self._in_trailer and not self.needs_whole_file:
            if self._member is None:
                data = self._feed_record(data)
                continue
            take = min(self._member.packed_left, len(data))
            self._member.feed(data[:take], self._label(self._member.key))
            self._member.packed_left -= take
            data = data[take:]
            if self._member.packed_left == 0:
                self._member.close(self._label(self._member.key))
                self._member = None

    def _label(self, key: str) -> str:
        return f"{self.name}[{key}]"

    def _feed_record(self, data: memoryview) -> memoryview:
        """Gather a local file header; start its member. Returns the unused bytes."""
        need = LOCAL_HEADER.size - len(self._record)
        if need > 0:
            self._record += data[:need]
            data = data[need:]
            if len(self._record) < LOCAL_HEADER.size:
                return data
        fields = LOCAL_HEADER.unpack(self._record[: LOCAL_HEADER.size])
        signature, _, flags, method, _, _, crc, packed, size, name_len, extra_len = fields
        if signature != LOCAL_SIGNATURE:
            if bytes(signature) in TRAILER_SIGNATURES and self.keys:
                self._in_trailer, self._record = True, bytearray()
                return memoryview(b"")
            raise BadArrayInput(f"{self.name} is not a valid .npz (zip) archive")
        variable = name_len + extra_len
        need = LOCAL_HEADER.size + variable - len(self._record)
        if need > 0:
            self._record += data[:need]
            data = data[need:]
            if len(self._record) < LOCAL_HEADER.size + variable:
                return data
        raw = bytes(self._record[LOCAL_HEADER.size :])
        self._record = bytearray()
        if flags & 0x8:  # sizes follow the data: not streamable
            if self.keys:  # too late to go back: the earlier members' bytes are gone
                raise BadArrayInput(
                    f"{self.name}: zip members after the first carry their sizes in data "
                    "descriptors; write the .npz to a seekable file (numpy.savez does)"
                )
            self.needs_whole_file = True  # the caller decodes the whole file instead
            return data
        packed, size = zip64_sizes(raw[name_len:], packed, size)
        self._start_member(raw[:name_len].decode("utf-8", "replace"), flags, method, crc,
                           packed, size)  # fmt: skip
        return data

    def _start_member(
        self, filename: str, flags: int, method: int, crc: int, packed: int, size: int
    ) -> None:
        key = filename.removesuffix(".npy")
        label = self._label(key)
        if flags & 0x1:
            raise BadArrayInput(f"{label} is encrypted")
        if method not in (STORED, DEFLATED):
            # numpy writes stored or deflated members; inflating bzip2 or LZMA would hold the
            # event loop for seconds per request.
            raise BadArrayInput(
                f"{label}: zip compression method {method} is not supported; use numpy.savez "
                "or numpy.savez_compressed"
            )
        if size > self.limits.max_bytes + 12 + MAX_HEADER_BYTES:
            raise PayloadTooLarge(
                f"{label} inflates to {size} bytes; the limit is {self.limits.max_bytes}"
            )
        # Decode the first member and any that could win the choice; skip the rest, and
        # directory entries.
        decoder = None
        if filename.endswith("/"):
            pass
        elif not self.keys or key in PREFERRED_KEYS:
            # Deflate cannot compress better than about 1032:1.
            most = packed if method == STORED else packed * 1032 + 64 * 1024
            verify = method == DEFLATED or self.limits.verify_stored_crc
            off_loop = self.off_loop
            if off_loop is not None and method != STORED:
                # Its bytes in the body are the compressed ones, which the reader searched.
                off_loop = OffLoop(off_loop.pool)
            decoder = NpyStream(label, self.limits, self.allocate, most, verify, off_loop)
            self.arrays[key] = decoder
            self._decoders.append(decoder)
        if not filename.endswith("/"):
            self.keys.append(key)
        self._member = _Member(key, method, crc, packed, size, decoder)
        if packed == 0:
            self._member.close(label)
            self._member = None

    def plain_bytes(self) -> int:
        """How many of the next bytes are array data its member's decoder checks itself."""
        return 0 if self._member is None else self._member.plain_bytes()

    def lanes(self) -> list[Lane]:
        """The lanes checking its members' data."""
        return [lane for stream in self._decoders if (lane := stream.lane) is not None]

    def finish_checks(self) -> None:
        """Wait for every decoded member's checks, the chosen one's or not (on the loop a bad
        CRC or a boundary in any of them is refused as it ends); raise the first failure."""
        for lane in self.lanes():
            lane.wait()
            lane.raise_error()

    def finish_bytes(self) -> int:
        """Bytes :meth:`finish` still converts, over the members it decoded."""
        return sum(stream.finish_bytes() for stream in self.arrays.values())

    def finish(self) -> np.ndarray:
        """The chosen member's array (same choice as the whole-file decoder)."""
        if self._member is not None or self._record:
            raise BadArrayInput(f"{self.name} is not a valid .npz (zip) archive (truncated)")
        if not self.keys:
            raise BadArrayInput(f"{self.name} is an .npz archive with no arrays in it")
        if len(self.keys) == 1:
            return self.arrays[self.keys[0]].finish()
        for key in PREFERRED_KEYS:
            if key in self.arrays:
                return self.arrays[key].finish()
        raise BadArrayInput(
            f"{self.name} holds several arrays {sorted(self.keys)}; name the one to use "
            "'matrix' (or send a single array)"
        )
