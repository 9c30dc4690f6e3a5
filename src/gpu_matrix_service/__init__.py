"""gpu-matrix-service: matrix operations on the GPU behind an HTTP API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpu-matrix-service")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
