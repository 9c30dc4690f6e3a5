"""One ``.npy`` byte stream decoded as it arrives, straight into its destination array.

As soon as the header is complete, :class:`NpyStream` asks the allocator for the destination
(pinned staging memory on a GPU backend), and from then on every chunk is copied there once.
Given a lane, the CRC of a large array's bytes and the multipart reader's check that its
boundary is not among them run off the event loop in blocks of the destination
(:mod:`~gpu_matrix_service.array_checks`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import numpy as np
from zlib_ng import zlib_ng as zlib

from gpu_matrix_service import array_checks
from gpu_matrix_service.array_checks import ArrayChecks, OffLoop
from gpu_matrix_service.arrays import (
    MAX_HEADER_BYTES,
    NPY_MAGIC,
    Allocator,
    ArrayLimits,
    NpyHeader,
    _into_native,
    parse_npy_header,
)
from gpu_matrix_service.errors import BadArrayInput, PayloadTooLarge
from gpu_matrix_service.lanes import Lane


class NpyStream:
    """One ``.npy`` byte stream, decoded into an array from ``allocate`` as it arrives.

    ``most_bytes`` is the most this stream can possibly carry (what is left of the request
    body, or what a zip member's compressed size can inflate to): a header declaring more is
    refused before anything is allocated, so a few bytes of headers cannot reserve gigabytes.
    With ``verify_crc`` it keeps the CRC-32 of every byte fed (:attr:`crc`, complete once
    :meth:`after_checks` runs its job); with ``off_loop``, a large array's CRC and refusal
    checks run on a lane.
    """

    def __init__(
        self,
        name: str,
        limits: ArrayLimits,
        allocate: Allocator,
        most_bytes: int,
        verify_crc: bool = False,
        off_loop: OffLoop | None = None,
    ) -> None:
        self.name, self.limits, self.allocate = name, limits, allocate
        self.most_bytes = most_bytes
        self.verify_crc, self.off_loop = verify_crc, off_loop
        self._crc = 0  # while the checks run here, on the loop
        self._checks: ArrayChecks | None = None  # set once the header says it is large
        self._head = bytearray()
        self._header: NpyHeader | None = None
        self._out: np.ndarray | None = None
        self._target: memoryview | None = None
        self._filled = 0
        self.extra = 0  # bytes beyond the array's data (an error for a bare .npy)

    def feed(self, data: memoryview) -> None:
        """Take the next bytes of the file."""
        if self._checks is None:
            if self.verify_crc:
                self._crc = zlib.crc32(data, self._crc)
            if self._header is None:
                data = self._feed_header(data)
                if self._header is None or not data:
                    return
        assert self._target is not None
        room = len(self._target) - self._filled
        take = min(room, len(data))
        self._target[self._filled : self._filled + take] = data[:take]
        self._filled += take
        self.extra += len(data) - take  # an error at finish if this array is the one chosen
        if self._checks is not None:
            self._checks.filled(self._filled, last=self._filled == len(self._target))
            if take < len(data):
                self._checks.past_target(data[take:])

    @property
    def crc(self) -> int:
        """The CRC-32 of the bytes fed (with ``verify_crc``; complete in an
        :meth:`after_checks` job)."""
        if self._checks is not None and self._checks.crc is not None:
            return self._checks.crc
        return self._crc

    def after_checks(self, job: Callable[[], None]) -> None:
        """No more bytes come; run ``job`` once :attr:`crc` is complete: now, or after the
        checks off the loop."""
        if self._checks is None:
            job()
            return
        self._checks.filled(self._filled, last=True)  # a short file's last block too
        self._checks.then(job)

    def plain_bytes(self) -> int:
        """How many of the next bytes are array data that this stream itself checks for the
        refused bytes (so its reader need not search them); 0 unless it does."""
        if self._checks is None or self._checks.refusal is None or self._target is None:
            return 0
        return len(self._target) - self._filled

    @property
    def lane(self) -> Lane | None:
        """The lane running this array's checks, if any."""
        return None if self._checks is None else self._checks.lane

    def finish_checks(self) -> None:
        """No more bytes come: wait for the checks off the loop, raise the first failure."""
        if self._checks is not None:
            self._checks.finish(self._filled)

    def _feed_header(self, data: memoryview) -> memoryview:
        """Gather the header; once whole, allocate the destination. Returns unused bytes.

        Only the header's own bytes are copied aside; the data after it is returned as a view.
        """
        # The fixed part first: magic, version, and the header length (2 or 4 bytes).
        fixed = 10 if len(self._head) > 6 and self._head[6] == 1 else 12
        if len(self._head) < fixed:
            take = fixed - len(self._head)
            self._head += data[:take]
            data = data[take:]
            if len(self._head) > 6 and self._head[6] == 1:
                fixed = 10
            if len(self._head) < fixed:
                return memoryview(b"")
        if bytes(self._head[:6]) != NPY_MAGIC:
            raise BadArrayInput(f"{self.name} is not a .npy file (bad magic or too short)")
        size_bytes = 2 if self._head[6] == 1 else 4
        start = 8 + size_bytes
        (length,) = struct.unpack("<H" if size_bytes == 2 else "<I", self._head[8:start])
        if length > MAX_HEADER_BYTES:
            raise BadArrayInput(f"{self.name}: .npy header of {length} bytes is too long")
        take = start + length - len(self._head)
        if take > 0:
            self._head += data[:take]
            data = data[take:]
        if len(self._head) < start + length:
            return memoryview(b"")
        header = parse_npy_header(self._head, name=self.name, limits=self.limits)
        if header.data_offset + header.nbytes > self.most_bytes:
            raise PayloadTooLarge(
                f"{self.name} declares {header.nbytes} bytes of data, more than the "
                f"{self.most_bytes} its upload can carry"
            )
        # Bytes read past the header (a version-1 header shorter than 2 bytes) come first.
        spill = bytes(self._head[header.data_offset :])
        rest = memoryview(spill + bytes(data)) if spill else data
        self._head = bytearray()
        self._header = header
        if header.dtype.isnative and not header.fortran_order:
            self._out = self.allocate(header.shape, header.dtype)
        else:  # reorder or byte-swap once at the end
            self._out = np.empty(header.nbytes, np.uint8)
        self._target = memoryview(self._out.reshape(-1).view(np.uint8))
        if self.off_loop is not None and header.nbytes >= array_checks.OFF_LOOP_BYTES:
            # The bytes after the header, in this chunk, had their CRC computed (in feed).
            crc = self._crc if self.verify_crc else None
            checked = min(len(rest), len(self._target))
            self._checks = ArrayChecks(self.off_loop, self._target, crc, checked)
        return rest

    def finish_bytes(self) -> int:
        """Bytes :meth:`finish` still converts (a byte swap or a reorder), 0 when none."""
        header = self._header
        if header is None or (header.dtype.isnative and not header.fortran_order):
            return 0
        return header.nbytes

    def finish(self) -> np.ndarray:
        """The decoded array; :class:`BadArrayInput` when the data is short or too long."""
        header = self._header
        if header is None:
            raise BadArrayInput(f"{self.name}: truncated .npy header")
        if self._filled < header.nbytes or self.extra:
            raise BadArrayInput(
                f"{self.name}: array data is {self._filled + self.extra} bytes, but its header "
                f"{header.dtype} {list(header.shape)} needs {header.nbytes} (truncated or corrupt "
                "file)"
            )
        assert self._out is not None
        if header.dtype.isnative and not header.fortran_order:
            return self._out
        source = np.frombuffer(self._out, dtype=header.dtype, count=math.prod(header.shape))
        return _into_native(source, header, self.allocate)
