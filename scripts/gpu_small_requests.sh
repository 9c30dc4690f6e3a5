#!/usr/bin/env bash
# Small requests on a GPU machine, before against after, alternating on one machine:
#   scripts/gpu_small_requests.sh BASE_REF [PAIRS]
# BASE_REF (a git ref, or a directory holding that tree's src/ where the copy has no .git) and
# this tree each build their CUDA library and native reader, then `bench http` (64x64 add,
# concurrency 32, 8 load-generator processes, CUDA C backend, default settings) runs PAIRS
# times for each, alternating; then once more for this tree with launching on
# (GMS_LAUNCH_TINY=true), and the in-process stage costs of both trees
# (scripts/request_cost.py). Run tests/gpu first. Needs the wheels of
# ../shared/gpu-machine/README.md installed into /tmp/site. JSON, logs and a plot land in $OUT
# (default ./gpu-out).
set -uo pipefail
base_ref=${1:?usage: scripts/gpu_small_requests.sh BASE_REF [PAIRS]}
pairs=${2:-2}
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
if [ -d "$base_ref" ]; then
  base=$(cd "$base_ref" && pwd); keep_base=1
else
  base=$(mktemp -d); keep_base=0
  git archive "$base_ref" src scripts | tar -x -C "$base" || exit 1
fi
build() { (cd "$1" && PYTHONPATH=/tmp/site:$1/src python3 -m gpu_matrix_service build-kernels --arch 90 \
           && PYTHONPATH=/tmp/site:$1/src python3 -m gpu_matrix_service build-native) >/dev/null 2>&1; }
build "$base"; build "$PWD"
summary() {
  python3 - "$1" "$2" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
runs = " ".join(f"{r['target']} {r['rps']:.0f}/s p50 {r['p50_s'] * 1e3:.1f} ms errors {r['errors']}"
                for r in data["results"])
print(sys.argv[2], runs, "rate ratio", [round(x["rate_ratio"], 2) for x in data["ratios"]])
PY
}
bench() {
  local tree=$1 label=$2; shift 2
  PYTHONPATH=/tmp/site:$tree/src timeout 150 python3 -m gpu_matrix_service bench http --backend cuda \
    --size 64 --concurrency 32 --clients 8 --duration 6 --rounds 2 --json "$OUT/$label.json" "$@" \
    > "$OUT/$label.log" 2>&1
  summary "$OUT/$label.json" "$label" || tail -3 "$OUT/$label.log"
}
for i in $(seq 1 "$pairs"); do
  bench "$base" "before-$i"
  bench "$PWD" "after-$i" --plot "$OUT/http-64-after-$i.png"
done
GMS_LAUNCH_TINY=true bench "$PWD" after-launch
for tree in "$base" "$PWD"; do
  echo "in process, $tree:"
  PYTHONPATH=/tmp/site:$tree/src timeout 120 python3 "$tree/scripts/request_cost.py" \
    --backend cuda --uvloop --stages --essentials 2>&1 | tail -1
done
[ "$keep_base" = 1 ] || rm -rf "$base"
