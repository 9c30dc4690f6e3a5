"""The short way through a ``multipart/form-data`` body that arrived whole, as small ones do.

A small upload reaches the app in one chunk. :func:`split_whole_body` finds its parts with a
few ``bytes.find`` calls, instead of the chunk-by-chunk state machine of
:class:`~gpu_matrix_service.multipart_splitter.MultipartSplitter` and a decoder object per file.
Like :func:`~gpu_matrix_service.zip_records.decode_in_one_piece` it only succeeds or declines:
a preamble, a header block too long, too many parts, a bad delimiter line or a missing closing
delimiter go back to the splitter, which reads the body again and words the error, so both
paths give one answer. A part ends at the first delimiter, as the splitter's search ends it.
"""

from __future__ import annotations

from typing import Final

# Bodies up to this many bytes are tried whole: larger arrays' checks belong off the event
# loop (array_checks.OFF_LOOP_BYTES), where only the streaming path takes them.
WHOLE_BODY_BYTES: Final = 1 << 20


def split_whole_body(
    body: bytes, boundary: bytes, *, max_parts: int, max_header_bytes: int
) -> list[tuple[bytes, memoryview]] | None:
    """Each part's header block and content (a view of ``body``), or None to decline."""
    opening = b"--" + boundary + b"\r\n"
    if not body.startswith(opening):
        return None  # a preamble, or no part at all
    delimiter = b"\r\n--" + boundary
    view = memoryview(body)
    parts: list[tuple[bytes, memoryview]] = []
    position = len(opening)
    while len(parts) < max_parts:
        headers_end = body.find(b"\r\n\r\n", position, position + max_header_bytes)
        if headers_end == -1:
            return None
        content_end = body.find(delimiter, headers_end + 4)
        if content_end == -1:
            return None
        parts.append((body[position:headers_end], view[headers_end + 4 : content_end]))
        position = content_end + len(delimiter)
        marker = body[position : position + 2]
        if marker == b"--":
            return parts  # the closing delimiter; an epilogue after it is ignored
        if marker != b"\r\n":
            return None
        position += 2
    return None
