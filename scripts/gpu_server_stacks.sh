#!/usr/bin/env bash
# The service and its receive-only floor on two server stacks, one bench http run each:
# uvicorn (httptools + uvloop, what `serve` runs; bench http starts both itself) and granian
# (Rust HTTP, ASGI interface; started here, bench http pointed at it). Same machine, same load:
# two 4096x4096 uploads at concurrency 1, and 64x64 at concurrency 32 from 8 client processes.
# Needs granian importable (pip install granian; not a dependency of the service).
#   OUT=gpu-out scripts/gpu_server_stacks.sh
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
bench() { python3 -m gpu_matrix_service bench http --duration "${DURATION:-6}" "$@"; }
wait_ready() {
  for _ in $(seq 120); do
    python3 -c "import httpx,sys; sys.exit(httpx.get('$1/health/ready').status_code != 200)" 2>/dev/null && return 0
    sleep 0.5
  done
  return 1
}

bench --size 4096 --concurrency 1 --json "$OUT/uvicorn-4096.json"
bench --size 64 --concurrency 32 --clients 8 --json "$OUT/uvicorn-64.json"

granian() {
  python3 -m granian --interface asgi --factory --host 127.0.0.1 --port "$1" \
    --log-level warning "$2" > "$OUT/granian-$1.log" 2>&1 &
}
granian 9701 gpu_matrix_service.app:create_app; service=$!
granian 9702 gpu_matrix_service.bench.floor:create_floor_app; floor=$!
if wait_ready http://127.0.0.1:9701 && wait_ready http://127.0.0.1:9702; then
  urls=(--url http://127.0.0.1:9701 --floor-url http://127.0.0.1:9702)
  bench "${urls[@]}" --size 4096 --concurrency 1 --json "$OUT/granian-4096.json"
  bench "${urls[@]}" --size 64 --concurrency 32 --clients 8 --json "$OUT/granian-64.json"
else
  echo "granian did not become ready; see $OUT/granian-*.log"
fi
kill -TERM "$service" "$floor"; wait
