"""Array files as clients send them, and random test data."""

from __future__ import annotations

import io

import numpy as np


def npz_bytes(*arrays: np.ndarray, **named: np.ndarray) -> bytes:
    """An .npz file as numpy.savez writes it."""
    buffer = io.BytesIO()
    np.savez(buffer, *arrays, **named)
    return buffer.getvalue()


def npz_compressed_bytes(**named: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **named)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def unseekable_npz(**arrays: np.ndarray) -> bytes:
    """An .npz written through a pipe-like file: sizes in data descriptors after each member."""

    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            self.data += b
            return len(b)

    pipe = Pipe()
    np.savez(pipe, **arrays)
    return bytes(pipe.data)


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Random values of a dtype, never all zeros, small enough that int products don't wrap."""
    kind = np.dtype(dtype).kind
    if kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if kind in "iu":
        return rng.integers(1, 100, size=shape).astype(dtype)
    if kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def array_file_cases(rng: np.random.Generator) -> dict[str, bytes]:
    """One small array in each layout a decoder meets, by label: bare, Fortran-ordered and
    big-endian .npy; stored, deflated, several-member and data-descriptor .npz; an empty one."""
    a = rng.standard_normal((37, 29)).astype(np.float32)
    return {
        "npy": npy_bytes(a),
        "npy fortran": npy_bytes(np.asfortranarray(a)),
        "npy big-endian": npy_bytes(a.astype(">f8")),
        "npz": npz_bytes(a),
        "npz compressed": npz_compressed_bytes(m=a),
        "npz several, matrix last": npz_bytes(a * 2, x=a, matrix=a + 1),
        "npz several, arr_0 first": npz_bytes(a, a + 1),
        "npz data descriptors": unseekable_npz(only=a),
        "npz int64 3-D": npz_bytes(rng.integers(0, 9, (3, 4, 5))),
        "npy empty": npy_bytes(np.empty((0, 4))),
    }
