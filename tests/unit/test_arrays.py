"""Safe decoding of .npy/.npz uploads: every good form read right, every bad one refused clearly."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest

from gpu_matrix_service.arrays import ArrayLimits, decode_array, encode_npy, encode_npz
from gpu_matrix_service.errors import BadArrayInput, PayloadTooLarge, UnsupportedDType

from arrayfiles import npy_bytes, npz_bytes, npz_compressed_bytes

LIMITS = ArrayLimits(max_bytes=1 << 24, max_elements=1 << 22, max_dims=8)


def decode(data: bytes, limits: ArrayLimits = LIMITS) -> np.ndarray:
    return decode_array(data, name="file_a", limits=limits)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "uint8", "bool",
                                   "complex64", "float16"])  # fmt: skip
def test_npy_round_trips_every_numeric_dtype(rng, dtype):
    array = (rng.standard_normal((5, 7)) * 10).astype(dtype)
    out = decode(npy_bytes(array))
    assert out.dtype == array.dtype
    np.testing.assert_array_equal(out, array)


def test_npz_with_one_array_is_read_whatever_its_key(rng):
    array = rng.standard_normal((3, 4))
    np.testing.assert_array_equal(decode(npz_bytes(weird_key=array)), array)
    np.testing.assert_array_equal(decode(npz_bytes(array)), array)


def test_compressed_npz_is_inflated(rng):
    array = rng.standard_normal((64, 33)).astype(np.float32)
    np.testing.assert_array_equal(decode(npz_compressed_bytes(m=array)), array)


def test_npz_with_several_arrays_prefers_matrix_then_arr_0(rng):
    a, b = rng.standard_normal((2, 2)), rng.standard_normal((3, 3))
    np.testing.assert_array_equal(decode(npz_bytes(other=a, matrix=b)), b)
    np.testing.assert_array_equal(decode(npz_bytes(a, b)), a)  # arr_0, arr_1


def test_npz_with_several_unnamed_choices_names_the_keys(rng):
    with pytest.raises(BadArrayInput, match=r"\['x', 'y'\]"):
        decode(npz_bytes(x=rng.standard_normal(2), y=rng.standard_normal(2)))


def test_fortran_order_and_big_endian_arrays_become_native_c_order(rng):
    array = np.asfortranarray(rng.standard_normal((4, 6)))
    out = decode(npy_bytes(array))
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, array)
    big = rng.standard_normal((3, 5)).astype(">f4")
    for data in (npy_bytes(big), npz_compressed_bytes(m=big)):
        out = decode(data)
        assert out.dtype == np.dtype("float32") and out.dtype.isnative
        np.testing.assert_array_equal(out, big)


def test_n_dimensional_and_empty_arrays_decode(rng):
    cube = rng.standard_normal((2, 3, 4))
    np.testing.assert_array_equal(decode(npz_bytes(cube)), cube)
    assert decode(npy_bytes(np.empty((0, 5)))).shape == (0, 5)


def test_allocator_receives_the_array_shape_and_dtype(rng):
    seen = []

    def allocate(shape, dtype):
        seen.append((shape, dtype))
        return np.empty(shape, dtype)

    array = rng.standard_normal((6, 2)).astype(np.float32)
    for data in (npy_bytes(array), npz_bytes(array), npz_compressed_bytes(m=array)):
        out = decode_array(data, name="a", limits=LIMITS, allocate=allocate)
        np.testing.assert_array_equal(out, array)
    assert seen == [((6, 2), np.dtype("float32"))] * 3


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello world, not an array", "neither a .npy nor a .npz"),
        (b"\x93NUMPY\x01", "not a .npy file"),
        (b"\x93NUMPY\x09\x00\x10\x00{'descr': '<f8'}", "unsupported .npy format version"),
        (b"PK\x03\x04 truncated zip", "not a valid .npz"),
    ],
)
def test_garbage_is_refused_with_400(data, message):
    with pytest.raises(BadArrayInput, match=message):
        decode(data)


def _npy_with_header(header: str, payload: bytes = b"") -> bytes:
    raw = header.encode("latin1")
    raw += b" " * (-(len(raw) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw)) + raw + payload


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("not a dict", "not a valid dictionary"),
        ("{'descr': '<f8', 'shape': (2,)}", "lacks descr"),
        ("{'descr': 'nonsense', 'fortran_order': False, 'shape': (2,)}", "invalid dtype"),
        ("{'descr': '<f8', 'fortran_order': False, 'shape': (-1,)}", "invalid shape"),
        ("{'descr': '<f8', 'fortran_order': False, 'shape': 'x'}", "invalid shape"),
        ("{'descr': '<f8', 'fortran_order': 0, 'shape': (2,)}", "fortran_order"),
        ("__import__('os').system('true')", "not a valid dictionary"),
    ],
)
def test_bad_npy_headers_are_refused(header, message):
    with pytest.raises(BadArrayInput, match=message):
        decode(_npy_with_header(header, b"\0" * 16))


def test_truncated_npy_data_is_refused(rng):
    data = npy_bytes(rng.standard_normal((10, 10)))
    with pytest.raises(BadArrayInput, match="truncated"):
        decode(data[:-8])


def test_trailing_bytes_after_npy_data_are_refused(rng):
    with pytest.raises(BadArrayInput, match="needs"):
        decode(npy_bytes(rng.standard_normal(4)) + b"junk")


def test_object_arrays_are_refused_without_unpickling():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(UnsupportedDType, match="objects"):
        decode(buffer.getvalue())


@pytest.mark.parametrize(
    "array",
    [
        np.array(["a", "bc"]),
        np.array([b"x", b"y"]),
        np.zeros(2, dtype=[("x", "<f4"), ("y", "<i4")]),
        np.array(["2020-01-01"], dtype="datetime64[D]"),
        np.zeros(3, dtype="V4"),
    ],
    ids=["str", "bytes", "structured", "datetime", "void"],
)
def test_non_numeric_dtypes_are_refused_with_415(array):
    with pytest.raises(UnsupportedDType):
        decode(npy_bytes(array))


def test_limits_on_elements_dims_and_bytes_are_checked_from_the_header(rng):
    small = ArrayLimits(max_bytes=1000, max_elements=100, max_dims=2)
    with pytest.raises(PayloadTooLarge, match="elements"):
        decode(npy_bytes(np.zeros(101, np.int8)), small)
    with pytest.raises(PayloadTooLarge, match="dimensions"):
        decode(npy_bytes(np.zeros((1, 1, 1))), small)
    with pytest.raises(PayloadTooLarge, match="bytes"):
        decode(npy_bytes(np.zeros(100, np.complex128)), small)
    # A header that declares a huge array is refused before any allocation.
    huge = _npy_with_header("{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,)}")
    with pytest.raises(PayloadTooLarge):
        decode(huge)


def test_zip_bomb_is_refused_from_declared_size_before_inflating():
    # 64 MiB of zeros deflates to about 64 KiB; the limit is 16 MiB.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("arr_0.npy", npy_bytes(np.zeros(8 << 20)))
    assert len(buffer.getvalue()) < 1 << 20
    with pytest.raises(PayloadTooLarge, match="inflates to"):
        decode(buffer.getvalue())


def test_npz_member_that_is_not_npy_is_refused():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("arr_0.npy", b"definitely not npy")
    with pytest.raises(BadArrayInput, match=r"not a \.npy"):
        decode(buffer.getvalue())


def test_npz_with_corrupt_compressed_data_is_refused(rng):
    data = bytearray(npz_compressed_bytes(m=rng.standard_normal(5000)))
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    with pytest.raises(BadArrayInput):
        decode(bytes(data))


def test_empty_npz_is_refused():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w"):
        pass
    with pytest.raises(BadArrayInput, match="no arrays"):
        decode(buffer.getvalue())


def test_encoders_write_what_numpy_load_reads(rng):
    array = rng.standard_normal((3, 3)).astype(np.float32)
    with np.load(io.BytesIO(encode_npz(array)), allow_pickle=False) as archive:
        np.testing.assert_array_equal(archive["result"], array)
    np.testing.assert_array_equal(np.load(io.BytesIO(encode_npy(array))), array)


def test_a_shape_with_more_digits_than_int_converts_is_400_not_500():
    # int() refuses more than 4300 digits with ValueError, which escaped as a 500.
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (" + b"9" * 5000 + b",), }"
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header
    with pytest.raises(BadArrayInput, match="invalid shape"):
        decode_array(data, name="file_a", limits=LIMITS)
