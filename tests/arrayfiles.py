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
