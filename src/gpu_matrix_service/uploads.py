"""Reading a multipart upload as it streams in, decoding each file part as it arrives.

FastAPI's ``UploadFile`` spools each part to a temporary file and reads it back, then the
decoder copies it again. Here the body is split into parts chunk by chunk as it arrives
(``bytes.find`` for the boundary, slices as memoryviews, so part data is never copied on the
way) and each file part's bytes go straight to an :class:`~gpu_matrix_service.array_stream.
ArrayStream`, which writes them into the destination array (pinned memory on a GPU backend).
The byte cap is enforced on ``Content-Length`` before reading and on the bytes received.

A large array's data (its decoder knows how many bytes are left) is passed on without a
search on the event loop: the decoder scans it off the loop, in blocks of the destination,
for the boundary, which must not occur inside it (a 400 if it does, as for the truncated file
a part cut there would be). The last bytes of the array's data before the rest of the part
are searched here as usual, so a delimiter that starts inside the data and ends after it is
found too.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Final

import numpy as np
from python_multipart.multipart import parse_options_header

# zlib-ng: the same API as zlib, with SIMD CRC-32 (about 4x zlib's).
from zlib_ng import zlib_ng as zlib

from gpu_matrix_service.array_stream import ArrayStream
from gpu_matrix_service.errors import BadRequest, PayloadTooLarge, ServiceError
from gpu_matrix_service.native.whole_body import PART_INTS
from gpu_matrix_service.whole_body import WHOLE_BODY_BYTES, split_whole_body

# Canonical operand field names, used in this order when both are present.
CANONICAL_FIELDS: Final = ("file_a", "file_b")
# More parts than this is no upload of two matrices; stop parsing early.
MAX_PARTS: Final = 16
# Text fields (non-file parts) are kept only up to this size; part headers likewise.
MAX_TEXT_FIELD_BYTES: Final = 1024
MAX_HEADER_BYTES: Final = 16 * 1024
# Shorter stretches of array data are searched on the event loop like any part content.
MIN_PLAIN_STRETCH: Final = 4096
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
class Part:
    """One multipart part: field name, file name (None for a text field), and its content.

    A file part's bytes go to ``stream`` as they arrive; a text part's gather in ``text``.
    """

    name: str
    filename: str | None
    content_type: str | None
    stream: ArrayStream | None = None
    text: bytearray = field(default_factory=bytearray, repr=False)
    array: np.ndarray | None = field(default=None, repr=False)

    @property
    def is_file(self) -> bool:
        """A part is an operand when it carries a file name or a non-text content type."""
        if self.filename is not None:
            return True
        return self.content_type is not None and not self.content_type.startswith("text/")

    def take(self, data: memoryview) -> None:
        """The next bytes of this part's content."""
        if self.stream is not None:
            self.stream.feed(data)
            return
        if len(self.text) + len(data) > MAX_TEXT_FIELD_BYTES:
            raise BadRequest(f"text field {self.name!r} is longer than {MAX_TEXT_FIELD_BYTES}")
        self.text += data


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
        by_name = {part.name: part for part in files}
        if all(name in by_name for name in CANONICAL_FIELDS[:count]):
            files = [by_name[name] for name in CANONICAL_FIELDS[:count]]
        return files


class _State(Enum):
    DATA = auto()  # inside a part's content (or the preamble), looking for the delimiter
    AFTER_DELIMITER = auto()  # just past a delimiter: "--" ends the body, CRLF starts a part
    HEADERS = auto()  # a part's header block, up to an empty line
    EPILOGUE = auto()  # after the closing delimiter: ignored


class MultipartSplitter:
    """Splits a ``multipart/form-data`` body, fed in chunks, into parts.

    ``open_file(name, most_bytes)`` gives the :class:`ArrayStream` for a file part; at most
    ``max_files`` are accepted. Part data is passed on
    as memoryview slices of the received chunks: found with ``bytes.find`` and never copied,
    except for the few bytes at a chunk's end that might begin a delimiter.
    """

    def __init__(
        self,
        boundary: bytes,
        open_file: Callable[[str, int], ArrayStream],
        body_bytes: int,
        max_files: int = 2,
    ) -> None:
        self.delimiter = b"\r\n--" + boundary
        self.open_file = open_file
        self.body_bytes = body_bytes  # the most the body can be: Content-Length or the cap
        self.max_files = max_files
        self.parts: list[Part] = []
        self._files = 0  # file parts among them
        self._state = _State.DATA
        self._current: Part | None = None  # None in the preamble
        # The body starts with "--boundary", which is the delimiter without its CRLF.
        self._tail = b"\r\n"
        self._pending = bytearray()  # small states: header block, bytes after a delimiter
        self.decode_seconds = 0.0

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of the body."""
        if not isinstance(chunk, bytes):
            chunk = bytes(chunk)
        position = 0
        while position < len(chunk):
            if self._state is _State.DATA:
                position = self._feed_data(chunk, position)
            elif self._state is _State.AFTER_DELIMITER:
                position = self._after_delimiter(chunk, position)
            elif self._state is _State.HEADERS:
                position = self._feed_headers(chunk, position)
            else:
                return

    def _emit(self, data: memoryview | bytes) -> None:
        if self._current is not None and len(data):
            start = time.perf_counter()
            self._current.take(memoryview(data))
            self.decode_seconds += time.perf_counter() - start

    def _feed_data(self, chunk: bytes, position: int) -> int:
        """Pass part content on up to the next delimiter; returns the position after it."""
        delimiter, keep = self.delimiter, len(self.delimiter) - 1
        if self._tail:
            # A delimiter may straddle the previous chunk's end and this one's start.
            probe = self._tail + chunk[position : position + keep]
            found = probe.find(delimiter)
            if found != -1 and found < len(self._tail):
                self._emit(self._tail[:found])
                after = position + found + len(delimiter) - len(self._tail)
                self._tail = b""
                self._end_part()
                return after
            if len(chunk) - position < keep:  # too short to decide: carry it over
                cut = max(0, len(probe) - keep)
                self._emit(probe[:cut])
                self._tail = probe[cut:]
                return len(chunk)
            self._emit(self._tail)
            self._tail = b""
        view = memoryview(chunk)
        position = self._pass_plain(chunk, view, position)
        found = chunk.find(delimiter, position)
        if found != -1:
            self._emit(view[position:found])
            self._end_part()
            return found + len(delimiter)
        cut = max(position, len(chunk) - keep)
        self._emit(view[position:cut])
        self._tail = chunk[cut:]
        return len(chunk)

    def _pass_plain(self, chunk: bytes, view: memoryview, position: int) -> int:
        """Pass on, unsearched here, array data that the current part's decoder searches for
        the delimiter off the loop; returns the position after it. Its last ``keep`` bytes,
        in this chunk and in the array, are left to the search here: a delimiter starting
        there may end past the array's data, where the decoder does not look."""
        part, keep = self._current, len(self.delimiter) - 1
        if part is None or part.stream is None:
            return position
        end = position + min(part.stream.plain_bytes() - keep, len(chunk) - position - keep)
        if end - position < MIN_PLAIN_STRETCH:
            return position
        self._emit(view[position:end])
        return end

    def abandon(self) -> None:
        """The body failed: its decoders' work off the loop is not wanted."""
        for part in self.parts:
            if part.stream is not None:
                part.stream.abandon()

    def _end_part(self) -> None:
        if self._current is not None and self._current.stream is not None:
            self._current.stream.end()
        self._current = None
        self._state = _State.AFTER_DELIMITER

    def _after_delimiter(self, chunk: bytes, position: int) -> int:
        if not self._pending and len(chunk) - position >= 2:  # the usual case: both bytes here
            marker = chunk[position : position + 2]
            position += 2
        else:
            need = 2 - len(self._pending)
            self._pending += chunk[position : position + need]
            position += need
            if len(self._pending) < 2:
                return len(chunk)
            marker, self._pending = bytes(self._pending), bytearray()
        if marker == b"--":
            self._state = _State.EPILOGUE
        elif marker == b"\r\n":
            self._state = _State.HEADERS
        else:
            raise BadRequest("malformed multipart body: bad delimiter line")
        return position

    def _feed_headers(self, chunk: bytes, position: int) -> int:
        if not self._pending:  # the usual case: the whole block is in this chunk, read it there
            end = chunk.find(b"\r\n\r\n", position, position + MAX_HEADER_BYTES)
            if end != -1:
                self._start_part(chunk[position:end])
                return end + 4
        before = len(self._pending)
        # A block and its blank line fit in MAX_HEADER_BYTES, as in the one-chunk search
        # above: gather at most that, never a whole chunk.
        taken = chunk[position : position + MAX_HEADER_BYTES - before]
        self._pending += taken
        end = self._pending.find(b"\r\n\r\n", max(0, before - 3))
        if end == -1:
            if len(self._pending) >= MAX_HEADER_BYTES:  # no room left for the blank line
                raise BadRequest(
                    f"malformed multipart body: part headers longer than {MAX_HEADER_BYTES} bytes"
                )
            return position + len(taken)  # the chunk's end: it had fewer bytes than that
        block, self._pending = bytes(self._pending[:end]), bytearray()
        self._start_part(block)
        return position + end + 4 - before

    def _start_part(self, block: bytes) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise BadRequest(f"too many parts in the upload (more than {MAX_PARTS})")
        part = part_from_headers(block)
        if part.is_file:
            if self._files >= self.max_files:
                # Refused before a decoder (and its memory) exists for it.
                raise BadRequest(
                    f"expected exactly {self.max_files} uploaded files (fields file_a and "
                    f"file_b), got {self._files + 1} or more"
                )
            self._files += 1
            part.stream = self.open_file(part.name, self.body_bytes)
            # Large array data is searched for the delimiter off the event loop instead.
            part.stream.refuse(self.delimiter, lambda name=part.name: _boundary_inside(name))
        self.parts.append(part)
        self._current = part
        self._state = _State.DATA

    def close(self) -> None:
        """Check the body ended with its closing delimiter."""
        if self._state is not _State.EPILOGUE:
            raise BadRequest("malformed multipart body: it ends before its closing boundary")


def part_from_headers(block: bytes) -> Part:
    """A part (without content yet) from its header block; 400 without a form-data name."""
    plain = PLAIN_PART_HEADERS.fullmatch(block)
    if plain is not None:
        name, filename, content_type = (
            None if value is None else value.decode("latin-1") for value in plain.groups()
        )
        assert name is not None
        return Part(_utf8(name), None if filename is None else _utf8(filename), content_type)
    headers = {}
    for line in block.split(b"\r\n"):
        key, sep, value = line.partition(b":")
        if sep:
            headers[key.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    name, filename = _form_data_names(headers.get("content-disposition"))
    return Part(name=name, filename=filename, content_type=headers.get("content-type"))


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
            _utf8(body[name_start:name_end].decode("latin-1")),
            _utf8(body[filename_start:filename_end].decode("latin-1")),
            None if type_start < 0 else body[type_start:type_end].decode("latin-1"),
        )
        encoding = "utf8" if utf8 else "latin1"
        text = body[text_start:data_start]
        part.array = decode(part.name, text, encoding, view[data_start:file_end])
        if part.array is None:
            return None
        parts.append(part)
    return Upload(parts, len(body), time.perf_counter() - start)


def _boundary_inside(name: str) -> BadRequest:
    # A stricter reader would end the part there: a truncated file, a 400 as well.
    return BadRequest(
        f"malformed multipart body: the boundary occurs inside the data of file {name!r}"
    )


# What clients send: form-data; name="a"; filename="a.npz" with nothing to unescape.
PLAIN_DISPOSITION: Final = re.compile(r'form-data; name="([^"\\]*)"(?:; filename="([^"\\]*)")?')


# The header block clients send, read in one step: a Content-Disposition as above, maybe a
# Content-Type without spaces. Anything else is read line by line (the same answer).
PLAIN_PART_HEADERS: Final = re.compile(
    rb'Content-Disposition: form-data; name="([^"\\\r\n]*)"(?:; filename="([^"\\\r\n]*)")?'
    rb"(?:\r\nContent-Type: (\S+))?"
)


# What clients send: multipart/form-data; boundary=<1 to 70 token characters>.
PLAIN_MULTIPART: Final = re.compile(
    r"multipart/form-data; ?boundary=([0-9A-Za-z'()+_,./:=?-]{1,70})"
)


def _form_data_names(disposition: str | None) -> tuple[str, str | None]:
    """A part's field name and file name (None for a text field) from its
    Content-Disposition: the common spelling by a regex, anything else by python-multipart."""
    plain = PLAIN_DISPOSITION.fullmatch(disposition or "")
    if plain is not None:
        name, filename = plain.groups()
        return _utf8(name), None if filename is None else _utf8(filename)
    kind, options = parse_options_header(disposition)
    if kind != b"form-data" or b"name" not in options:
        raise BadRequest("a multipart part lacks a Content-Disposition: form-data name")
    filename = options.get(b"filename")
    return (
        options[b"name"].decode("utf-8", "replace"),
        None if filename is None else filename.decode("utf-8", "replace"),
    )


def _utf8(latin1: str) -> str:
    """Header text was decoded as latin-1; names are UTF-8 bytes (as python-multipart reads)."""
    return latin1 if latin1.isascii() else latin1.encode("latin-1").decode("utf-8", "replace")


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
