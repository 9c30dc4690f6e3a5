#!/usr/bin/env bash
# On the GPU machine (see ../shared/gpu-machine/README.md): install the carried wheels (numpy
# 2.3.5 ahead of the image's 2.5, which numba-cuda kernels cannot launch under), run the numba
# gpu tests, then time the backend. Full log in $OUT/numba_check.log when OUT is set.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
log=${OUT:-/tmp}/numba_check.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import numpy, numba, numba_cuda; print("numpy", numpy.__version__, "numba", numba.__version__, "numba-cuda", numba_cuda.__version__)'
  timeout 170 python3 -m pytest -m gpu tests/gpu/test_numba_backend.py -x -q -p no:cacheprovider --durations=5
  echo "pytest exit: $?"
  timeout 100 python3 scripts/gpu_check_numba.py
} 2>&1 | tee "$log"
