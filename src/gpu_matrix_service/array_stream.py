"""Incremental ``.npy``/``.npz`` decoding: bytes in as they arrive, straight into the array.

:class:`ArrayStream` is fed an upload chunk by chunk while the request body is still being
received. As soon as a ``.npy`` header (bare, or the first bytes of an ``.npz`` member) is
complete it asks the allocator for the destination array, pinned staging memory on a GPU
backend, and from then on every chunk is copied there once: the upload is never assembled
in a buffer and copied again. Stored ``.npz`` members are copied as they are, deflated ones
are inflated chunk by chunk. Given a thread pool, the CRC of a large array's bytes, and the
multipart reader's check that its boundary is not among them, run off the event loop in
blocks of the destination (:mod:`~gpu_matrix_service.array_checks`). Zip files this cannot
follow as a stream (sizes only in a trailing data descriptor, or an unknown first record) are
kept whole and handed to
:func:`gpu_matrix_service.arrays.decode_array` at the end, so they get the same answer as the
whole-file decoder, errors included. Refused here but read by the whole-file decoder (the
command line's): bzip2 and LZMA members, which numpy never writes and which would hold the
event loop while they inflate, and data descriptors after a streamed member.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Final

import numpy as np
from zlib_ng import zlib_ng as zlib

from gpu_matrix_service import array_checks
from gpu_matrix_service.array_checks import ArrayChecks, OffLoop, Refusal
from gpu_matrix_service.arrays import (
    MAX_HEADER_BYTES,
    NPY_MAGIC,
    PREFERRED_KEYS,
    Allocator,
    ArrayLimits,
    NpyHeader,
    _into_native,
    _numpy_empty,
    decode_array,
    parse_npy_header,
)
from gpu_matrix_service.errors import BadArrayInput, PayloadTooLarge, ServiceError
from gpu_matrix_service.lanes import Lane
from gpu_matrix_service.zip_records import (
    DEFLATED,
    LOCAL_HEADER,
    LOCAL_SIGNATURE,
    STORED,
    TRAILER_SIGNATURES,
    decode_in_one_piece,
    zip64_sizes,
)

# Inflate at most this much per call, so a bomb never gets ahead of the size checks.
INFLATE_STEP: Final = 4 * 1024 * 1024
# finish() work beyond this many bytes goes to a worker thread (Upload.operands).
HEAVY_FINISH_BYTES: Final = 1 << 20


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


class ArrayStream:
    """One uploaded file: ``.npy`` or ``.npz``, decoded while it arrives.

    ``feed`` takes chunks, ``finish`` returns the native-order array or raises the same
    :class:`~gpu_matrix_service.errors.ServiceError` the whole-file decoder would. With a
    ``pool``, a large array's checks run there (:attr:`busy` until done, :meth:`wait`).
    """

    def __init__(
        self,
        name: str,
        limits: ArrayLimits,
        allocate: Allocator = _numpy_empty,
        most_bytes: int | None = None,
        pool: Executor | None = None,
    ) -> None:
        # most_bytes: the most this upload can be (the rest of the request body).
        self.name, self.limits, self.allocate = name, limits, allocate
        self.off_loop = None if pool is None else OffLoop(pool)
        self.most_bytes = most_bytes if most_bytes is not None else limits.max_bytes * 2
        self._sniff = bytearray()
        self._stream: NpyStream | NpzStream | None = None
        self._whole: bytearray | None = None  # kept when streaming is not possible
        self._replay = bytearray()  # an .npz's bytes until its first member's data starts
        # The first piece is held until it is known whether more follow: a file that came
        # whole is read in a few steps (zip_records.decode_in_one_piece) when it ends.
        self._held: memoryview | None = None
        self._started = False
        self._in_one_piece: np.ndarray | None = None
        self.size = 0

    def feed(self, data: memoryview) -> None:
        """Take the next chunk of the upload. Its bytes must not change until the next call
        (the first chunk may be kept as a view until then)."""
        if self._held is not None:
            held, self._held = self._held, None
            self._consume(held)
        elif not self._started:
            self._started = True
            self._held = data
            return
        self._consume(data)

    def end(self) -> None:
        """No more bytes come. A file that came in one piece in numpy's own layout is decoded
        now, in a few steps; anything else goes through the stream as usual."""
        held, self._held = self._held, None
        if held is None:
            return
        array = decode_in_one_piece(held, name=self.name, limits=self.limits,
                                    allocate=self.allocate)  # fmt: skip
        if array is None:
            self._consume(held)
        else:
            self.size += len(held)
            self._in_one_piece = array

    def _consume(self, data: memoryview) -> None:
        self.size += len(data)
        if self._whole is not None:
            self._whole += data
            return
        if self._stream is None:
            # Only the 6 bytes that tell .npy from .npz are set aside, not the chunk.
            earlier = bytes(self._sniff)
            self._sniff += data[: 6 - len(earlier)]
            if len(self._sniff) < 6:
                return
            self._stream = self._open(bytes(self._sniff))
            self._sniff = bytearray()
            if earlier:
                data = memoryview(earlier + bytes(data))
            if self._stream is None:
                self._whole = bytearray(data)
                return
        stream = self._stream
        if isinstance(stream, NpzStream) and not stream.keys:
            # Until the first member's header says whether sizes come first, keep what
            # came, in case the whole file must be decoded after all.
            stream.feed(data)
            if stream.needs_whole_file:
                self._whole, self._stream = self._replay + data, None
            elif stream.keys:
                self._replay = bytearray()
            else:
                self._replay += data
            return
        stream.feed(data)

    @property
    def heavy_finish(self) -> bool:
        """Whether :meth:`finish` has more work than an event loop should hold: any
        whole-file decode (sizes in data descriptors: a few compressed bytes can inflate to
        the array limit), or a byte swap or reorder of more than ``HEAVY_FINISH_BYTES``.
        Ends the input (:meth:`end`)."""
        self.end()
        if self._in_one_piece is not None:
            return False
        if self._stream is None:
            return True
        return self._stream.finish_bytes() > HEAVY_FINISH_BYTES

    def _open(self, magic: bytes) -> NpyStream | NpzStream | None:
        if magic == NPY_MAGIC:
            return NpyStream(self.name, self.limits, self.allocate, self.most_bytes,
                             off_loop=self.off_loop)  # fmt: skip
        if magic[:4] == LOCAL_SIGNATURE:
            return NpzStream(self.name, self.limits, self.allocate, self.off_loop)
        return None  # garbage or an odd zip: the whole-file decoder says what is wrong

    def refuse(self, needle: bytes, error: Callable[[], ServiceError]) -> None:
        """Have :meth:`finish` raise ``error()`` if ``needle`` occurs in a large array's data
        as it came (stored, not inflated), searched off the loop; then :meth:`plain_bytes`
        may be more than 0. Call it before the first :meth:`feed`; without a pool it does
        nothing."""
        if self.off_loop is not None:
            self.off_loop.refusal = Refusal(needle, error)

    def plain_bytes(self) -> int:
        """How many of the next bytes are array data this stream searches for the refused
        bytes itself: a multipart reader may pass them on without searching them."""
        if self._held is not None or self._stream is None:
            return 0
        return self._stream.plain_bytes()

    def _lanes(self) -> list[Lane]:
        if isinstance(self._stream, NpzStream):
            return self._stream.lanes()
        if isinstance(self._stream, NpyStream) and self._stream.lane is not None:
            return [self._stream.lane]
        return []

    @property
    def busy(self) -> bool:
        """Whether checks are still running off the loop."""
        return any(lane.busy for lane in self._lanes())

    def wait(self) -> None:
        """Block until the checks off the loop are done (a worker thread's call)."""
        for lane in self._lanes():
            lane.wait()

    def abandon(self) -> None:
        """The upload failed: skip the checks not yet started."""
        for lane in self._lanes():
            lane.abandon()

    def finish(self) -> np.ndarray:
        """The decoded array (ends the input first)."""
        self.end()
        if self._stream is not None:  # normally done: Upload.operands waits off the loop
            self._stream.finish_checks()
        if self._in_one_piece is not None:
            return self._in_one_piece
        if self._stream is None:
            whole = self._whole if self._whole is not None else self._sniff
            return decode_array(whole, name=self.name, limits=self.limits, allocate=self.allocate)
        return self._stream.finish()


StreamFactory = Callable[[str], ArrayStream]
