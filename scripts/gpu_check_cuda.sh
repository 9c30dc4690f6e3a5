#!/usr/bin/env bash
# On the GPU machine (see ../shared/gpu-machine/README.md): install the carried wheels, build
# the CUDA C library, run the cuda gpu tests, time single requests, run the compute benchmark.
# Logs and bench JSON under $OUT when it is set.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader
  ls /usr/local/cuda/lib64/libcublas.so* 2>/dev/null; ldconfig -p | grep -m3 cublas
  time python3 -c 'from gpu_matrix_service.backends.cuda.build import build_kernels; print(build_kernels())'
  timeout 240 python3 -m pytest -m gpu tests/gpu/test_cuda_backend.py -q -p no:cacheprovider --durations=8 -W ignore
  echo "pytest exit: $?"
  timeout 60 python3 scripts/gpu_check_cuda.py
  timeout 200 python3 -m gpu_matrix_service.bench.compute --repeats 10 --budget 2 --json "$out/bench_compute.json" "$@"
  echo "bench exit: $?"
} 2>&1 | tee "$out/cuda_check.log"
