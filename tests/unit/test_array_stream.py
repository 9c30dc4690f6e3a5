"""Decoding while bytes arrive gives what the whole-file decoder gives, in any chunking."""

from __future__ import annotations

import asyncio
import io
import re
import struct
import zipfile

import numpy as np
import pytest

from gpu_matrix_service import multipart_splitter
from gpu_matrix_service.array_stream import ArrayStream
from gpu_matrix_service.arrays import ArrayLimits, decode_array
from gpu_matrix_service.errors import BadArrayInput, BadRequest, PayloadTooLarge, ServiceError
from gpu_matrix_service.uploads import read_multipart
from gpu_matrix_service.zip_records import decode_in_one_piece, zip64_sizes

from arrayfiles import array_file_cases, npy_bytes, npz_bytes, npz_compressed_bytes, unseekable_npz

LIMITS = ArrayLimits(max_bytes=1 << 24, max_elements=1 << 22, max_dims=8)


def stream_decode(data: bytes, chunk: int, allocate=None) -> np.ndarray:
    stream = ArrayStream("file_a", LIMITS, *([allocate] if allocate else []))
    for start in range(0, len(data), chunk):
        stream.feed(memoryview(data)[start : start + chunk])
    return stream.finish()


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096, 1 << 20])
def test_stream_matches_whole_file_decoder_in_any_chunking(rng, chunk):
    for label, data in array_file_cases(rng).items():
        expected = decode_array(data, name="file_a", limits=LIMITS)
        got = stream_decode(data, chunk)
        assert got.dtype == expected.dtype, label
        assert got.flags.c_contiguous, label
        np.testing.assert_array_equal(got, expected, err_msg=label)


def test_the_destination_comes_from_the_allocator_and_is_filled_in_place(rng):
    given = []

    def allocate(shape, dtype):
        given.append(np.full(shape, -1, dtype))
        return given[-1]

    a = rng.standard_normal((64, 64))
    for data in (npy_bytes(a), npz_bytes(a), npz_compressed_bytes(m=a)):
        out = stream_decode(data, 1000, allocate)
        assert out is given[-1]
        np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("chunk", [3, 500])
def test_bad_inputs_fail_like_the_whole_file_decoder(rng, chunk):
    a = rng.standard_normal((20, 20))
    good_npz, good_npy = npz_compressed_bytes(m=a), npy_bytes(a)
    corrupt = bytearray(good_npz)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 32] = bytes(32)
    bad = {
        "garbage": b"definitely not an array",
        "truncated npy": good_npy[:-5],
        "npy with trailing bytes": good_npy + b"xx",
        "truncated npz": good_npz[: len(good_npz) // 2],
        "corrupt deflate": bytes(corrupt),
        "several unnamed": npz_bytes(x=a, y=a),
        "object dtype": _object_npy(),
    }
    for label, data in bad.items():
        with pytest.raises(ServiceError) as whole:
            decode_array(data, name="file_a", limits=LIMITS)
        with pytest.raises(ServiceError) as streamed:
            stream_decode(data, chunk)
        assert type(streamed.value) is type(whole.value), label
        assert streamed.value.status_code == whole.value.status_code, label


def _object_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([None], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def test_zip_bomb_is_refused_from_the_local_header_before_inflating():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("arr_0.npy", npy_bytes(np.zeros(8 << 20)))
    with pytest.raises(PayloadTooLarge, match="inflates to"):
        stream_decode(buffer.getvalue(), 4096)


def test_a_member_that_inflates_beyond_its_declared_size_is_refused():
    data = bytearray(npz_compressed_bytes(m=np.zeros(50_000)))
    # Shrink the declared uncompressed size in the zip64 extra field of the local header.
    header_end = 30 + data[26] + 4
    data[header_end : header_end + 8] = (1000).to_bytes(8, "little")
    with pytest.raises(BadArrayInput):
        stream_decode(bytes(data), 512)


# ---- the multipart splitter feeding the decoders ----


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> bytes:
    body = b"preamble to ignore\r\n"
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content
        body += b"\r\n"
    return body + f"--{boundary}--\r\nepilogue".encode()


def read(body: bytes, chunk: int, boundary: str = "b0undary"):
    async def chunks():
        for start in range(0, len(body), chunk):
            yield body[start : start + chunk]

    return asyncio.run(
        read_multipart(
            chunks(), content_type=f"multipart/form-data; boundary={boundary}",
            content_length=None, max_bytes=1 << 30,
            open_file=lambda name, most: ArrayStream(name, LIMITS, most_bytes=most),
        )
    )  # fmt: skip


def operands(upload):
    """The upload's two operands, finished as the route finishes them."""
    return asyncio.run(upload.operands())


@pytest.mark.parametrize("chunk", [1, 5, 13, 100, 1 << 16])
def test_splitter_finds_every_part_across_chunk_edges(rng, chunk):
    a, b = rng.standard_normal((9, 9)), rng.standard_normal((9, 9))
    body = multipart([("note", None, b"hello"), ("file_a", "a.npy", npy_bytes(a)),
                      ("file_b", "b.npz", npz_bytes(b)), ("x", None, b"\r\n--b0und")])  # fmt: skip
    upload = read(body, chunk)  # "x" holds a near miss of the delimiter
    first, second = operands(upload)
    np.testing.assert_array_equal(first.array, a)
    np.testing.assert_array_equal(second.array, b)
    assert upload.text_fields() == {"note": "hello", "x": "\r\n--b0und"}
    assert upload.body_bytes == len(body)


@pytest.mark.parametrize("chunk", [1, 7, 100, 1 << 16])
def test_a_delimiter_inside_declared_array_data_ends_the_part_in_any_chunking(chunk):
    # RFC 2046: the delimiter ends a part wherever it appears, whatever the file's own header
    # says follows; so file_a is cut short, the same way however the body arrives.
    inner = b"\r\n--b0undary\r\n"
    a = np.frombuffer(inner * 4, dtype=np.uint8).copy()
    body = multipart([("file_a", "a.npy", npy_bytes(a)), ("file_b", "b.npz", npz_bytes(a))])
    with pytest.raises(ServiceError) as caught:
        operands(read(body, chunk))
    assert 400 <= caught.value.status_code < 500


def test_heavy_finish_marks_whole_file_decodes_and_large_byte_swaps(rng):
    big = rng.standard_normal((400, 400))  # 1.28 MB, over HEAVY_FINISH_BYTES
    small = rng.standard_normal((40, 40))
    cases = {
        "native npz": (npz_bytes(big), big, False),
        "native npy": (npy_bytes(big), big, False),
        "big-endian npy": (npy_bytes(big.astype(">f8")), big, True),
        "big-endian npz, small": (npz_bytes(small.astype(">f8")), small, False),
        "Fortran-order npz": (npz_bytes(np.asfortranarray(big)), big, True),
        "npz data descriptors": (unseekable_npz(m=big), big, True),
        "npz data descriptors, small": (unseekable_npz(m=small), small, True),
    }
    for label, (data, expected, heavy) in cases.items():
        stream = ArrayStream("file_a", LIMITS)
        for start in range(0, len(data), 65536):
            stream.feed(memoryview(data)[start : start + 65536])
        assert stream.heavy_finish is heavy, label
        np.testing.assert_array_equal(stream.finish(), expected)


@pytest.mark.parametrize("chunk", [3, 64, 1 << 16])
def test_a_part_shorter_than_its_header_declares_is_a_4xx(rng, chunk):
    a = rng.standard_normal(64)
    short = npy_bytes(a)[:-40]  # the next part's delimiter comes inside the declared data
    body = multipart([("file_a", "a.npy", short), ("file_b", "b.npy", npy_bytes(a))])
    with pytest.raises(BadArrayInput, match="truncated or corrupt"):
        operands(read(body, chunk))


def padded_part(pad: int, content: bytes, name: str = "file_a") -> bytes:
    """A file part whose header block (an X-Pad line first) is ``pad`` bytes long."""
    disposition = f'Content-Disposition: form-data; name="{name}"; filename="a.npy"'.encode()
    filler = b"X-Pad: " + b"p" * (pad - len(disposition) - len(b"X-Pad: \r\n"))
    block = filler + b"\r\n" + disposition
    assert len(block) == pad
    return b"--b0undary\r\n" + block + b"\r\n\r\n" + content + b"\r\n"


# The block and its blank line fill the limit.
LONGEST_BLOCK = multipart_splitter.MAX_HEADER_BYTES - 4


@pytest.mark.parametrize("chunk", [7, 1000, 16 * 1024 + 21, 1 << 20])
def test_a_header_block_at_the_limit_is_read_whole_in_any_chunking(rng, chunk):
    a, b = rng.standard_normal(5), rng.standard_normal(5)
    body = padded_part(LONGEST_BLOCK, npy_bytes(a)) + padded_part(100, npy_bytes(b), "file_b")
    body += b"--b0undary--\r\n"
    first, second = operands(read(body, chunk))
    np.testing.assert_array_equal(first.array, a)
    np.testing.assert_array_equal(second.array, b)


@pytest.mark.parametrize("chunk", [7, 1000, 16 * 1024 + 21, 1 << 20])
def test_a_header_block_over_the_limit_is_400_in_any_chunking(rng, chunk):
    # Once a chunk holding more than the limit dropped its rest and the block was taken
    # from the bytes around the gap; the limit was checked only while no blank line came.
    a = rng.standard_normal(5)
    body = padded_part(LONGEST_BLOCK + 1, npy_bytes(a)) + padded_part(100, npy_bytes(a), "file_b")
    body += b"--b0undary--\r\n"
    with pytest.raises(BadRequest, match="part headers longer than 16384 bytes"):
        read(body, chunk)


def test_a_body_without_its_closing_delimiter_is_400(rng):
    body = multipart([("file_a", "a.npy", npy_bytes(rng.standard_normal(3)))])
    with pytest.raises(BadRequest, match="closing boundary"):
        read(body[: body.index(b"--b0undary--")], 64)


def test_corrupt_deflate_data_is_always_a_400_never_a_zlib_error():
    # Zeroed bytes inside a deflate stream fail in different ways per input (seen: "invalid
    # distance too far back" from zlib); every one must come out as BadArrayInput.
    for seed in range(200):
        a = np.random.default_rng(seed).standard_normal((20, 20))
        data = bytearray(npz_compressed_bytes(m=a))
        data[len(data) // 2 : len(data) // 2 + 32] = bytes(32)
        with pytest.raises(BadArrayInput):
            stream_decode(bytes(data), 500)


def test_a_header_declaring_more_than_the_upload_can_carry_allocates_nothing():
    allocations = []

    def allocate(shape, dtype):
        allocations.append(shape)
        return np.empty(shape, dtype)

    header_only = npy_bytes(np.zeros((1000, 1000)))[:128]  # declares 8 MB, sends 128 bytes
    stream = ArrayStream("file_a", LIMITS, allocate, most_bytes=4096)
    stream.feed(memoryview(header_only))  # a first piece is held until more come or it ends
    with pytest.raises(PayloadTooLarge, match="more than the 4096 its upload can carry"):
        stream.feed(memoryview(b"more"))
    assert allocations == []
    stream = ArrayStream("file_a", LIMITS, allocate, most_bytes=4096)
    stream.feed(memoryview(header_only))
    with pytest.raises(PayloadTooLarge, match="more than the 4096 its upload can carry"):
        stream.end()
    assert allocations == []


def test_sixteen_bare_headers_are_refused_before_a_third_file_is_opened():
    opened = []

    def open_file(name, most):
        opened.append(name)
        return ArrayStream(name, LIMITS, most_bytes=most)

    header = npy_bytes(np.zeros(4))[:128]
    body = multipart([(f"f{i}", f"f{i}.npy", header) for i in range(16)])

    async def chunks():
        yield body

    with pytest.raises(BadRequest, match="got 3 or more"):
        asyncio.run(
            read_multipart(chunks(), content_type="multipart/form-data; boundary=b0undary",
                           content_length=str(len(body)), max_bytes=1 << 20,
                           open_file=open_file)
        )  # fmt: skip
    assert opened == ["f0", "f1"]


def test_zip_directory_entries_are_skipped_like_the_whole_file_decoder_does(rng):
    a = rng.standard_normal(5)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("d/", b"")
        archive.writestr("x.npy", npy_bytes(a))
    np.testing.assert_array_equal(stream_decode(buffer.getvalue(), 100), a)
    np.testing.assert_array_equal(decode_array(buffer.getvalue(), name="f", limits=LIMITS), a)


def test_bzip2_members_are_refused_while_streaming(rng):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_BZIP2) as archive:
        archive.writestr("arr_0.npy", npy_bytes(rng.standard_normal(5)))
    with pytest.raises(BadArrayInput, match="compression method 12 is not supported"):
        stream_decode(buffer.getvalue(), 100)


def test_files_in_numpys_own_layout_take_the_one_piece_path(rng):
    a = rng.standard_normal((33, 17)).astype(np.float32)
    for data in (npy_bytes(a), npz_bytes(a), npz_bytes(matrix=a), npz_compressed_bytes(m=a)):
        got = decode_in_one_piece(memoryview(data), name="f", limits=LIMITS, allocate=np.empty)
        assert got is not None
        np.testing.assert_array_equal(got, a)


def test_the_one_piece_path_leaves_other_layouts_and_any_fault_to_the_stream(rng):
    a = rng.standard_normal((20, 20))
    corrupt = bytearray(npz_bytes(a))
    corrupt[-200] ^= 0xFF  # inside the array data: the stored member's CRC-32 no longer matches
    declined = {
        "fortran": npy_bytes(np.asfortranarray(a)),
        "big-endian": npy_bytes(a.astype(">f8")),
        "several members": npz_bytes(a, a + 1),
        "data descriptors": unseekable_npz(only=a),
        "bad CRC": bytes(corrupt),
        "truncated": npy_bytes(a)[:-1],
        "garbage": b"not an array file at all",
    }
    for label, data in declined.items():
        got = decode_in_one_piece(memoryview(data), name="f", limits=LIMITS, allocate=np.empty)
        assert got is None, label
    with pytest.raises(BadArrayInput, match="corrupt"):  # and the stream words the error
        stream_decode(bytes(corrupt), 1 << 20)


def test_an_upload_arriving_whole_is_decoded_in_one_piece_into_the_allocators_array(rng):
    given = []

    def allocate(shape, dtype):
        given.append(np.full(shape, -1, dtype))
        return given[-1]

    a = rng.standard_normal((64, 64)).astype(np.float32)
    stream = ArrayStream("file_a", LIMITS, allocate)
    stream.feed(memoryview(npz_bytes(a)))
    assert not stream.heavy_finish
    out = stream.finish()
    assert out is given[-1] and len(given) == 1
    np.testing.assert_array_equal(out, a)


# ---- the short ways through what numpy and HTTP clients write ----


@pytest.mark.parametrize(
    "block",
    [
        b'Content-Disposition: form-data; name="file_a"; filename="a.npz"',
        b'Content-Disposition: form-data; name="file_a"; filename="a.npz"\r\n'
        b"Content-Type: application/octet-stream",
        b'Content-Disposition: form-data; name="note"\r\nContent-Type: text/plain',
        'Content-Disposition: form-data; name="d\u00e9j\u00e0"; filename="\u00e9.npy"'.encode(),
        b'content-disposition: form-data; name="a"; filename="b"',  # other spellings: by line
        b'Content-Disposition:  form-data; name="a"\r\nContent-Type: text/plain; charset=utf-8',
        b'Content-Type: image/png\r\nContent-Disposition: form-data; name="a"; filename="p"',
        b'Content-Disposition: form-data; name="a"\r\nContent-Type: x\r\nContent-Type: y',
        b'Content-Disposition: form-data; name="a"\r\nContent-Type: text/plain \t',  # stripped
        b'Content-Disposition: form-data; name="a\\"b"; filename="c"',
    ],
)
def test_part_headers_read_in_one_step_as_line_by_line(monkeypatch, block):
    fast = multipart_splitter.part_from_headers(block)
    monkeypatch.setattr(multipart_splitter, "PLAIN_PART_HEADERS", re.compile(b"(?!)"))
    by_line = multipart_splitter.part_from_headers(block)
    assert (fast.name, fast.filename, fast.content_type) == (
        by_line.name, by_line.filename, by_line.content_type,
    )  # fmt: skip


def test_zip64_sizes_of_numpys_single_record_and_of_other_extra_fields():
    both = struct.pack("<HHQQ", 1, 16, 5000, 4000)
    assert zip64_sizes(both, 0xFFFFFFFF, 0xFFFFFFFF) == (4000, 5000)  # (packed, size)
    assert zip64_sizes(both, 10, 0xFFFFFFFF) == (10, 5000)  # only the field that overflowed
    other_tag = struct.pack("<HHQQ", 7, 16, 5000, 4000)
    assert zip64_sizes(other_tag, 0xFFFFFFFF, 0xFFFFFFFF) == (0xFFFFFFFF, 0xFFFFFFFF)
    two_records = struct.pack("<HHI", 9, 4, 0) + both
    assert zip64_sizes(two_records, 0xFFFFFFFF, 0xFFFFFFFF) == (4000, 5000)
