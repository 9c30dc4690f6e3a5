"""Large uploads checked off the event loop: lanes, the GIL-free search, and the decoders and
the multipart reader using them (CRC and boundary checks in blocks of the destination)."""

from __future__ import annotations

import asyncio
import gc
import io
import threading
import warnings
import weakref
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gpu_matrix_service import array_checks, lanes
from gpu_matrix_service.array_stream import ArrayStream
from gpu_matrix_service.arrays import ArrayLimits, decode_array
from gpu_matrix_service.errors import BadArrayInput, BadRequest, ServiceError
from gpu_matrix_service.lanes import Lane, contains
from gpu_matrix_service.uploads import read_multipart

from arrayfiles import array_file_cases, npy_bytes, npz_bytes, npz_compressed_bytes

LIMITS = ArrayLimits(max_bytes=1 << 26, max_elements=1 << 24, max_dims=8)
BOUNDARY = "b0undary"
DELIMITER = f"\r\n--{BOUNDARY}".encode()


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Every array checked off the loop, in 64-byte blocks: small files take that path."""
    monkeypatch.setattr(array_checks, "OFF_LOOP_BYTES", 1)
    monkeypatch.setattr(array_checks, "CHECK_BLOCK_BYTES", 64)


@pytest.fixture
def lane_puts(monkeypatch) -> list[int]:
    """Counts jobs put on lanes, to show a test took the off-loop path."""
    puts: list[int] = []
    put = Lane.put

    def counting(self, job):
        puts.append(1)
        put(self, job)

    monkeypatch.setattr(Lane, "put", counting)
    return puts


def _fail(message: str) -> None:
    raise BadRequest(message)


def test_a_lane_runs_its_jobs_in_order_then_raises_the_first_error_and_skips_the_rest(pool):
    lane, ran = Lane(pool), []
    for n in range(50):
        lane.put(lambda n=n: ran.append(n))
    lane.put(lambda: _fail("first"))
    lane.put(lambda: _fail("second"))
    lane.put(lambda: ran.append("after"))
    lane.wait()
    assert not lane.busy
    assert ran == list(range(50))
    with pytest.raises(BadRequest, match="first"):
        lane.raise_error()


def test_an_abandoned_lane_skips_the_jobs_not_yet_started(pool):
    lane, started, release, ran = Lane(pool), threading.Event(), threading.Event(), []
    lane.put(lambda: (started.set(), release.wait(5), ran.append("running")))
    lane.put(lambda: ran.append("queued"))
    assert started.wait(5)
    assert lane.busy
    lane.abandon()
    release.set()
    lane.wait()
    assert ran == ["running"]
    lane.raise_error()  # skipping is no error


def test_a_lane_runs_jobs_on_the_caller_once_its_pool_is_shut_down():
    executor = ThreadPoolExecutor(1)
    executor.shutdown()
    lane, ran = Lane(executor), []
    lane.put(lambda: ran.append(threading.current_thread()))
    assert ran == [threading.current_thread()]
    assert not lane.busy


@pytest.mark.parametrize("gil_free", [True, False], ids=["memmem", "bytes.find"])
def test_contains_finds_the_needle_anywhere_and_nothing_else(monkeypatch, gil_free):
    if not gil_free:
        monkeypatch.setattr(lanes, "_MEMMEM", None)
    elif lanes._MEMMEM is None:
        pytest.skip("libc has no memmem here")
    data = bytearray(np.random.default_rng(1).integers(0, 255, 4096, dtype=np.uint8).tobytes())
    assert not contains(memoryview(bytes(data)), DELIMITER)
    for at in (0, 1, 2000, len(data) - len(DELIMITER)):
        found = bytearray(data)
        found[at : at + len(DELIMITER)] = DELIMITER
        assert contains(memoryview(bytes(found)), DELIMITER), at
        assert not contains(memoryview(bytes(found))[at + 1 :], DELIMITER), at
    assert not contains(memoryview(DELIMITER[:-1]), DELIMITER)  # shorter than the needle


def _stream(data: bytes, chunk: int, pool, limits: ArrayLimits = LIMITS) -> ArrayStream:
    stream = ArrayStream("file_a", limits, pool=pool)
    stream.refuse(DELIMITER, lambda: BadRequest("boundary inside"))
    for start in range(0, len(data), chunk):
        stream.feed(memoryview(data)[start : start + chunk])
    stream.end()
    stream.wait()
    return stream


@pytest.mark.parametrize("chunk", [1, 7, 100, 4096])
def test_checks_off_the_loop_decode_as_the_whole_file_decoder_does(
    rng, pool, tiny_blocks, lane_puts, chunk
):
    for label, data in array_file_cases(rng).items():
        got = _stream(data, chunk, pool).finish()
        np.testing.assert_array_equal(got, decode_array(data, name="f", limits=LIMITS), label)
    assert lane_puts


@pytest.mark.parametrize("chunk", [64, 4096])
def test_a_corrupt_byte_fails_the_crc_checked_off_the_loop(rng, pool, tiny_blocks, chunk):
    data = bytearray(npz_bytes(rng.standard_normal((40, 40)).astype(np.float32)))
    data[len(data) // 2] ^= 0x10  # inside the array's data
    with pytest.raises(BadArrayInput, match="checksum"):
        _stream(bytes(data), chunk, pool).finish()
    unchecked = ArrayLimits(max_bytes=1 << 26, max_elements=1 << 24, max_dims=8,
                            verify_stored_crc=False)  # fmt: skip
    assert _stream(bytes(data), chunk, pool, unchecked).finish().shape == (40, 40)


def _with_needle(array: np.ndarray, at: int) -> np.ndarray:
    """``array`` with the delimiter written into its data at byte ``at`` (a client's own
    bytes: the file's CRC covers them)."""
    data = bytearray(array.tobytes())
    data[at : at + len(DELIMITER)] = DELIMITER
    return np.frombuffer(bytes(data), array.dtype).reshape(array.shape)


def test_real_blocks_check_crc_and_needle_across_a_block_edge(rng, pool, lane_puts):
    # 9 MB: two 8 MiB blocks, the needle straddling their edge.
    a = rng.standard_normal(9 << 18).astype(np.float32)
    data = npz_bytes(a)
    start = data.index(a.tobytes()[:64])  # where the array's data begins in the file
    got = _stream(data, 1 << 16, pool).finish()
    np.testing.assert_array_equal(got, a)
    assert len(lane_puts) >= 3  # two blocks, then the CRC comparison
    # Blocks start after the array bytes of the first 64 KiB chunk (checked as it came).
    edge = (1 << 16) - start + array_checks.CHECK_BLOCK_BYTES
    with pytest.raises(BadRequest, match="boundary inside"):
        _stream(npz_bytes(_with_needle(a, edge - 5)), 1 << 16, pool).finish()


def _multipart(a: bytes, b: bytes) -> bytes:
    body = b""
    for name, content in (("file_a", a), ("file_b", b)):
        body += (
            (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{name}.npz"\r\n\r\n'
            ).encode()
            + content
            + b"\r\n"
        )
    return body + f"--{BOUNDARY}--\r\n".encode()


def _read(body: bytes, chunk: int, pool):
    async def chunks():
        for start in range(0, len(body), chunk):
            yield body[start : start + chunk]

    async def upload():
        got = await read_multipart(
            chunks(), content_type=f"multipart/form-data; boundary={BOUNDARY}",
            content_length=str(len(body)), max_bytes=1 << 30,
            open_file=lambda name, most: ArrayStream(name, LIMITS, most_bytes=most, pool=pool),
        )  # fmt: skip
        return [part.array for part in await got.operands()]

    return asyncio.run(upload())


@pytest.mark.parametrize("chunk", [1 << 16, 100_003, 1 << 19])
def test_large_parts_read_right_and_a_boundary_anywhere_in_their_data_is_400(rng, pool, chunk):
    a = rng.standard_normal((700, 700)).astype(np.float32)  # 1.96 MB: checked off the loop
    b = rng.standard_normal((700, 700)).astype(np.float32)
    body = _multipart(npz_bytes(a), npz_bytes(b))
    first, second = _read(body, chunk, pool)
    np.testing.assert_array_equal(first, a)
    np.testing.assert_array_equal(second, b)
    data_a, keep = body.index(a.tobytes()[:64]), len(DELIMITER) - 1
    # In file_a's own bytes (its CRC is right): mid-data and across a stretch's end, searched
    # off the loop only.
    for at in (900_000, 2 * chunk - keep - 4 - data_a):
        with pytest.raises(BadRequest, match="boundary occurs inside the data of file 'file_a'"):
            _read(_multipart(npz_bytes(_with_needle(a, at)), npz_bytes(b)), chunk, pool)
    # Across a chunk's end (the loop's search of the tail), and across the end of the array's
    # data (the loop's search of its last bytes; the decoder sees only part of it): the part
    # is cut there, as RFC 2046 says, and the file is short: a 400 as well.
    tail = _multipart(npz_bytes(_with_needle(a, 2 * chunk - 3 - data_a)), npz_bytes(b))
    at = data_a + a.nbytes - 5
    for bad in (tail, body[:at] + DELIMITER + body[at + len(DELIMITER) :]):
        with pytest.raises(ServiceError) as caught:
            _read(bad, chunk, pool)
        assert caught.value.status_code == 400


def test_a_bad_crc_in_a_member_not_chosen_is_refused_as_on_the_loop(rng, pool, tiny_blocks):
    a = rng.standard_normal((30, 30)).astype(np.float32)
    data = bytearray(npz_bytes(a + 1, matrix=a))  # arr_0 is decoded too (it comes first)
    data[data.index((a + 1).tobytes()[:64]) + 100] ^= 0x10
    for pool_or_none in (None, pool):
        with pytest.raises(BadArrayInput, match=r"arr_0.*checksum"):
            _stream(bytes(data), 4096, pool_or_none).finish()


def _zip(*members: tuple[str, bytes, int]) -> bytes:
    """An .npz of ``(name, npy bytes, zipfile method)`` members, repeated names allowed."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore")  # "Duplicate name"
        for name, data, method in members:
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return buffer.getvalue()


def _both(body: bytes, pool) -> list:
    """What the reader makes of ``body`` on the loop and off it: arrays or a status."""
    outcomes = []
    for with_pool in (None, pool):
        try:
            outcomes.append([array.tobytes() for array in _read(body, 1 << 16, with_pool)])
        except ServiceError as exc:
            outcomes.append(exc.status_code)
    return outcomes


def test_a_repeated_member_name_keeps_the_first_members_checks(rng, pool):
    a = rng.standard_normal(3 << 18).astype(np.float32)  # 3 MiB, the real thresholds
    small = npy_bytes(rng.standard_normal(100).astype(np.float32))
    first = bytearray(npy_bytes(a))
    first[2_000_000 : 2_000_000 + len(DELIMITER) + 4] = DELIMITER + b"--\r\n"
    boundary_inside = _zip(("matrix.npy", bytes(first), zipfile.ZIP_STORED),
                           ("matrix.npy", small, zipfile.ZIP_STORED))  # fmt: skip
    assert _both(_multipart(boundary_inside, small), pool) == [400, 400]
    bad_crc = bytearray(_zip(("matrix.npy", npy_bytes(a), zipfile.ZIP_STORED),
                             ("matrix.npy", small, zipfile.ZIP_STORED)))  # fmt: skip
    bad_crc[2_000_000] ^= 1
    assert _both(_multipart(bytes(bad_crc), small), pool) == [400, 400]


def test_a_deflated_member_is_searched_as_sent_not_as_inflated(rng, pool):
    # Random 4-bit values: the compressed file (Huffman-coded, about half as long) arrives and
    # inflates in pieces, and holds no literal copy of the delimiter.
    data = rng.integers(0, 16, 2 << 20, dtype=np.uint8)  # inflated, holds the delimiter
    data[1_000_000 : 1_000_000 + len(DELIMITER)] = np.frombuffer(DELIMITER, np.uint8)
    compressed = npz_compressed_bytes(matrix=data)
    assert DELIMITER not in compressed
    on_loop, off_loop = _both(_multipart(compressed, compressed), pool)
    assert on_loop == off_loop == [data.tobytes(), data.tobytes()]


def test_the_crc_counts_every_byte_of_a_member_that_is_long_or_short(rng, pool):
    x = npy_bytes(rng.standard_normal(3 << 18).astype(np.float32))  # checked off the loop
    matrix = rng.standard_normal(1000).astype(np.float32)
    small = npy_bytes(matrix)
    for arr_0 in ((x + b"\0" * 100, zipfile.ZIP_STORED), (x[:-300], zipfile.ZIP_DEFLATED)):
        body = _multipart(_zip(("arr_0.npy", *arr_0), ("matrix.npy", small, 0)), small)
        assert _both(body, pool) == [[matrix.tobytes()] * 2] * 2, arr_0[1]


def test_a_refused_upload_frees_its_destinations_without_the_garbage_collector(rng, pool):
    # As the route does: the error caught inside the request's task (a 400 answered), then
    # nothing may keep the destinations (pinned blocks on a GPU backend) in a cycle.
    a = rng.standard_normal((700, 700)).astype(np.float32)
    bad = bytearray(npz_bytes(a))
    bad[len(bad) // 2] ^= 1  # a CRC error, found off the loop
    live: list[int] = []

    def allocate(shape, dtype):
        array = np.empty(shape, dtype)
        live.append(1)
        weakref.finalize(array, live.pop)
        return array

    async def answer(body: bytes) -> int:
        async def chunks():
            for start in range(0, len(body), 1 << 16):
                yield body[start : start + 1 << 16]

        try:
            upload = await read_multipart(
                chunks(), content_type=f"multipart/form-data; boundary={BOUNDARY}",
                content_length=str(len(body)), max_bytes=1 << 30,
                open_file=lambda name, most: ArrayStream(name, LIMITS, allocate, most, pool),
            )  # fmt: skip
            await upload.operands()
        except ServiceError as exc:
            return exc.status_code
        return 200

    for body in (_multipart(bytes(bad), npz_bytes(a)),
                 _multipart(npz_bytes(_with_needle(a, 900_000)), npz_bytes(a))):  # fmt: skip
        gc.collect()
        gc.disable()
        try:
            assert asyncio.run(answer(body)) == 400
            assert live == []
        finally:
            gc.enable()
