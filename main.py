"""Start the service on $PORT (default 8000): what the lab's Dockerfile runs as ``python3 main.py``.

Equivalent to ``gpu-matrix-service serve``; every GMS_ setting applies.
"""

import sys
from pathlib import Path

try:
    import gpu_matrix_service  # noqa: F401
except ImportError:  # a plain checkout, not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

if __name__ == "__main__":
    from gpu_matrix_service.cli import app

    app(["serve"])
