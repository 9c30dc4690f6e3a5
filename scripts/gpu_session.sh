#!/usr/bin/env bash
# One GPU-machine session: build the CUDA library, run every GPU test, benchmark compute and
# HTTP, smoke-test a served instance, run doctor. Logs and JSON are gathered in one archive,
# $OUT/gpu-session.tgz ($OUT defaults to ./gpu-out).
#   ../shared/gpu-machine/wheels.sh fastapi uvicorn python-multipart pydantic-settings httptools zlib-ng orjson "numpy==2.3.5"
#   then on the GPU machine, from the repository root: scripts/gpu_session.sh [steps...]
# Steps (default all): install build tests bench-compute bench-http smoke doctor
set -uo pipefail
ARCHIVE_DIR=${OUT:-$PWD/gpu-out}
OUT=$(mktemp -d); mkdir -p "$ARCHIVE_DIR"
trap 'tar czf "$ARCHIVE_DIR/gpu-session.tgz" -C "$OUT" .' EXIT
export PYTHONUNBUFFERED=1 NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0
steps=${*:-install build tests bench-compute bench-http smoke doctor}
run() { echo "== $1"; shift; "$@" 2>&1 | tee -a "$OUT/session.log"; return "${PIPESTATUS[0]}"; }
status=0
for step in $steps; do
  case $step in
    install)
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
      export PYTHONPATH=/tmp/site:$PWD/src:${PYTHONPATH:-}
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt" ;;
    build) run build python3 -m gpu_matrix_service build-kernels || status=1 ;;
    tests) run tests python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -W ignore::DeprecationWarning --junitxml="$OUT/gpu-tests.xml" || status=1 ;;
    bench-compute) run bench-compute timeout 240 python3 -m gpu_matrix_service bench compute --repeats 10 --budget 2 --json "$OUT/bench-compute.json" || status=1 ;;
    bench-http)
      run bench-http python3 -m gpu_matrix_service bench http --size 64 --size 4096 --concurrency 1 --concurrency 32 --duration 6 --json "$OUT/bench-http.json" || status=1
      run bench-http-4w python3 -m gpu_matrix_service bench http --size 64 --concurrency 32 --duration 6 --workers 4 --json "$OUT/bench-http-4w.json" || status=1 ;;
    smoke)
      python3 -m gpu_matrix_service serve --port 8765 --log-level warning > "$OUT/serve.log" 2>&1 &
      pid=$!
      SMOKE_EXPECT_DEVICE=GPU run smoke bash scripts/smoke_test.sh http://127.0.0.1:8765 || status=1
      curl -s http://127.0.0.1:8765/health > "$OUT/health.json"; curl -s http://127.0.0.1:8765/gpu-info > "$OUT/gpu-info.json"
      kill -TERM $pid; wait $pid; echo "serve exit $?" | tee -a "$OUT/session.log" ;;
    doctor) mkdir -p "$OUT/doctor"; OUT=$OUT/doctor run doctor bash scripts/doctor_gpu_run.sh --require-gpu || status=1 ;;
  esac
done
exit $status
