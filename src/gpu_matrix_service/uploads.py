"""Reading a multipart upload as it streams in, decoding each file part as it arrives.

FastAPI's ``UploadFile`` spools each part to a temporary file and reads it back, then the
decoder copies it again. Here the body goes through a :class:`~gpu_matrix_service.
multipart_splitter.MultipartSplitter` as it arrives, each file part straight into its
destination array, and a small body that arrives in one chunk is read whole (natively when it
can be). The byte cap is enforced on ``Content-Length`` before reading and on the bytes
received.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
from python_multipart.multipart import parse_options_header

# zlib-ng: the same API as zlib, with SIMD CRC-32 (about 4x zlib's).
from zlib_ng import zlib_ng as zlib

from gpu_matrix_service.array_stream import ArrayStream
from gpu_matrix_service.errors import BadRequest, PayloadTooLarge, ServiceError
from gpu_matrix_service.multipart_splitter import (
    MAX_HEADER_BYTES,
    MAX_PARTS,
    MAX_TEXT_FIELD_BYTES,
    MultipartSplitter,
    Part,
    part_from_headers,
    utf8_name,
)
from gpu_matrix_service.native.whole_body import PART_INTS
from gpu_matrix_service.whole_body import WHOLE_BODY_BYTES, split_whole_body

# Canonical operand field names, used in this order when both are present.
CANONICAL_FIELDS: Final = ("file_a", "file_b")
# decode(name, data): a whole file's array, or None to leave it to an ArrayStream.
WholeFileDecoder = Callable[[str, memoryview], np.ndarray | None]
# decode(name, header_text, encoding, data): a laid-out .npy's array, or None to decline.
LaidOutDecoder = Callable[[str, bytes, str, memoryview], np.ndarray | None]
# read(body, boundary): the upload of a body that arrived whole, or None for the splitter.
WholeBodyReader = Callable[[bytes, bytes], "Upload | None"]


class UnsupportedMediaType(ServiceError):
    """The body is not ``multipart/form-data``."""

    status_code = 415


@dataclass
class Upload:
    """The parts of one request in arrival order, its size, and seconds spent decoding.

    File parts were decoded while they arrived; :meth:`operands` finishes the two it returns.
    """

    parts: list[Part]
    body_bytes: int
    decode_seconds: float

    @property
    def files(self) -> list[Part]:
        """File parts, in arrival order."""
        return [part for part in self.parts if part.is_file]

    def text_fields(self) -> dict[str, str]:
        """Non-file parts as text (``latin-1`` never fails), first occurrence wins."""
        fields: dict[str, str] = {}
        for part in self.parts:
            if not part.is_file:
                fields.setdefault(part.name, part.text.decode("latin-1"))
        return fields

    async def operands(self, count: int = 2) -> list[Part]:
        """Exactly ``count`` file parts: ``file_a``/``file_b`` when present, else in order,
        their arrays finished. A finish that is heavy (a whole file to decode, a large byte
        swap) runs on a worker thread, not on the event loop."""
        files = self._pick(count)
        if all(part.array is not None for part in files):  # read whole: nothing to finish
            return files
        start = time.perf_counter()
        for part in files:
            if part.stream is not None and part.stream.busy:  # CRC or search still running
                await asyncio.to_thread(part.stream.wait)
        for part in files:
            if part.array is None and part.stream is not None:
                if part.stream.heavy_finish:
                    part.array = await asyncio.to_thread(part.stream.finish)
                else:
                    part.array = part.stream.finish()
        self.decode_seconds += time.perf_counter() - start
        return files

    def _pick(self, count: int) -> list[Part]:
        files = self.files
        if len(files) != count:
            names = ", ".join(repr(part.name) for part in files) or "none"
            raise BadRequest(
                f"expected exactly {count} uploaded files (fields file_a and file_b), got "
                f"{len(files)} ({names})"
            )
        wanted = CANONICAL_FIELDS[:count]
        if count == 2 and files[0].name == wanted[0] and files[1].name == wanted[1]:
            return files  # as clients send them: in order already
        by_name = {part.name: part for part in files}
        if all(name in by_name for name in wanted):
            files = [by_name[name] for name in wanted]
        return files


def read_whole_body(
    body: bytes, boundary: bytes, decode: WholeFileDecoder, max_files: int = 2
) -> Upload | None:
    """The upload of a body that arrived whole, its files decoded by ``decode(name, data)``
    (None to decline), or None when anything about it is left to :class:`MultipartSplitter`,
    which words every error; the first it would meet is the one raised here, if any."""
    start = time.perf_counter()
    pieces = split_whole_body(
        body, boundary, max_parts=MAX_PARTS, max_header_bytes=MAX_HEADER_BYTES
    )
    if pieces is None:
        return None
    parts: list[Part] = []
    files = 0
    for block, content in pieces:
        # A part without a name raises the splitter's own 400: it would meet that part next.
        part = part_from_headers(block)
        if part.is_file:
            files += 1
            part.array = decode(part.name, content) if files <= max_files else None
            if part.array is None:
                return None
        elif len(content) > MAX_TEXT_FIELD_BYTES:
            return None
        else:
            part.text += content
        parts.append(part)
    return Upload(parts, len(body), time.perf_counter() - start)


def whole_body_reader(
    decode: WholeFileDecoder,
    layout: Callable[[bytes, bytes], list[int] | None] | None = None,
    decode_laid_out: LaidOutDecoder | None = None,
    verify_crc: bool = True,
) -> WholeBodyReader:
    """``read(body, boundary)`` for :func:`read_multipart`: the native reader's ``layout``
    finished by :func:`read_laid_out_body` when it lays the body out, else
    :func:`read_whole_body` with ``decode``."""

    def read(body: bytes, boundary: bytes) -> Upload | None:
        if layout is not None and decode_laid_out is not None:
            found = layout(body, boundary)
            if found is not None:
                upload = read_laid_out_body(body, found, decode_laid_out, verify_crc)
                if upload is not None:
                    return upload
        return read_whole_body(body, boundary, decode)

    return read


def read_laid_out_body(
    body: bytes, layout: list[int], decode: LaidOutDecoder, verify_crc: bool
) -> Upload | None:
    """The two-file upload the native reader laid out (``native/whole_body.py``): names from
    their spans, a stored member's CRC-32 checked when ``verify_crc``, each array decoded by
    ``decode(name, header_text, encoding, data)``; None when a file is not decoded so (the
    Python readers then read the body)."""
    start = time.perf_counter()
    view = memoryview(body)
    parts: list[Part] = []
    for first in range(0, len(layout), PART_INTS):
        part_layout = layout[first : first + PART_INTS]
        (name_start, name_end, filename_start, filename_end, type_start, type_end,
         file_start, text_start, data_start, file_end, crc, utf8) = part_layout  # fmt: skip
        if crc >= 0 and verify_crc and zlib.crc32(view[file_start:file_end]) != crc:
            return None
        part = Part(
            utf8_name(body[name_start:name_end].decode("latin-1")),
            utf8_name(body[filename_start:filename_end].decode("latin-1")),
            None if type_start < 0 else body[type_start:type_end].decode("latin-1"),
        )
        encoding = "utf8" if utf8 else "latin1"
        text = body[text_start:data_start]
        part.array = decode(part.name, text, encoding, view[data_start:file_end])
        if part.array is None:
            return None
        parts.append(part)
    return Upload(parts, len(body), time.perf_counter() - start)


# What clients send: multipart/form-data; boundary=<1 to 70 token characters>.
PLAIN_MULTIPART: Final = re.compile(
    r"multipart/form-data; ?boundary=([0-9A-Za-z'()+_,./:=?-]{1,70})"
)


def multipart_boundary(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` content type, or 415/400 saying what is wrong."""
    plain = PLAIN_MULTIPART.fullmatch(content_type or "")
    if plain is not None:
        return plain.group(1).encode("latin-1")
    media, options = parse_options_header(content_type)
    if media != b"multipart/form-data":
        raise UnsupportedMediaType(
            f"send the matrices as multipart/form-data file uploads (got content type "
            f"{content_type or 'none'!r})"
        )
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise BadRequest("multipart/form-data content type has no valid boundary")
    return boundary


async def read_multipart(
    chunks: AsyncIterator[bytes],
    *,
    content_type: str | None,
    content_length: str | None,
    max_bytes: int,
    open_file: Callable[[str, int], ArrayStream],
    read_whole: WholeBodyReader | None = None,
) -> Upload:
    """Parse a streamed ``multipart/form-data`` body, decoding file parts as they arrive;
    a small body that arrives in one chunk is read by ``read_whole(body, boundary)`` when it
    can be (:func:`read_whole_body`, or the native reader first).

    Raises :class:`PayloadTooLarge` when ``Content-Length`` or the bytes received exceed
    ``max_bytes``, :class:`UnsupportedMediaType` or :class:`BadRequest` for a malformed body,
    and the decoders' errors for bad arrays.
    """
    boundary = multipart_boundary(content_type)
    declared = content_length if content_length and content_length.isascii() else ""
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(
            f"request body of {int(declared)} bytes exceeds the limit of {max_bytes}"
        )
    expected = int(declared) if declared.isdigit() else None
    small = expected is not None and expected <= WHOLE_BODY_BYTES
    whole_reader = read_whole if small else None
    # Made when the body is not read whole: most small bodies never need one.
    splitter: MultipartSplitter | None = None
    received, upload = 0, None
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > max_bytes:
                raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
            if whole_reader is not None and received == len(chunk) == expected:
                upload = whole_reader(bytes(chunk), boundary)
            if upload is None:
                if splitter is None:
                    most = max_bytes if expected is None else expected
                    splitter = MultipartSplitter(boundary, open_file, most)
                splitter.feed(chunk)
        if upload is not None:
            return upload
        if splitter is None:  # no body at all
            splitter = MultipartSplitter(boundary, open_file, max_bytes)
        splitter.close()
    except BaseException:  # a bad body, a disconnect, a timeout: stop the checks
        if splitter is not None:
            splitter.abandon()
        raise
    return Upload(splitter.parts, received, splitter.decode_seconds)
