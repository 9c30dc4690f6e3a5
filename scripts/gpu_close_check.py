"""Build one backend on every GPU, compute, close, exit: a crash here is a cleanup bug.

PYTHONPATH=src python3 -X faulthandler scripts/gpu_close_check.py cuda|numba [devices]
"""

from __future__ import annotations

import sys

import numpy as np

from gpu_matrix_service.backends.base import RunOptions
from gpu_matrix_service.backends.registry import create_backend
from gpu_matrix_service.ops import get_op
from gpu_matrix_service.settings import Settings

name = sys.argv[1]
devices = sys.argv[2] if len(sys.argv) > 2 else None
backend = create_backend(name, Settings(backend=name, devices=devices, _env_file=None))
print(name, [d.name for d in backend.devices()], flush=True)
a = np.ones((512, 512), np.float32)
for _ in range(4):
    result = backend.run(get_op("add"), a, a, RunOptions())
    print(result.device_name, float(result.array.sum()), flush=True)
del result
backend.close()
print("closed", flush=True)
