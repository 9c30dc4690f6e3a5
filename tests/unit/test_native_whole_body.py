"""The native reader of small uploads (native/whole_body.c): numpy's layouts laid out and read
as the Python readers read them; everything else declined to them; nothing read outside the
body, under AddressSanitizer. Skipped without a C compiler."""

from __future__ import annotations

import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from gpu_matrix_service.arrays import MAX_HEADER_BYTES as MAX_NPY_HEADER_BYTES
from gpu_matrix_service.arrays import ArrayLimits
from gpu_matrix_service.multipart_splitter import MAX_HEADER_BYTES
from gpu_matrix_service.native import whole_body
from gpu_matrix_service.uploads import read_laid_out_body, read_whole_body
from gpu_matrix_service.zip_records import LaidOutNpyDecoder, decode_in_one_piece

from arrayfiles import npy_bytes, npz_bytes, npz_compressed_bytes

pytestmark = pytest.mark.skipif(
    whole_body.find_c_compiler() is None, reason="no C compiler for the native reader"
)
LIMITS = ArrayLimits(max_bytes=1 << 24, max_elements=1 << 22, max_dims=8)
BOUNDARY = b"b0undary"
HARNESS = Path(__file__).with_name("native_harness.c")


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> whole_body.WholeBodyLayout:
    path = whole_body.build_whole_body_library(tmp_path_factory.mktemp("native"))
    return whole_body.WholeBodyLayout(path, MAX_HEADER_BYTES, MAX_NPY_HEADER_BYTES)


def part(name: bytes, content: bytes, filename: bytes | None = b"f.npz",
         content_type: bytes | None = b"application/octet-stream") -> bytes:  # fmt: skip
    headers = b'Content-Disposition: form-data; name="' + name + b'"'
    if filename is not None:
        headers += b'; filename="' + filename + b'"'
    if content_type is not None:
        headers += b"\r\nContent-Type: " + content_type
    return b"--" + BOUNDARY + b"\r\n" + headers + b"\r\n\r\n" + content + b"\r\n"


def body_of(*parts: bytes, end: bytes = b"--b0undary--\r\n") -> bytes:
    return b"".join(parts) + end


def decode(name: str, data: memoryview) -> np.ndarray | None:
    return decode_in_one_piece(data, name=name, limits=LIMITS, allocate=np.empty)


decode_laid_out = LaidOutNpyDecoder(LIMITS, np.empty)


def npy_version(array: np.ndarray, version: tuple[int, int]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version)
    return buffer.getvalue()


def both_ways(layout, body: bytes):
    """(native upload or None, Python upload or None) of ``body``."""
    found = layout(body, BOUNDARY)
    native = None if found is None else read_laid_out_body(body, found, decode_laid_out, True)
    return native, read_whole_body(body, BOUNDARY, decode)


def assert_same_upload(native, python) -> None:
    assert native is not None
    assert python is not None
    assert [(p.name, p.filename, p.content_type) for p in native.parts] == [
        (p.name, p.filename, p.content_type) for p in python.parts
    ]
    for ours, theirs in zip(native.parts, python.parts, strict=True):
        assert (ours.array.dtype, ours.array.shape) == (theirs.array.dtype, theirs.array.shape)
        assert ours.array.tobytes() == theirs.array.tobytes()


RNG = np.random.default_rng(5)
A32 = RNG.standard_normal((64, 64)).astype(np.float32)
B64 = RNG.integers(-9, 9, (3, 1, 5)).astype(np.int64)


@pytest.mark.parametrize(
    "files",
    [
        (npz_bytes(A32), npz_bytes(B64)),
        (npy_bytes(A32), npz_bytes(matrix=B64)),
        (npy_version(A32, (2, 0)), npy_version(B64, (3, 0))),
        (npy_bytes(np.array(2.5)), npy_bytes(np.zeros((0, 3), np.complex64))),
        (npz_bytes(np.ones(7, np.bool_)), npy_bytes(np.arange(5, dtype=np.uint16))),
    ],
    ids=["two-npz", "npy-and-npz", "versions-2-and-3", "scalar-and-empty", "bool-and-uint16"],
)
@pytest.mark.parametrize("content_type", [b"application/octet-stream", None])
def test_numpys_layouts_are_laid_out_and_read_as_the_python_reader_reads_them(
    layout, files, content_type
):
    body = body_of(
        part(b"file_b", files[0], b"b.npz", content_type),
        part("fichier_\u00e9".encode(), files[1], "\u00e9.npy".encode(), content_type),
    )
    native, python = both_ways(layout, body)
    assert_same_upload(native, python)
    assert native.parts[1].name == "fichier_\u00e9"


def stored_npz_with(**edits: int) -> bytes:
    """numpy.savez's file with fields of its local header replaced (offsets in bytes)."""
    data = bytearray(npz_bytes(A32))
    for offset, value in edits.items():
        struct.pack_into("<H", data, int(offset.removeprefix("at")), value)
    return bytes(data)


DECLINED = {
    "preamble": b"junk\r\n" + body_of(part(b"a", npy_bytes(A32)), part(b"b", npy_bytes(A32))),
    "one-part": body_of(part(b"a", npy_bytes(A32))),
    "three-parts": body_of(*(part(name, npy_bytes(A32)) for name in (b"a", b"b", b"c"))),
    "text-part": body_of(part(b"a", b"hello", None, None), part(b"b", npy_bytes(A32))),
    "other-header": body_of(
        part(b"a", npy_bytes(A32), content_type=b"x\r\nX-Other: y"), part(b"b", npy_bytes(A32))
    ),
    "spaced-content-type": body_of(
        part(b"a", npy_bytes(A32), content_type=b"text/plain; charset=x"),
        part(b"b", npy_bytes(A32)),
    ),
    "escaped-name": body_of(part(b"a\\", npy_bytes(A32)), part(b"b", npy_bytes(A32))),
    "deflated": body_of(part(b"a", npz_compressed_bytes(x=A32)), part(b"b", npy_bytes(A32))),
    "two-members": body_of(part(b"a", npz_bytes(A32, B64)), part(b"b", npy_bytes(A32))),
    "data-descriptor-flag": body_of(
        part(b"a", stored_npz_with(at6=0x8)), part(b"b", npy_bytes(A32))
    ),
    "bad-closing": body_of(
        part(b"a", npy_bytes(A32)), part(b"b", npy_bytes(A32)), end=b"--b0undary\r\n"
    ),
    "cut": body_of(part(b"a", npy_bytes(A32)), part(b"b", npy_bytes(A32)))[:-40],
    "npy-version-4": body_of(
        part(b"a", npy_bytes(A32)[:6] + b"\x04" + npy_bytes(A32)[7:]), part(b"b", npy_bytes(A32))
    ),
    "not-an-array-file": body_of(part(b"a", b"PK\x05\x06" + bytes(40)), part(b"b", b"x" * 99)),
    "junk-after-member": body_of(
        part(b"a", npz_bytes(A32).partition(b"PK\x01\x02")[0] + b"g" * 40),
        part(b"b", npy_bytes(A32)),
    ),
}


@pytest.mark.parametrize("body", DECLINED.values(), ids=DECLINED.keys())
def test_what_the_python_readers_must_read_or_word_is_declined(layout, body):
    assert layout(body, BOUNDARY) is None


def test_a_header_block_over_the_window_is_declined(layout):
    long_name = b"n" * MAX_HEADER_BYTES
    body = body_of(part(long_name, npy_bytes(A32)), part(b"b", npy_bytes(A32)))
    assert layout(body, BOUNDARY) is None


@pytest.mark.parametrize(
    "file",
    [
        npy_bytes(A32.astype(">f4")),  # byte swapped
        npy_bytes(np.asfortranarray(A32)),  # Fortran order
        npy_bytes(A32)[:-4],  # shorter than its header says
        npy_bytes(np.array(["text"])),  # not numeric
    ],
    ids=["big-endian", "fortran", "short", "strings"],
)
def test_a_laid_out_file_the_one_piece_decoder_declines_is_declined_again(layout, file):
    body = body_of(part(b"a", file), part(b"b", npy_bytes(A32)))
    found = layout(body, BOUNDARY)
    assert found is not None  # laid out: the checks of the data are Python's
    assert read_laid_out_body(body, found, decode_laid_out, True) is None


def test_a_stored_member_whose_crc_is_wrong_is_left_to_the_python_readers(layout):
    data = bytearray(npz_bytes(A32))
    struct.pack_into("<I", data, 14, zlib.crc32(bytes(data[100:])) ^ 1)
    body = body_of(part(b"a", bytes(data)), part(b"b", npy_bytes(A32)))
    found = layout(body, BOUNDARY)
    assert found is not None
    assert read_laid_out_body(body, found, decode_laid_out, verify_crc=True) is None
    assert read_laid_out_body(body, found, decode_laid_out, verify_crc=False) is not None


def mutations(rng: np.random.Generator, body: bytes, count: int):
    """``body`` with a few random flips, cuts, insertions or overwrites, ``count`` times;
    most of them in the first bytes of each part, where the headers are."""
    heads = [i for i in range(len(body)) if body.startswith(b"--" + BOUNDARY, i)]
    for _ in range(count):
        out = bytearray(body)
        for _ in range(rng.integers(1, 4)):
            near = heads[rng.integers(len(heads))] + int(rng.integers(0, 400))
            at = min(len(out), near if rng.random() < 0.8 else int(rng.integers(0, len(out))))
            kind = rng.integers(4)
            if kind == 0 and at < len(out):
                out[at] ^= 1 << int(rng.integers(8))
            elif kind == 1:
                del out[at:]
            elif kind == 2:
                out[at:at] = rng.bytes(int(rng.integers(1, 9)))
            else:
                out[at : at + 4] = rng.bytes(4)
        yield bytes(out)


def test_the_reader_reads_nothing_outside_the_body_under_address_sanitizer(tmp_path):
    compiler = whole_body.find_c_compiler()
    harness = tmp_path / "harness"
    built = subprocess.run(
        [compiler, "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-o", str(harness), str(HARNESS), str(whole_body.SOURCE)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if built.returncode != 0:
        pytest.skip(f"{compiler} cannot build with AddressSanitizer: {built.stderr[-300:]}")
    rng = np.random.default_rng(11)
    seeds = [
        body_of(part(b"file_a", npz_bytes(A32)), part(b"file_b", npz_bytes(B64))),
        body_of(part(b"a", npy_version(B64, (2, 0))), part(b"b", npy_bytes(np.array(1.0)))),
    ]
    bodies = [body for seed in seeds for body in [seed, *mutations(rng, seed, 10000)]]
    records = b"".join(struct.pack("<II", len(b), len(BOUNDARY)) + b + BOUNDARY for b in bodies)
    ran = subprocess.run([str(harness)], input=records, capture_output=True, check=False)
    assert ran.returncode == 0, ran.stderr.decode(errors="replace")[-3000:]
    laid_out, total = map(int, ran.stdout.split())
    assert total == len(bodies)
    assert laid_out >= len(seeds)  # the unmutated ones at least


def test_a_remembered_header_decides_as_it_did_the_first_time():
    decoder = LaidOutNpyDecoder(ArrayLimits(max_bytes=64, max_elements=16, max_dims=2), np.empty)
    ok = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"
    too_big = b"{'descr': '<f8', 'fortran_order': False, 'shape': (20,), }"
    fortran = b"{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }"
    data = np.arange(6, dtype=np.float32)
    for _ in range(2):  # the second time from what was remembered
        got = decoder("a", ok, "latin1", memoryview(data.tobytes()))
        np.testing.assert_array_equal(got, data.reshape(2, 3))
        assert decoder("a", ok, "latin1", memoryview(data.tobytes()[:-4])) is None  # short
        assert decoder("a", too_big, "latin1", memoryview(bytes(160))) is None
        assert decoder("a", fortran, "latin1", memoryview(data.tobytes())) is None
        assert decoder("a", b"{'descr': 'junk'}", "latin1", memoryview(b"")) is None


def test_long_header_texts_are_checked_each_time_not_remembered():
    decoder = LaidOutNpyDecoder(LIMITS, np.empty)
    for i in range(50):
        text = b"{'descr': '<f4', 'fortran_order': False, 'shape': (%d,), }" % i
        assert decoder("a", text + b" " * 2000, "latin1", memoryview(bytes(4 * i))) is not None
    assert decoder._known == {}  # crafted long headers cannot fill the memory


def test_without_a_writable_cache_the_python_readers_read_everything(monkeypatch, tmp_path):
    if (whole_body.SOURCE.parent / whole_body.LIBRARY_NAME).is_file():
        pytest.skip("the package has a built reader: nothing is built at start-up")
    not_a_directory = tmp_path / "home"
    not_a_directory.write_text("")  # even root cannot make a directory below a file
    monkeypatch.setattr(whole_body, "user_cache_dir", lambda: not_a_directory / "cache")
    assert whole_body.load_whole_body_layout(MAX_HEADER_BYTES, MAX_NPY_HEADER_BYTES) is None


def test_a_header_padded_past_a_kilobyte_is_not_remembered_globally():
    from gpu_matrix_service import arrays

    text = b"{'descr': '<f4', 'fortran_order': False, 'shape': (7, 11), }" + b" " * 4000
    before = len(arrays._KNOWN_HEADERS)
    assert arrays.header_fields(text, "latin1", "a")[1] == (7, 11)
    assert len(arrays._KNOWN_HEADERS) == before
