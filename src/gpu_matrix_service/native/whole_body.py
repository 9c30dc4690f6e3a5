"""The native reader of small uploads that arrived whole: ``whole_body.c`` through ctypes.

``gms_whole_body_layout`` finds in one call what :func:`~gpu_matrix_service.whole_body.
split_whole_body`, the part header regex and :func:`~gpu_matrix_service.zip_records.
decode_in_one_piece` find in about a dozen Python steps: where each of the two files' names
and ``.npy`` bytes are, and the CRC-32 a stored ``.npz`` member declares. Python still checks
the CRC (zlib-ng), parses the ``.npy`` header (remembered per header) and copies the data.
It only succeeds or declines, so every error comes from the Python readers.

The library is built with the C compiler at hand (``cc``) when the package has none, into
the user cache keyed by the source's hash, as the CUDA library is; without a compiler the
Python readers read everything.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import shutil
import threading
from pathlib import Path
from typing import Final

from gpu_matrix_service.native import build_atomically, user_cache_dir

log = logging.getLogger(__name__)

SOURCE: Final = Path(__file__).resolve().parent / "whole_body.c"
LIBRARY_NAME: Final = "libgms_whole_body.so"
ABI_VERSION: Final = 2
# Per part (whole_body.c says more): name, file name, content type as (start, end) offsets; the
# .npy file's start, its header text's start, the data's start, the file's end; the stored
# member's CRC-32 (-1: none); 1 for a UTF-8 header.
PART_INTS: Final = 12
LAYOUT_INTS: Final = 2 * PART_INTS
C_FLAGS: Final = ("-O2", "-std=c11", "-shared", "-fPIC", "-fvisibility=hidden")


class NativeBuildError(RuntimeError):
    """No C compiler, or it failed; the message carries its output."""


def find_c_compiler() -> str | None:
    """``cc``, ``gcc`` or ``clang`` from PATH, else None."""
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found is not None:
            return found
    return None


def source_digest() -> str:
    """A short hash of ``whole_body.c``: names a build of exactly this source."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def build_whole_body_library(output_dir: Path | None = None, compiler: str | None = None) -> Path:
    """Compile ``whole_body.c`` into ``output_dir/libgms_whole_body.so`` (the package
    directory by default) and return its path; replaced atomically, as the CUDA library is."""
    compiler = compiler or find_c_compiler()
    if compiler is None:
        raise NativeBuildError("no C compiler (cc, gcc or clang) on PATH")
    output_dir = Path(output_dir) if output_dir is not None else SOURCE.parent
    return build_atomically(
        output_dir / LIBRARY_NAME,
        lambda partial: [compiler, *C_FLAGS, "-o", str(partial), str(SOURCE)],
        NativeBuildError,
    )


def locate_whole_body_library() -> Path | None:
    """The library to load: the package's, else one built from this source in the user
    cache (building it there first when a C compiler is at hand), else None."""
    packaged = SOURCE.parent / LIBRARY_NAME
    if packaged.is_file():
        return packaged
    try:
        cached = user_cache_dir() / f"whole-body-{source_digest()}" / LIBRARY_NAME
        if cached.is_file():
            return cached
        return build_whole_body_library(cached.parent)
    except (NativeBuildError, OSError, RuntimeError) as exc:  # no compiler, no writable home
        log.info("small uploads are read in Python: the native reader is not built (%s)", exc)
        return None


class WholeBodyLayout:
    """``layout(body, boundary)``: the offsets ``gms_whole_body_layout`` finds (see
    ``whole_body.c``), or None when it declines the body."""

    def __init__(self, path: Path, max_header_bytes: int, most_npy_header_bytes: int) -> None:
        self._lib = ctypes.CDLL(str(path))
        if self._lib.gms_whole_body_abi() != ABI_VERSION:
            raise NativeBuildError(f"{path} has another ABI than {ABI_VERSION}; rebuild it")
        function = self._lib.gms_whole_body_layout
        size = ctypes.c_size_t
        function.argtypes = [ctypes.c_char_p, size, ctypes.c_char_p, size, size, size,
                             ctypes.POINTER(ctypes.c_int64)]  # fmt: skip
        function.restype = ctypes.c_int
        self._layout = function
        self._limits = (max_header_bytes, most_npy_header_bytes)
        self._buffers = threading.local()
        self.path = path

    def __call__(self, body: bytes, boundary: bytes) -> list[int] | None:
        out = getattr(self._buffers, "out", None)
        if out is None:
            out = self._buffers.out = (ctypes.c_int64 * LAYOUT_INTS)()
        found = self._layout(body, len(body), boundary, len(boundary), *self._limits, out)
        return out[:] if found else None


def load_whole_body_layout(
    max_header_bytes: int, most_npy_header_bytes: int
) -> WholeBodyLayout | None:
    """The native reader, built if need be; None when it cannot be built or loaded.
    ``max_header_bytes``: the window a part's header block is looked for in (uploads');
    ``most_npy_header_bytes``: the longest ``.npy`` header read (arrays')."""
    path = locate_whole_body_library()
    if path is None:
        return None
    try:
        return WholeBodyLayout(path, max_header_bytes, most_npy_header_bytes)
    except (OSError, AttributeError, NativeBuildError) as exc:
        log.warning("small uploads are read in Python: cannot load %s (%s)", path, exc)
        return None
