"""A small body that arrives in one chunk is read whole, with the answer the splitter gives."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gpu_matrix_service.array_stream import ArrayStream
from gpu_matrix_service.arrays import ArrayLimits
from gpu_matrix_service.errors import ServiceError
from gpu_matrix_service.multipart_splitter import MAX_HEADER_BYTES, MAX_PARTS
from gpu_matrix_service.uploads import (
    Upload,
    read_multipart,
    whole_body_reader,
)
from gpu_matrix_service.whole_body import WHOLE_BODY_BYTES, split_whole_body
from gpu_matrix_service.zip_records import decode_in_one_piece

from arrayfiles import npy_bytes, npz_bytes, unseekable_npz

LIMITS = ArrayLimits(max_bytes=1 << 24, max_elements=1 << 22, max_dims=8)
BOUNDARY = b"b0undary"


def part(name: str, content: bytes, filename: str | None = "f.npz") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--b0undary\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"


def body_of(*parts: bytes, end: bytes = b"--b0undary--\r\n") -> bytes:
    return b"".join(parts) + end


def split(body: bytes) -> list[tuple[bytes, bytes]] | None:
    pieces = split_whole_body(
        body, BOUNDARY, max_parts=MAX_PARTS, max_header_bytes=MAX_HEADER_BYTES
    )
    return None if pieces is None else [(block, bytes(content)) for block, content in pieces]


def test_each_part_is_found_up_to_its_delimiter_and_an_epilogue_is_ignored():
    body = body_of(part("a", b"one\r\n--b0und"), part("t", b"", None), end=b"--b0undary--tail")
    assert split(body) == [
        (b'Content-Disposition: form-data; name="a"; filename="f.npz"', b"one\r\n--b0und"),
        (b'Content-Disposition: form-data; name="t"', b""),
    ]


@pytest.mark.parametrize(
    "body",
    [
        b"preamble\r\n" + body_of(part("a", b"x")),
        body_of(part("a", b"x"), end=b""),  # no closing delimiter
        body_of(part("a", b"x"), end=b"--b0undary"),  # nor what follows a delimiter
        body_of(
            part("a", b"x"),
            end=b'--b0undaryXXContent-Disposition: form-data; name="c"\r\n\r\nz\r\n--b0undary--',
        ),  # a bad delimiter line, and a part after it
        body_of(*[part(f"p{i}", b"x") for i in range(MAX_PARTS + 1)]),
        b"--b0undary\r\nX-Long: " + b"h" * MAX_HEADER_BYTES + b"\r\n\r\nx\r\n--b0undary--",
        b"--b0undary--\r\n",  # no part at all
    ],
    ids=["preamble", "unclosed", "cut", "bad-line", "too-many-parts", "long-headers", "no-parts"],
)
def test_what_the_splitter_must_word_is_declined(body):
    assert split(body) is None


def test_as_many_parts_as_allowed_are_still_split():
    assert len(split(body_of(*[part(f"p{i}", b"x") for i in range(MAX_PARTS)]))) == MAX_PARTS


def read(body: bytes, whole: bool, content_length: str | None = "auto", chunk: int = 0):
    """``read_multipart`` of ``body`` (in one chunk unless ``chunk``) and its operands, or the
    error; with ``whole`` the route's one-piece decoder, counting its calls in ``calls``."""
    calls: list[str] = []

    def decode(name: str, data: memoryview) -> np.ndarray | None:
        calls.append(name)
        return decode_in_one_piece(data, name=name, limits=LIMITS, allocate=np.empty)

    def open_file(name: str, most: int) -> ArrayStream:
        return ArrayStream(name, LIMITS, most_bytes=most)

    async def chunks():
        step = chunk or len(body)
        for start in range(0, len(body), step):
            yield body[start : start + step]

    async def run() -> Upload:
        upload = await read_multipart(
            chunks(), content_type="multipart/form-data; boundary=b0undary",
            content_length=str(len(body)) if content_length == "auto" else content_length,
            max_bytes=1 << 30, open_file=open_file,
            read_whole=whole_body_reader(decode) if whole else None,
        )  # fmt: skip
        await upload.operands(len(upload.files))
        return upload

    try:
        return asyncio.run(run()), calls
    except ServiceError as exc:
        return exc, calls


def test_a_small_upload_in_one_chunk_is_read_whole_with_the_streams_arrays(rng):
    a, b = rng.standard_normal((64, 64)).astype(np.float32), rng.integers(0, 9, (3, 5))
    body = body_of(
        part("file_b", npy_bytes(b)), part("note", b"hi", None), part("file_a", npz_bytes(a))
    )
    upload, calls = read(body, whole=True)
    streamed, _ = read(body, whole=False)
    assert calls == ["file_b", "file_a"]  # read whole: the route's decoder saw both files
    assert upload.body_bytes == streamed.body_bytes == len(body)
    assert [(p.name, p.filename, p.content_type) for p in upload.parts] == [
        (p.name, p.filename, p.content_type) for p in streamed.parts
    ]
    assert bytes(upload.parts[1].text) == b"hi"
    file_a, file_b = asyncio.run(upload.operands())
    np.testing.assert_array_equal(file_a.array, a)
    np.testing.assert_array_equal(file_b.array, b)
    assert file_a.array.dtype == np.float32


@pytest.mark.parametrize(
    ("content_length", "chunk"),
    [(None, 0), ("12", 0), ("auto", 100)],
    ids=["no-length", "wrong-length", "in-chunks"],
)
def test_only_a_body_that_came_whole_as_declared_is_read_whole(rng, content_length, chunk):
    body = body_of(part("a", npy_bytes(rng.standard_normal(7))), part("b", npy_bytes(np.ones(7))))
    _, calls = read(body, whole=True, content_length=content_length, chunk=chunk)
    assert calls == []


def test_a_body_larger_than_the_whole_body_limit_streams(rng):
    big = npy_bytes(rng.standard_normal(WHOLE_BODY_BYTES // 8))
    upload, calls = read(body_of(part("a", big), part("b", big)), whole=True)
    assert calls == [] and isinstance(upload, Upload)


@pytest.mark.parametrize(
    "parts",
    [
        [part("a", b"not an array"), part("b", b"\x93NUMPY")],  # the stream's 400s
        [part(name, npy_bytes(np.ones(3))) for name in "abc"],  # three files
        [part("a", npy_bytes(np.ones(3))), part("t", b"t" * 2000, None)],  # a long text field
        [b"--b0undary\r\nContent-Type: x\r\n\r\nx\r\n", part("b", npy_bytes(np.ones(3)))],
    ],
    ids=["bad-files", "three-files", "long-text", "no-name"],
)
def test_a_declined_body_gets_exactly_the_splitters_refusal(parts):
    whole, _ = read(body_of(*parts), whole=True)
    streamed, _ = read(body_of(*parts), whole=False)
    assert isinstance(whole, ServiceError) and whole.status_code == 400, whole
    assert (type(whole), whole.detail) == (type(streamed), streamed.detail)


def test_a_file_the_one_piece_decoder_declines_is_decoded_by_the_stream(rng):
    a, b = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    body = body_of(part("a", unseekable_npz(x=a)), part("b", npy_bytes(b)))
    upload, calls = read(body, whole=True)
    assert calls == ["a"]  # declined at the first file: the splitter reads the body again
    np.testing.assert_array_equal(upload.parts[0].array, a)
    np.testing.assert_array_equal(upload.parts[1].array, b)
