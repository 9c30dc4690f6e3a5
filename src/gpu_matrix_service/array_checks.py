"""The checks of one large array's bytes as its upload fills the destination, off the loop.

An :class:`~gpu_matrix_service.npy_stream.NpyStream` copies each received chunk into its
destination (pinned memory on a GPU backend) on the event loop. For an array of
``OFF_LOOP_BYTES`` or more, :class:`ArrayChecks` then hands each filled block of
``CHECK_BLOCK_BYTES`` to a :class:`~gpu_matrix_service.lanes.Lane`, which runs the zip
member's CRC-32 over it and searches it for the bytes the multipart reader refuses inside file
data (its boundary). Each block is one GIL-free CRC (zlib-ng) and one GIL-free search (libc
``memmem``), and the last block is what the request waits for.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Final

from zlib_ng import zlib_ng as zlib

from gpu_matrix_service.errors import ServiceError
from gpu_matrix_service.lanes import Lane, contains

# Below this, handing the checks over costs more than running them on the loop.
OFF_LOOP_BYTES: Final = 1 << 20
CHECK_BLOCK_BYTES: Final = 8 << 20


@dataclass(frozen=True)
class Refusal:
    """Bytes that must not occur in an array's data (a multipart boundary), and what makes
    the error raised if they do."""

    needle: bytes
    error: Callable[[], ServiceError]


@dataclass
class OffLoop:
    """What a stream may hand to worker threads: the pool, and what to refuse in the data."""

    pool: Executor
    refusal: Refusal | None = None


class ArrayChecks:
    """CRC and refusal checks of ``target`` (an array's destination bytes), in order, on a
    lane of ``off_loop.pool``, for the bytes from ``checked`` on as they are filled.

    ``crc``: the CRC-32 of the member's bytes before ``checked``, or None when not verified;
    :attr:`crc` is complete once a job given to :meth:`then` runs.
    """

    def __init__(
        self, off_loop: OffLoop, target: memoryview, crc: int | None, checked: int
    ) -> None:
        self.lane = Lane(off_loop.pool)
        self.refusal = off_loop.refusal
        self.crc = crc
        self._target = target  # the jobs keep it (and the pinned block under it) alive
        self._checked = checked

    def filled(self, filled: int, *, last: bool) -> None:
        """The destination holds ``filled`` bytes; ``last``: no more come (or it is full),
        so a partial last block is handed over too."""
        while filled - self._checked >= CHECK_BLOCK_BYTES or (last and filled > self._checked):
            end = min(self._checked + CHECK_BLOCK_BYTES, filled)
            self.lane.put(self._block_check(self._checked, end))
            self._checked = end

    def _block_check(self, start: int, end: int) -> Callable[[], None]:
        target, refusal = self._target, self.refusal

        def check() -> None:  # on the lane, after the blocks before it
            if self.crc is not None:
                self.crc = zlib.crc32(target[start:end], self.crc)
            # From a needle's length before the block: one may straddle two blocks.
            if refusal is not None and contains(
                target[max(0, start - len(refusal.needle) + 1) : end], refusal.needle
            ):
                raise refusal.error()

        return check

    def past_target(self, data: memoryview) -> None:
        """Bytes of the member after the array's data: in its CRC, after the blocks."""
        if self.crc is None:
            return

        def crc() -> None:
            assert self.crc is not None
            self.crc = zlib.crc32(data, self.crc)

        self.lane.put(crc)

    def then(self, job: Callable[[], None]) -> None:
        """Run ``job`` after the checks handed over so far."""
        self.lane.put(job)

    def finish(self, filled: int) -> None:
        """Hand over the rest, wait for the checks, raise the first failure."""
        self.filled(filled, last=True)
        self.lane.wait()
        self.lane.raise_error()
