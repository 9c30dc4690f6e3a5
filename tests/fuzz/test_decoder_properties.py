"""Property tests of the upload decoders: whatever bytes arrive, an array or a 4xx comes out.

``decode_array`` (whole files), ``ArrayStream`` (files fed chunk by chunk, as uploads arrive)
and ``read_multipart`` see untrusted bytes. Any exception but a :class:`ServiceError` would
be a 500, so every property here is "decode, or refuse with 400/413/415": on arbitrary bytes,
on valid ``.npy``/``.npz`` files then mutated (bit flips, truncation, insertions, rewritten
header fields, rewritten zip sizes and names), in any chunking, and on multipart bodies.
Valid files must come back bit for bit; inputs declaring huge sizes (zip bombs) must cost a
bounded amount of memory.

The regular tests at the end reproduce the bugs these properties found.
"""

from __future__ import annotations

import asyncio
import io
import math
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gpu_matrix_service import array_checks, multipart_splitter
from gpu_matrix_service.array_stream import ArrayStream
from gpu_matrix_service.arrays import MAX_HEADER_BYTES as MAX_NPY_HEADER_BYTES
from gpu_matrix_service.arrays import ArrayLimits, decode_array
from gpu_matrix_service.errors import BadArrayInput, PayloadTooLarge, ServiceError
from gpu_matrix_service.multipart_splitter import (
    MAX_HEADER_BYTES,
    MAX_PARTS,
    MAX_TEXT_FIELD_BYTES,
)
from gpu_matrix_service.native.whole_body import load_whole_body_layout
from gpu_matrix_service.uploads import (
    Upload,
    read_multipart,
    whole_body_reader,
)
from gpu_matrix_service.zip_records import LaidOutNpyDecoder, decode_in_one_piece

MiB = 1024 * 1024
LIMITS = ArrayLimits(max_bytes=1 * MiB, max_elements=2**18, max_dims=8)
# The native reader of small uploads (native/whole_body.c), built here if need be; None (and
# its properties skipped) where there is no C compiler.
NATIVE_LAYOUT = load_whole_body_layout(MAX_HEADER_BYTES, MAX_NPY_HEADER_BYTES)
# One decode under LIMITS may hold the input's copy, the array (1 MiB, twice when byte-swapped)
# and one inflate step (ArrayStream inflates 4 MiB at a time, and zlib's output buffer briefly
# holds that twice): 16 MiB, and nothing like the 256 MiB the zip bombs below inflate to.
MEMORY_BOUND_BYTES = 16 * MiB
REFUSAL_STATUSES = frozenset({400, 413, 415})

# No example database: CI stays clean, and each run explores afresh. A decode of these small
# inputs takes milliseconds; two seconds only trips on something close to a hang. One bug at a
# time keeps shrinking short when something does fail.
FUZZ = settings(
    database=None,
    deadline=timedelta(seconds=2),
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NUMERIC_DTYPES = sorted(
    {np.dtype(order + code) for order in "<>" for code in
     ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16")},
    key=str,
)  # fmt: skip
# Archive writers: numpy's own (zip64 local headers) and zipfile's four compression methods.
CONTAINERS = ("savez", "savez_compressed", "stored", "deflated", "bzip2", "lzma")
# What ArrayStream follows as a stream (it refuses bzip2 and lzma members).
STREAMABLE = ("npy", "savez", "savez_compressed", "stored", "deflated")
ZIP_METHODS = {
    "stored": zipfile.ZIP_STORED,
    "deflated": zipfile.ZIP_DEFLATED,
    "bzip2": zipfile.ZIP_BZIP2,
    "lzma": zipfile.ZIP_LZMA,
}
LOCAL, CENTRAL, END = b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"
# (record signature, field offset, field width in bytes) of each zip header field rewritten:
# versions, flags, method, CRC, compressed and inflated sizes, name and extra lengths, local
# header offset, entry counts, central directory size and offset.
ZIP_FIELDS = (
    (LOCAL, 4, 2), (LOCAL, 6, 2), (LOCAL, 8, 2), (LOCAL, 14, 4), (LOCAL, 18, 4), (LOCAL, 22, 4),
    (LOCAL, 26, 2), (LOCAL, 28, 2),
    (CENTRAL, 4, 2), (CENTRAL, 6, 2), (CENTRAL, 8, 2), (CENTRAL, 10, 2), (CENTRAL, 16, 4),
    (CENTRAL, 20, 4), (CENTRAL, 24, 4), (CENTRAL, 28, 2), (CENTRAL, 30, 2), (CENTRAL, 42, 4),
    (END, 8, 2), (END, 10, 2), (END, 12, 4), (END, 16, 4), (END, 20, 2),
)  # fmt: skip
# Real dtype strings, numeric and not, and some that are no dtype at all.
DESCRS = ("<f8", ">f4", "<f2", "|b1", "<c16", ">i8", "|u1", "|O", "O", "<U3", "|S4", "<M8[ns]",
          "<m8[s]", "|V8", "f8,i4", "(2,)<f8", "", "<i99", "<f8<f8")  # fmt: skip
HUGE_DIMS = (0, 1, 2, 3, 2**18, 2**31, 2**32, 2**63, 2**64, 2**100, -1)


# --- what every outcome must look like --------------------------------------------------------


def decode_whole(data: bytes) -> np.ndarray | None:
    """``decode_array`` under LIMITS: the array, or None after a documented 4xx refusal.

    Any other exception propagates and fails the test: the service would answer it with 500.
    """
    note(f"input: {data!r}")
    try:
        out = decode_array(data, name="file_a", limits=LIMITS)
    except ServiceError as exc:
        assert_documented_refusal(exc)
        return None
    assert_decoded(out)
    return out


def decode_streamed(chunks: list[bytes]) -> np.ndarray | None:
    """``ArrayStream`` fed ``chunks`` one by one: the array, or None after a 4xx refusal."""
    note(f"chunks: {chunks!r}")
    stream = ArrayStream("file_a", LIMITS)
    try:
        for chunk in chunks:
            stream.feed(memoryview(chunk))
        out = stream.finish()
    except ServiceError as exc:
        assert_documented_refusal(exc)
        return None
    assert_decoded(out)
    return out


def assert_decoded(out: np.ndarray) -> None:
    """A decoded operand: C-ordered, native, numeric, within LIMITS."""
    assert isinstance(out, np.ndarray)
    assert out.flags.c_contiguous and out.dtype.isnative
    assert out.dtype.kind in "biufc" and out.dtype.fields is None
    assert out.ndim <= LIMITS.max_dims and out.size <= LIMITS.max_elements
    assert out.nbytes <= LIMITS.max_bytes


def assert_documented_refusal(exc: ServiceError) -> None:
    assert exc.status_code in REFUSAL_STATUSES, f"{type(exc).__name__}: {exc.detail}"
    assert exc.detail


def assert_same_array(out: np.ndarray | None, array: np.ndarray) -> None:
    """``out`` holds ``array``'s values bit for bit, in native byte order and C order."""
    assert out is not None, "a valid array file was refused"
    expected = array.astype(array.dtype.newbyteorder("="), order="C")
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert out.tobytes() == expected.tobytes()


def peak_bytes(action: Callable[[], object]) -> int:
    """Peak bytes traced (Python and NumPy allocations) while ``action`` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- building valid files ---------------------------------------------------------------------


@st.composite
def small_arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays of every numeric dtype and byte order, 0 to 4 dimensions, C or Fortran order."""
    dtype = draw(st.sampled_from(NUMERIC_DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    array = draw(hnp.arrays(dtype, shape))
    return np.asfortranarray(array) if draw(st.booleans()) else array


def npy_file(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=False)
    return buffer.getvalue()


def npz_file(members: list[tuple[str, bytes]], container: str) -> bytes:
    """An archive of ``.npy`` members (name without ``.npy``, file bytes) as ``container``."""
    buffer = io.BytesIO()
    if container in ("savez", "savez_compressed"):
        # numpy's writers take arrays; rebuild them so the archive is byte for byte numpy's.
        arrays = {name: np.load(io.BytesIO(data)) for name, data in members}
        (np.savez if container == "savez" else np.savez_compressed)(buffer, **arrays)
    else:
        with zipfile.ZipFile(buffer, "w", ZIP_METHODS[container]) as archive:
            for name, data in members:
                archive.writestr(f"{name}.npy", data)
    return buffer.getvalue()


# "file" and "allow_pickle" would collide with numpy.savez's own parameters.
member_keys = st.text(
    st.characters(categories=("L", "N")) | st.sampled_from("_-."), min_size=1, max_size=10
).filter(lambda key: key not in ("matrix", "arr_0", "file", "allow_pickle"))


@st.composite
def array_files(
    draw: st.DrawFn, containers: tuple[str, ...] = ("npy", *CONTAINERS)
) -> tuple[bytes, np.ndarray]:
    """A valid ``.npy`` or ``.npz`` file and the array the decoder must read from it."""
    array = draw(small_arrays())
    version = draw(st.sampled_from([None, (1, 0), (2, 0), (3, 0)]))
    member = npy_file(array, version)
    container = draw(st.sampled_from(containers))
    if container == "npy":
        return member, array
    if draw(st.booleans()):  # one member, whatever its key
        members = [(draw(member_keys), member)]
    else:  # several: the decoder must pick "matrix", else "arr_0"
        others = draw(st.lists(member_keys, min_size=1, max_size=3, unique=True))
        decoys = [(key, npy_file(draw(small_arrays()))) for key in others]
        chosen = (draw(st.sampled_from(["matrix", "arr_0"])), member)
        members = draw(st.permutations([chosen, *decoys]))
    return npz_file(members, container), array


# --- mutations --------------------------------------------------------------------------------


@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with 1 to 4 bit flips, truncations, insertions, deletions or overwrites."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
        at = draw(st.integers(0, len(out)))
        if kind == "flip" and at < len(out):
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del out[at : at + draw(st.integers(1, 16))]
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            out[at : at + len(chunk)] = chunk
    return bytes(out)


python_literals = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(HUGE_DIMS)
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(DESCRS)
    | st.binary(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
dims_tuples = st.lists(st.sampled_from(HUGE_DIMS) | st.integers(0, 6), max_size=10).map(tuple)


def npy_with_header(fields: dict[str, str], payload: bytes, version: int) -> bytes:
    """An ``.npy`` file whose header dict maps each key to the given Python source text."""
    text = "{" + "".join(f"{key!r}: {source}, " for key, source in fields.items()) + "}"
    raw = text.encode("utf8")
    prefix = 10 if version == 1 else 12
    raw += b" " * (-(prefix + len(raw) + 1) % 64) + b"\n"
    size = struct.pack("<H" if version == 1 else "<I", len(raw))
    return b"\x93NUMPY" + bytes([version, 0]) + size + raw + payload


def fitting_payload(descr: object, shape: object) -> bytes | None:
    """Zero bytes of exactly the size a header of ``descr`` and ``shape`` declares, if small."""
    if not isinstance(descr, str) or not isinstance(shape, tuple):
        return None
    if not all(isinstance(dim, int) and dim >= 0 for dim in shape):
        return None
    try:
        itemsize = np.dtype(descr).itemsize
    except (TypeError, ValueError, SyntaxError):
        return None
    size = math.prod(shape) * itemsize
    return bytes(size) if size <= 2 * MiB else None


@st.composite
def rewritten_npy(draw: st.DrawFn) -> bytes:
    """An ``.npy`` whose descr, shape or fortran_order became other Python literals."""
    array = draw(small_arrays())
    header = np.lib.format.header_data_from_array_1_0(array)
    descr, shape, fortran = header["descr"], header["shape"], header["fortran_order"]
    choice = draw(st.sampled_from(["descr", "shape", "fortran_order", "several"]))
    if choice in ("descr", "several"):
        descr = draw(st.sampled_from(DESCRS) | python_literals)
    if choice in ("shape", "several"):
        shape = draw(dims_tuples | python_literals)
    if choice in ("fortran_order", "several"):
        fortran = draw(python_literals)
    fields = {"descr": repr(descr), "fortran_order": repr(fortran), "shape": repr(shape)}
    if draw(st.booleans()):  # a required key missing
        del fields[draw(st.sampled_from(sorted(fields)))]
    if draw(st.booleans()):  # an extra key, or a required one given twice
        fields[draw(st.sampled_from(["descr", "shape", "x"]) | st.text(max_size=5))] = repr(
            draw(python_literals)
        )
    data = array.tobytes(order="F" if header["fortran_order"] else "C")
    fit = fitting_payload(descr, shape)
    payload = draw(st.sampled_from([data, b"", data[: len(data) // 2], data + b"\x00"]
                                   + ([fit] if fit is not None else [])))  # fmt: skip
    return npy_with_header(fields, payload, draw(st.sampled_from([1, 2, 3])))


def record_offsets(data: bytes, signature: bytes) -> list[int]:
    offsets, at = [], data.find(signature)
    while at != -1:
        offsets.append(at)
        at = data.find(signature, at + 1)
    return offsets


def zip64_size_fields(data: bytes) -> list[int]:
    """Offsets of the 8-byte sizes in zip64 extra fields of local and central records."""
    found = []
    for signature, name_at, header_len in ((LOCAL, 26, 30), (CENTRAL, 28, 46)):
        for record in record_offsets(data, signature):
            if record + header_len > len(data):
                continue
            name_len, extra_len = struct.unpack_from("<HH", data, record + name_at)
            at = record + header_len + name_len
            end = min(at + extra_len, len(data))
            while at + 4 <= end:
                tag, size = struct.unpack_from("<HH", data, at)
                if tag == 1:
                    found += [at + 4 + i for i in range(0, size - 7, 8)]
                at += 4 + size
    return found


field_values = {
    2: st.sampled_from([0, 1, 0x7FFF, 0xFFFF]) | st.integers(0, 0xFFFF),
    4: st.sampled_from([0, 1, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1),
    8: st.sampled_from([0, 2**31, 2**40, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1),
}


@st.composite
def rewritten_zip(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` (a zip) with header fields rewritten, member names overwritten, or both."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "field", "zip64", "name"]))
        if kind == "field":
            signature, offset, width = draw(st.sampled_from(ZIP_FIELDS))
            records = record_offsets(bytes(out), signature)
            if not records:
                continue
            at = draw(st.sampled_from(records)) + offset
            value = draw(field_values[width])
            out[at : at + width] = value.to_bytes(width, "little")[: max(0, len(out) - at)]
        elif kind == "zip64":
            fields = zip64_size_fields(bytes(out))
            if fields:
                at = draw(st.sampled_from(fields))
                out[at : at + 8] = draw(field_values[8]).to_bytes(8, "little")
        else:
            out = bytearray(draw(renamed_members(bytes(out))))
    return bytes(out)


@st.composite
def renamed_members(draw: st.DrawFn, data: bytes) -> bytes:
    """Overwrite a member's name bytes in its local and/or central record, maybe as UTF-8."""
    out = bytearray(data)
    for signature, flags_at, name_at, header_len in ((LOCAL, 6, 26, 30), (CENTRAL, 8, 28, 46)):
        records = [r for r in record_offsets(data, signature) if r + header_len <= len(data)]
        if not records or not draw(st.booleans()):
            continue
        record = draw(st.sampled_from(records))
        (name_len,) = struct.unpack_from("<H", data, record + name_at)
        name = draw(st.binary(min_size=name_len, max_size=name_len))
        out[record + header_len : record + header_len + name_len] = name
        if draw(st.booleans()):  # the "names are UTF-8" flag
            (flags,) = struct.unpack_from("<H", out, record + flags_at)
            struct.pack_into("<H", out, record + flags_at, flags ^ 0x800)
    return bytes(out)


@st.composite
def mutated_array_files(draw: st.DrawFn) -> bytes:
    """Valid files, or rewritten ones, with zip records rewritten and bytes mutated."""
    if draw(st.booleans()):
        data = draw(array_files())[0]
    else:
        member = draw(rewritten_npy())
        container = draw(st.sampled_from(("npy", "stored", "deflated", "bzip2", "lzma")))
        data = member if container == "npy" else npz_file([("a", member)], container)
    if data.startswith(LOCAL) and draw(st.booleans()):
        data = draw(rewritten_zip(data))
    if draw(st.booleans()):
        data = draw(byte_mutations(data))
    return data


@st.composite
def chunked(draw: st.DrawFn, body: bytes) -> list[bytes]:
    """``body`` cut at arbitrary places, empty chunks included."""
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=8)))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


def with_chunks(files: st.SearchStrategy) -> st.SearchStrategy:
    """Each drawn file (bytes, or a tuple starting with them) and a chunking of its bytes."""
    return files.flatmap(
        lambda f: st.tuples(st.just(f), chunked(f[0] if isinstance(f, tuple) else f))
    )


arbitrary_bytes = st.binary(max_size=512) | st.builds(
    bytes.__add__, st.sampled_from([b"\x93NUMPY", b"\x93NUMPY\x01\x00", LOCAL, END]),
    st.binary(max_size=512),
)  # fmt: skip


# --- properties of decode_array -------------------------------------------------------------


@settings(FUZZ, max_examples=150)
@given(array_files())
def test_every_valid_array_file_decodes_to_the_same_array(file):
    data, array = file
    assert_same_array(decode_whole(data), array)


@settings(FUZZ, max_examples=250)
@given(arbitrary_bytes)
def test_arbitrary_bytes_decode_or_are_refused_with_a_4xx(data):
    decode_whole(data)


@settings(FUZZ, max_examples=300)
@given(rewritten_npy())
def test_npy_with_rewritten_header_fields_decodes_or_is_refused_with_a_4xx(data):
    decode_whole(data)


@settings(FUZZ, max_examples=300)
@given(array_files().flatmap(lambda file: rewritten_zip(file[0])))
def test_npz_with_rewritten_zip_records_decodes_or_is_refused_with_a_4xx(data):
    decode_whole(data)


@settings(FUZZ, max_examples=400)
@given(mutated_array_files())
def test_mutated_array_files_decode_or_are_refused_with_a_4xx(data):
    decode_whole(data)


# --- properties of ArrayStream (the upload path) ------------------------------------------


@settings(FUZZ, max_examples=150)
@given(with_chunks(array_files(STREAMABLE)))
def test_array_stream_decodes_every_valid_file_to_the_same_array_in_any_chunking(case):
    (_, array), chunks = case
    assert_same_array(decode_streamed(chunks), array)


@settings(FUZZ, max_examples=150)
@given(with_chunks(arbitrary_bytes))
def test_array_stream_decodes_or_refuses_arbitrary_bytes_with_a_4xx(case):
    _, chunks = case
    decode_streamed(chunks)


@settings(FUZZ, max_examples=400)
@given(with_chunks(mutated_array_files()))
def test_array_stream_decodes_mutated_files_as_decode_array_does_or_refuses_them(case):
    data, chunks = case
    streamed, whole = decode_streamed(chunks), decode_whole(data)
    if streamed is not None and whole is not None:
        assert streamed.dtype == whole.dtype and streamed.shape == whole.shape
        assert streamed.tobytes() == whole.tobytes()


# --- the one-piece path: it declines, or agrees with the stream ------------------------------


def in_one_piece(data: bytes) -> np.ndarray | None:
    note(f"input: {data!r}")
    return decode_in_one_piece(memoryview(data), name="file_a", limits=LIMITS, allocate=np.empty)


@settings(FUZZ, max_examples=150)
@given(array_files(STREAMABLE))
def test_one_piece_path_decodes_valid_files_as_the_stream_does_or_declines(file):
    data, array = file
    got = in_one_piece(data)
    if got is not None:
        assert_same_array(got, array)


@settings(FUZZ, max_examples=500)
@given(
    st.one_of(
        mutated_array_files(),
        rewritten_npy(),
        array_files().flatmap(lambda file: rewritten_zip(file[0])),
    )
)
def test_one_piece_path_accepts_only_what_the_stream_accepts_and_agrees_with_it(data):
    got = in_one_piece(data)
    if got is None:
        return
    streamed = decode_streamed([data[:1], data[1:]])  # two pieces: the stream's own way
    assert streamed is not None, "the one-piece path accepted a file the stream refuses"
    assert got.dtype == streamed.dtype and got.shape == streamed.shape
    assert got.tobytes() == streamed.tobytes()


# --- memory ---------------------------------------------------------------------------------


def test_memory_probe_sees_numpy_allocations():
    """The probe below must see array data, or its bound would hold trivially."""
    assert peak_bytes(lambda: np.ones(2 * MEMORY_BOUND_BYTES, np.uint8)) > MEMORY_BOUND_BYTES


@st.composite
def files_declaring_huge_sizes(draw: st.DrawFn) -> bytes:
    """Small files whose npy header, zip sizes or zip64 sizes declare up to 2**64 bytes."""
    dims = draw(
        st.lists(st.sampled_from(HUGE_DIMS[4:-1]) | st.integers(1, 2**20), min_size=1, max_size=4)
    )
    descr = draw(st.sampled_from(["<f8", "<c16", "|u1", ">i4"]))
    fields = {"descr": repr(descr), "fortran_order": "False", "shape": repr(tuple(dims))}
    member = npy_with_header(fields, bytes(draw(st.integers(0, 4096))), 1)
    container = draw(st.sampled_from(("npy", "savez", "deflated", "stored")))
    if container == "npy":
        return member
    if container == "savez":
        data = npz_file([("a", npy_file(np.zeros(draw(st.integers(1, 512)))))], "savez")
    else:
        data = npz_file([("a", member)], container)
    return draw(rewritten_zip(data))


@settings(FUZZ, max_examples=60, deadline=None)
@given(files_declaring_huge_sizes())
def test_inputs_declaring_huge_sizes_decode_in_bounded_memory(data):
    assert peak_bytes(lambda: decode_whole(data)) < MEMORY_BOUND_BYTES
    assert peak_bytes(lambda: decode_streamed([data])) < MEMORY_BOUND_BYTES


def deflated_zeros_member(npy_header: bytes, inflated_bytes: int) -> bytes:
    """A deflated ``.npz`` whose one member is ``npy_header`` then that many zero bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    pieces, crc, zeros = [compressor.compress(npy_header)], zlib.crc32(npy_header), bytes(MiB)
    for _ in range(inflated_bytes // MiB):
        pieces.append(compressor.compress(zeros))
        crc = zlib.crc32(zeros, crc)
    pieces.append(compressor.flush())
    compressed, size = b"".join(pieces), len(npy_header) + inflated_bytes
    name = b"a.npy"
    local = struct.pack("<4s5H3I2H", LOCAL, 20, 0, 8, 0, 0, crc, len(compressed), size,
                        len(name), 0) + name  # fmt: skip
    central = struct.pack("<4s6H3I5H2I", CENTRAL, 20, 20, 0, 8, 0, 0, crc, len(compressed),
                          size, len(name), 0, 0, 0, 0, 0, 0) + name  # fmt: skip
    end = struct.pack("<4s4H2IH", END, 0, 0, 1, 1, len(central), len(local) + len(compressed), 0)
    return local + compressed + central + end


def with_declared_size(data: bytes, size: int) -> bytes:
    """``data`` (one-member zip) with the member's inflated size rewritten in both records."""
    out = bytearray(data)
    struct.pack_into("<I", out, record_offsets(data, LOCAL)[0] + 22, size)
    struct.pack_into("<I", out, record_offsets(data, CENTRAL)[0] + 24, size)
    return bytes(out)


def float64_npy_header(elements: int) -> bytes:
    fields = {"descr": "'<f8'", "fortran_order": "False", "shape": repr((elements,))}
    return npy_with_header(fields, b"", 1)


def whole_file(data: bytes) -> np.ndarray:
    return decode_array(data, name="file_a", limits=LIMITS)


def in_chunks(data: bytes, chunk_bytes: int = 64 * 1024) -> np.ndarray:
    """``ArrayStream`` fed the way an upload arrives: fixed-size chunks of the body."""
    stream, view = ArrayStream("file_a", LIMITS), memoryview(data)
    for start in range(0, len(view), chunk_bytes):
        stream.feed(view[start : start + chunk_bytes])
    return stream.finish()


each_decoder = pytest.mark.parametrize("decode", [whole_file, in_chunks])


@each_decoder
def test_zip_bomb_declaring_its_size_is_refused_with_413_before_inflating(decode):
    bomb = deflated_zeros_member(float64_npy_header(2**25), 256 * MiB)  # 256 MiB of zeros
    assert len(bomb) < MiB

    def refuse() -> None:
        with pytest.raises(PayloadTooLarge, match="inflates to"):
            decode(bomb)

    assert peak_bytes(refuse) < MEMORY_BOUND_BYTES


@each_decoder
def test_zip_bomb_lying_about_its_size_inflates_no_more_than_it_declares(decode):
    header = float64_npy_header(LIMITS.max_bytes // 8)
    bomb = deflated_zeros_member(header, 256 * MiB)
    liar = with_declared_size(bomb, len(header) + LIMITS.max_bytes)

    def refuse() -> None:
        with pytest.raises(BadArrayInput):  # its CRC and length are the whole stream's
            decode(liar)

    assert peak_bytes(refuse) < MEMORY_BOUND_BYTES


def test_zip_bomb_builder_makes_a_real_bomb():
    """The bombs above inflate as they claim, so the refusals are the decoder's doing."""
    header = float64_npy_header(LIMITS.max_bytes // 8)
    bomb = deflated_zeros_member(header, LIMITS.max_bytes)
    with zipfile.ZipFile(io.BytesIO(bomb)) as archive:
        assert archive.read("a.npy") == header + bytes(LIMITS.max_bytes)
    out = whole_file(bomb)
    assert out.shape == (LIMITS.max_bytes // 8,) and not out.any()
    np.testing.assert_array_equal(in_chunks(bomb), out)


# --- properties of read_multipart -----------------------------------------------------------


BOUNDARY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'()+_,-./:=?"
SAFE_NAME = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12)
# One part: field name, file name (None: a text field), content type, bytes, array they hold.
FormPart = tuple[str, str | None, str | None, bytes, np.ndarray | None]


@st.composite
def form_parts(draw: st.DrawFn, junk_files: bool = False) -> FormPart:
    """A text field, or a file holding an array (or, with ``junk_files``, maybe any bytes)."""
    name = draw(SAFE_NAME)
    if not draw(st.booleans()):
        return name, None, None, draw(st.binary(max_size=MAX_TEXT_FIELD_BYTES)), None
    content_type = draw(st.sampled_from([None, "application/octet-stream", "image/png"]))
    if junk_files and draw(st.booleans()):
        return name, draw(SAFE_NAME), content_type, draw(st.binary(max_size=2048)), None
    data, array = draw(array_files(STREAMABLE))
    return name, draw(SAFE_NAME), content_type, data, array


def multipart_body(boundary: str, parts: list[FormPart]) -> bytes:
    body = b""
    for name, filename, content_type, data, _ in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if content_type is not None:
            body += f"Content-Type: {content_type}\r\n".encode()
        body += b"\r\n" + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


async def stream(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def parse(
    chunks: list[bytes],
    content_type: str | None,
    content_length: str | None,
    max_bytes: int,
    pool: Executor | None = None,
    whole: bool | str = False,
) -> Upload | ServiceError:
    """What the route makes of the body: an Upload whose files are decoded, or a ServiceError.

    As ``routes/ops.py`` does, ``read_multipart`` then ``operands`` (here: all of the files).
    ``pool``: where the decoders check large arrays (the service's upload threads); ``whole``:
    a body that came in one chunk may be read whole, as the route lets it ("native": by the
    native reader first, as the service does where it is built).
    """

    def open_file(name: str, most: int) -> ArrayStream:
        return ArrayStream(name, LIMITS, most_bytes=most, pool=pool)

    def decode_whole(name: str, data: memoryview) -> np.ndarray | None:
        return decode_in_one_piece(data, name=name, limits=LIMITS, allocate=np.empty)

    decode_laid_out = LaidOutNpyDecoder(LIMITS, np.empty)

    read_whole = None
    if whole == "native":
        read_whole = whole_body_reader(decode_whole, NATIVE_LAYOUT, decode_laid_out)
    elif whole:
        read_whole = whole_body_reader(decode_whole)
    try:
        upload = asyncio.run(
            read_multipart(stream(chunks), content_type=content_type,
                           content_length=content_length, max_bytes=max_bytes,
                           open_file=open_file, read_whole=read_whole)
        )  # fmt: skip
        asyncio.run(upload.operands(len(upload.files)))
    except ServiceError as exc:
        assert_documented_refusal(exc)
        return exc
    return upload


@st.composite
def well_formed_uploads(
    draw: st.DrawFn, junk_files: bool = False
) -> tuple[str, list[FormPart], bytes]:
    boundary = draw(st.text(BOUNDARY_CHARS, min_size=1, max_size=70))
    parts = draw(st.lists(form_parts(junk_files), max_size=4))
    assume(all(f"\r\n--{boundary}".encode() not in b"\r\n" + p[3] for p in parts))
    assume(sum(p[1] is not None for p in parts) <= 2)  # the service takes two files at most
    return boundary, parts, multipart_body(boundary, parts)


@settings(FUZZ, max_examples=100)
@given(with_chunks(well_formed_uploads().map(lambda u: (u[2], u))))
def test_well_formed_multipart_bodies_parse_the_same_in_any_chunking(case):
    (body, (boundary, parts, _)), chunks = case
    content_type = f"multipart/form-data; boundary={boundary}"
    note(f"chunks: {chunks!r}")
    upload = parse(chunks, content_type, str(len(body)), max_bytes=len(body))
    assert isinstance(upload, Upload), upload
    assert upload.body_bytes == len(body)
    assert [(p.name, p.filename, p.content_type) for p in upload.parts] == [
        (name, filename, content_type) for name, filename, content_type, _, _ in parts
    ]
    for part, (_, _, _, data, array) in zip(upload.parts, parts, strict=True):
        if array is None:
            assert bytes(part.text) == data
        else:
            assert_same_array(part.array, array)


content_types = st.one_of(
    st.none(),
    st.sampled_from(["multipart/form-data", "multipart/form-data; boundary=", "application/json",
                     "multipart/form-data; boundary=\"\"", "MULTIPART/FORM-DATA; BOUNDARY=b"]),
    st.text(st.characters(max_codepoint=0xFF), max_size=40),  # headers arrive as latin-1
    st.text(st.characters(max_codepoint=0xFF), max_size=20).map(
        lambda b: f"multipart/form-data; boundary={b}"
    ),
)  # fmt: skip
content_lengths = st.none() | st.integers(0, 2**70).map(str) | st.text(max_size=6)


@st.composite
def malformed_uploads(draw: st.DrawFn) -> tuple[list[bytes], str | None, str | None, int]:
    """Bodies mutated or not, under a right or wrong content type, length and byte cap."""
    boundary, _, body = draw(well_formed_uploads(junk_files=True))
    many_parts = draw(st.lists(form_parts(junk_files=True), max_size=MAX_PARTS + 3))
    body = draw(st.sampled_from([body, multipart_body(boundary, many_parts)]))
    if draw(st.booleans()):
        body = draw(byte_mutations(body))
    content_type = f"multipart/form-data; boundary={boundary}"
    if draw(st.booleans()):
        content_type = draw(content_types)
    content_length = draw(st.sampled_from([str(len(body)), None]) | content_lengths)
    max_bytes = draw(st.integers(1, 2 * len(body) + 2))
    return draw(chunked(body)), content_type, content_length, max_bytes


@settings(FUZZ, max_examples=250)
@given(malformed_uploads())
def test_malformed_multipart_bodies_parse_or_are_refused_with_a_4xx(upload):
    chunks, content_type, content_length, max_bytes = upload
    note(f"chunks: {chunks!r}, content type {content_type!r}, length {content_length!r}")
    outcome = parse(chunks, content_type, content_length, max_bytes)
    if isinstance(outcome, Upload):
        assert outcome.body_bytes == sum(map(len, chunks)) <= max_bytes
        assert len(outcome.parts) <= MAX_PARTS
        for part in outcome.parts:
            if part.is_file:
                assert_decoded(part.array)
            else:
                assert len(part.text) <= MAX_TEXT_FIELD_BYTES


@pytest.fixture(scope="module")
def upload_pool() -> Iterator[Executor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


@settings(FUZZ, max_examples=250)
@given(malformed_uploads())
def test_uploads_checked_off_the_loop_parse_as_they_do_on_it(upload_pool, upload):
    # Every array checked off the loop in 64-byte blocks, every stretch of its data passed
    # on unsearched: accepted with the same arrays, or refused, as on the loop. Which refusal
    # may differ for a crafted body (a short file swallowing its part's delimiter: 400, where
    # the loop would meet a later part's 413 first).
    chunks, content_type, content_length, max_bytes = upload
    note(f"chunks: {chunks!r}, content type {content_type!r}, length {content_length!r}")
    on_loop = parse(chunks, content_type, content_length, max_bytes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(array_checks, "OFF_LOOP_BYTES", 1)
        patch.setattr(array_checks, "CHECK_BLOCK_BYTES", 64)
        patch.setattr(multipart_splitter, "MIN_PLAIN_STRETCH", 1)
        off_loop = parse(chunks, content_type, content_length, max_bytes, upload_pool)
    if isinstance(on_loop, ServiceError):
        assert isinstance(off_loop, ServiceError), "accepted off the loop, refused on it"
        return
    assert isinstance(off_loop, Upload), off_loop
    assert [(p.name, p.filename) for p in off_loop.parts] == [
        (p.name, p.filename) for p in on_loop.parts
    ]
    for ours, theirs in zip(off_loop.parts, on_loop.parts, strict=True):
        if theirs.array is not None:
            assert ours.array is not None
            assert ours.array.dtype == theirs.array.dtype
            assert ours.array.shape == theirs.array.shape
            assert ours.array.tobytes() == theirs.array.tobytes()


@settings(FUZZ, max_examples=250)
@given(malformed_uploads())
def test_bodies_read_whole_parse_as_the_splitter_parses_them(upload):
    # Any body, in one chunk of its declared length: read whole, the same parts and arrays as
    # the splitter's, or exactly the splitter's refusal (every error is left to it).
    chunks, content_type, _, max_bytes = upload
    body = b"".join(chunks)
    note(f"body: {body!r}, content type {content_type!r}")
    split = parse([body], content_type, str(len(body)), max_bytes)
    whole = parse([body], content_type, str(len(body)), max_bytes, whole=True)
    if isinstance(split, ServiceError):
        assert (type(whole), getattr(whole, "detail", None)) == (type(split), split.detail)
        return
    assert isinstance(whole, Upload), whole
    assert whole.body_bytes == split.body_bytes
    assert [(p.name, p.filename, p.content_type, bytes(p.text)) for p in whole.parts] == [
        (p.name, p.filename, p.content_type, bytes(p.text)) for p in split.parts
    ]
    for ours, theirs in zip(whole.parts, split.parts, strict=True):
        if theirs.array is not None:
            assert ours.array is not None
            assert (ours.array.dtype, ours.array.shape) == (theirs.array.dtype, theirs.array.shape)
            assert ours.array.tobytes() == theirs.array.tobytes()


needs_native = pytest.mark.skipif(NATIVE_LAYOUT is None, reason="no C compiler for the reader")


@st.composite
def two_file_uploads(draw: st.DrawFn) -> tuple[list[bytes], str, str, int]:
    """What the native reader is for (two files as clients send them), mutated or not."""
    boundary = draw(st.text(BOUNDARY_CHARS, min_size=1, max_size=70))
    parts = []
    for _ in range(2):
        name, filename = draw(SAFE_NAME), draw(SAFE_NAME)
        content_type = draw(st.sampled_from([None, "application/octet-stream"]))
        parts.append((name, filename, content_type, *draw(array_files(STREAMABLE))))
    assume(all(f"\r\n--{boundary}".encode() not in b"\r\n" + p[3] for p in parts))
    body = multipart_body(boundary, parts)
    if draw(st.booleans()):
        body = draw(byte_mutations(body))
    return [body], f"multipart/form-data; boundary={boundary}", str(len(body)), len(body)


@needs_native
@settings(FUZZ, max_examples=400)
@given(st.one_of(two_file_uploads(), malformed_uploads()))
def test_bodies_the_native_reader_lays_out_parse_as_the_python_readers_parse_them(upload):
    # Any body, in one chunk of its declared length: read natively first, the same parts and
    # arrays as the Python readers', or exactly their refusal (every error is left to them).
    chunks, content_type, _, max_bytes = upload
    body = b"".join(chunks)
    note(f"body: {body!r}, content type {content_type!r}")
    boundary = content_type.partition("boundary=")[2].encode() if content_type else b""
    event("laid out natively" if NATIVE_LAYOUT(body, boundary) else "declined natively")
    python = parse([body], content_type, str(len(body)), max_bytes, whole=True)
    native = parse([body], content_type, str(len(body)), max_bytes, whole="native")
    if isinstance(python, ServiceError):
        assert (type(native), getattr(native, "detail", None)) == (type(python), python.detail)
        return
    assert isinstance(native, Upload), native
    assert [(p.name, p.filename, p.content_type, bytes(p.text)) for p in native.parts] == [
        (p.name, p.filename, p.content_type, bytes(p.text)) for p in python.parts
    ]
    for ours, theirs in zip(native.parts, python.parts, strict=True):
        assert (ours.array is None) == (theirs.array is None)
        if theirs.array is not None:
            assert (ours.array.dtype, ours.array.shape) == (theirs.array.dtype, theirs.array.shape)
            assert ours.array.tobytes() == theirs.array.tobytes()


# --- bugs found by the properties above -----------------------------------------------------


@each_decoder
@pytest.mark.parametrize("shape", [(0, 2**63), (0, 2**31, 2**31)], ids=["dim", "product"])
def test_empty_npy_with_dimensions_beyond_intp_is_refused(decode, shape):
    # Zero elements pass every limit, then np.empty raises ValueError ("Maximum allowed
    # dimension exceeded" / "array is too big"): a 500.
    fields = {"descr": "'<f8'", "fortran_order": "False", "shape": repr(shape)}
    data = npy_with_header(fields, b"", 1)
    assert data.startswith(b"\x93NUMPY\x01\x00v\x00{'descr': '<f8', 'fortran_order': False")
    with pytest.raises((BadArrayInput, PayloadTooLarge)):
        decode(data)


def test_npz_whose_local_utf8_member_name_is_not_utf8_is_refused_with_400():
    # zipfile decodes the local header's name as UTF-8 inside ZipFile.open: UnicodeDecodeError.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("é.npy", npy_file(np.arange(3.0)))
    data = bytearray(buffer.getvalue())
    data[30] = 0xFF  # first byte of the local header's name
    with pytest.raises(BadArrayInput):
        decode_array(bytes(data), name="file_a", limits=LIMITS)


def test_lzma_npz_member_with_corrupt_properties_is_refused_with_400():
    # zipfile's LZMA reader raises lzma.LZMAError, which is no OSError.
    data = bytearray(npz_file([("a", npy_file(np.arange(3.0)))], "lzma"))
    data[30 + len("a.npy") + 4 : 30 + len("a.npy") + 9] = b"\xff" * 5  # the LZMA properties
    with pytest.raises(BadArrayInput):
        decode_array(bytes(data), name="file_a", limits=LIMITS)


def test_content_length_of_non_ascii_digits_does_not_escape_as_value_error():
    # "²".isdigit() is True but int("²") raises ValueError. uvicorn's HTTP parsers refuse such
    # a header before the app sees it; read_multipart's contract should not depend on that.
    body = multipart_body("b", [("note", None, None, b"x", None)])
    outcome = parse([body], "multipart/form-data; boundary=b", "\u00b2", max_bytes=len(body))
    if isinstance(outcome, Upload):  # ignoring the header is as good as a 400
        assert bytes(outcome.parts[0].text) == b"x"


def test_npz_whose_central_directory_offset_is_too_large_is_refused_with_400():
    # zipfile shifts every member's offset by the difference, seeks to a negative position
    # inside ZipFile.open and raises ValueError("negative seek value ...").
    data = bytearray(npz_file([("arr_0", npy_file(np.arange(3.0)))], "savez"))
    struct.pack_into("<I", data, data.rfind(END) + 16, 2**31)
    with pytest.raises(BadArrayInput):
        decode_array(bytes(data), name="file_a", limits=LIMITS)


def test_npz_member_whose_central_name_starts_with_nul_is_refused_with_400():
    # zipfile cuts names at NUL; ZipInfo.is_dir() then indexes "" and raises IndexError.
    data = bytearray(npz_file([("arr_0", npy_file(np.arange(3.0)))], "savez"))
    data[data.find(CENTRAL) + 46] = 0  # first byte of the central record's name
    with pytest.raises(BadArrayInput):
        decode_array(bytes(data), name="file_a", limits=LIMITS)


def test_npz_needing_a_newer_zip_version_is_refused_with_400():
    # ZipFile() itself raises NotImplementedError("zip file version 6.4").
    data = bytearray(npz_file([("arr_0", npy_file(np.arange(3.0)))], "savez"))
    struct.pack_into("<H", data, data.find(CENTRAL) + 6, 64)  # version needed to extract
    with pytest.raises(BadArrayInput):
        decode_array(bytes(data), name="file_a", limits=LIMITS)
