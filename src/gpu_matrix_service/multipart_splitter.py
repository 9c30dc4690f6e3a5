"""Splitting a ``multipart/form-data`` body into parts as it streams in.

The body is split chunk by chunk as it arrives (``bytes.find`` for the boundary, slices as
memoryviews, so part data is never copied on the way) and each file part's bytes go straight
to an :class:`~gpu_matrix_service.array_stream.ArrayStream`, which writes them into the
destination array (pinned memory on a GPU backend).

A large array's data (its decoder knows how many bytes are left) is passed on without a
search on the event loop: the decoder scans it off the loop, in blocks of the destination,
for the boundary, which must not occur inside it (a 400 if it does, as for the truncated file
a part cut there would be). The last bytes of the array's data before the rest of the part
are searched here as usual, so a delimiter that starts inside the data and ends after it is
found too.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Final

import numpy as np
from python_multipart.multipart import parse_options_header

from gpu_matrix_service.array_stream import ArrayStream
from gpu_matrix_service.errors import BadRequest

# More parts than this is no upload of two matrices; stop parsing early.
MAX_PARTS: Final = 16
# Text fields (non-file parts) are kept only up to this size; part headers likewise.
MAX_TEXT_FIELD_BYTES: Final = 1024
MAX_HEADER_BYTES: Final = 16 * 1024
# Shorter stretches of array data are searched on the event loop like any part content.
MIN_PLAIN_STRETCH: Final = 4096


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
        return Part(
            utf8_name(name), None if filename is None else utf8_name(filename), content_type
        )
    headers = {}
    for line in block.split(b"\r\n"):
        key, sep, value = line.partition(b":")
        if sep:
            headers[key.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    name, filename = _form_data_names(headers.get("content-disposition"))
    return Part(name=name, filename=filename, content_type=headers.get("content-type"))


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


def _form_data_names(disposition: str | None) -> tuple[str, str | None]:
    """A part's field name and file name (None for a text field) from its
    Content-Disposition: the common spelling by a regex, anything else by python-multipart."""
    plain = PLAIN_DISPOSITION.fullmatch(disposition or "")
    if plain is not None:
        name, filename = plain.groups()
        return utf8_name(name), None if filename is None else utf8_name(filename)
    kind, options = parse_options_header(disposition)
    if kind != b"form-data" or b"name" not in options:
        raise BadRequest("a multipart part lacks a Content-Disposition: form-data name")
    filename = options.get(b"filename")
    return (
        options[b"name"].decode("utf-8", "replace"),
        None if filename is None else filename.decode("utf-8", "replace"),
    )


def utf8_name(latin1: str) -> str:
    """Header text was decoded as latin-1; names are UTF-8 bytes (as python-multipart reads)."""
    return latin1 if latin1.isascii() else latin1.encode("latin-1").decode("utf-8", "replace")
