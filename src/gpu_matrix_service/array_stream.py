"""Incremental ``.npy``/``.npz`` decoding: bytes in as they arrive, straight into the array.

:class:`ArrayStream` is fed an upload chunk by chunk while the request body is still being
received. It tells a ``.npy`` (:class:`~gpu_matrix_service.npy_stream.NpyStream`) from an
``.npz`` (:class:`~gpu_matrix_service.npz_stream.NpzStream`) by its first bytes and feeds the
rest there: the upload is never assembled in a buffer and copied again. Given a thread pool, a
large array's checks run off the event loop (:mod:`~gpu_matrix_service.array_checks`). Zip
files this cannot follow as a stream (sizes only in a trailing data descriptor, or an unknown
first record) are kept whole and handed to :func:`gpu_matrix_service.arrays.decode_array` at
the end, so they get the same answer as the whole-file decoder, errors included. Refused here
but read by the whole-file decoder (the command line's): bzip2 and LZMA members, which numpy
never writes and which would hold the event loop while they inflate, and data descriptors
after a streamed member.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from typing import Final

import numpy as np

from gpu_matrix_service.array_checks import OffLoop, Refusal
from gpu_matrix_service.arrays import (
    NPY_MAGIC,
    Allocator,
    ArrayLimits,
    _numpy_empty,
    decode_array,
)
from gpu_matrix_service.errors import ServiceError
from gpu_matrix_service.lanes import Lane
from gpu_matrix_service.npy_stream import NpyStream
from gpu_matrix_service.npz_stream import NpzStream
from gpu_matrix_service.zip_records import LOCAL_SIGNATURE, decode_in_one_piece

# finish() work beyond this many bytes goes to a worker thread (Upload.operands).
HEAVY_FINISH_BYTES: Final = 1 << 20


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
