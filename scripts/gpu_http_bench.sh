#!/usr/bin/env bash
# HTTP end-to-end figures on a GPU machine (after scripts/gpu_session.sh install build):
# the large upload against the floor with and without stored-member CRC checks, and small
# requests from 4 load-generator processes against 1 and 4 server workers.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
bench() { python3 -m gpu_matrix_service bench http "$@"; }
bench --size 4096 --concurrency 1 --duration 8 --json "$OUT/http-4096-crc.json" --plot "$OUT/http-4096.png"
GMS_VERIFY_STORED_CRC=false bench --size 4096 --concurrency 1 --duration 8 --json "$OUT/http-4096-nocrc.json"
for workers in 1 4; do
  bench --size 64 --concurrency 32 --clients 4 --workers "$workers" --duration 6 --json "$OUT/http-64-w$workers.json"
done
