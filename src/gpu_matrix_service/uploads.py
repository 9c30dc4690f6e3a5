"""Reading a multipart upload as it streams in, into memory, under a byte cap.

FastAPI's ``UploadFile`` spools each part to a temporary file and reads it back; here the body
is parsed chunk by chunk as it arrives (python-multipart's streaming parser) and each file
part lands in one in-memory buffer. The cap is enforced on ``Content-Length`` before reading
and on the bytes actually received while reading, so an oversized body is refused early.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from gpu_matrix_service.errors import BadRequest, PayloadTooLarge, ServiceError

# Canonical operand field names, used in this order when both are present.
CANONICAL_FIELDS: Final = ("file_a", "file_b")
# More parts than this is no upload of two matrices; stop parsing early.
MAX_PARTS: Final = 16
# Text fields (non-file parts) are kept only up to this size.
MAX_TEXT_FIELD_BYTES: Final = 1024


class UnsupportedMediaType(ServiceError):
    """The body is not ``multipart/form-data``."""

    status_code = 415


@dataclass
class Part:
    """One multipart part: its field name, file name (None for a text field) and bytes."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytearray = field(default_factory=bytearray, repr=False)

    @property
    def is_file(self) -> bool:
        """A part is an operand when it carries a file name or a non-text content type."""
        if self.filename is not None:
            return True
        return self.content_type is not None and not self.content_type.startswith("text/")


@dataclass
class Upload:
    """The parts of one request, in the order they arrived, and its size in bytes."""

    parts: list[Part]
    body_bytes: int

    @property
    def files(self) -> list[Part]:
        """File parts, in arrival order."""
        return [part for part in self.parts if part.is_file]

    def text_fields(self) -> dict[str, str]:
        """Non-file parts as text (``latin-1`` never fails), first occurrence wins."""
        fields: dict[str, str] = {}
        for part in self.parts:
            if not part.is_file:
                fields.setdefault(part.name, part.data.decode("latin-1"))
        return fields

    def operands(self, count: int = 2) -> list[Part]:
        """Exactly ``count`` file parts: ``file_a``/``file_b`` when present, else in order."""
        files = self.files
        if len(files) != count:
            names = ", ".join(repr(part.name) for part in files) or "none"
            raise BadRequest(
                f"expected exactly {count} uploaded files (fields file_a and file_b), got "
                f"{len(files)} ({names})"
            )
        by_name = {part.name: part for part in files}
        if all(name in by_name for name in CANONICAL_FIELDS[:count]):
            return [by_name[name] for name in CANONICAL_FIELDS[:count]]
        return files


class _PartCollector:
    """python-multipart callbacks that gather parts and their headers."""

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, str] = {}
        self._current: Part | None = None

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
        }

    def _part_begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise BadRequest(f"too many parts in the upload (more than {MAX_PARTS})")
        self._headers = {}

    def _header_end(self) -> None:
        key = self._header_field.decode("latin-1").strip().lower()
        self._headers[key] = self._header_value.decode("latin-1").strip()
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get("content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise BadRequest("a multipart part lacks a Content-Disposition: form-data name")
        filename = options.get(b"filename")
        self._current = Part(
            name=options[b"name"].decode("utf-8", "replace"),
            filename=None if filename is None else filename.decode("utf-8", "replace"),
            content_type=self._headers.get("content-type"),
        )
        self.parts.append(self._current)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current
        if part is None:
            return
        if not part.is_file and len(part.data) + (end - start) > MAX_TEXT_FIELD_BYTES:
            raise BadRequest(f"text field {part.name!r} is longer than {MAX_TEXT_FIELD_BYTES}")
        part.data += memoryview(data)[start:end]  # no intermediate bytes copy


def multipart_boundary(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` content type, or 415/400 saying what is wrong."""
    media, options = parse_options_header(content_type)
    if media != b"multipart/form-data":
        raise UnsupportedMediaType(
            f"send the matrices as multipart/form-data file uploads (got content type "
            f"{content_type or 'none'!r})"
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data content type has no boundary")
    return boundary


async def read_multipart(
    chunks: AsyncIterator[bytes],
    *,
    content_type: str | None,
    content_length: str | None,
    max_bytes: int,
) -> Upload:
    """Parse a streamed ``multipart/form-data`` body into its parts.

    Raises :class:`PayloadTooLarge` when ``Content-Length`` or the bytes received exceed
    ``max_bytes``, :class:`UnsupportedMediaType` or :class:`BadRequest` for a malformed body.
    """
    boundary = multipart_boundary(content_type)
    if content_length is not None and content_length.isdigit() and int(content_length) > max_bytes:
        raise PayloadTooLarge(
            f"request body of {int(content_length)} bytes exceeds the limit of {max_bytes}"
        )
    collector = _PartCollector()
    try:
        parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
    except FormParserError as exc:
        raise BadRequest(f"malformed multipart boundary: {exc}") from None
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > max_bytes:
                raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from None
    return Upload(collector.parts, received)
