#!/usr/bin/env bash
# HTTP end-to-end figures on a GPU machine (after scripts/gpu_session.sh install build). Every
# case alternates service and floor in 3 rounds (bench http's default):
# - two 4096x4096 uploads against the floor, twice with stored-member CRC checks (to show the
#   spread between identical runs) and once without;
# - small requests at concurrency 32 from 8 load-generator processes (4 leave the floor
#   client-bound on a 16-core machine) against 1, 2 and 4 server workers.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
bench() { python3 -m gpu_matrix_service bench http "$@"; }
bench --size 4096 --concurrency 1 --duration 12 --json "$OUT/http-4096-crc.json" --plot "$OUT/http-4096.png"
bench --size 4096 --concurrency 1 --duration 12 --json "$OUT/http-4096-crc-again.json"
GMS_VERIFY_STORED_CRC=false bench --size 4096 --concurrency 1 --duration 12 --json "$OUT/http-4096-nocrc.json"
for workers in 1 2 4; do
  bench --size 64 --concurrency 32 --clients 8 --workers "$workers" --duration 9 --json "$OUT/http-64-w$workers.json"
done
