#!/usr/bin/env bash
# Runs `gpu-matrix-service doctor` for real on a GPU machine, in every output format, and keeps
# the outputs for docs/doctor.md ("Real GPU run"):
#
#   scripts/doctor_gpu_run.sh [more doctor options, e.g. --require-gpu]
#
# Outputs go under $OUT when it is set (else $TMPDIR/doctor-run): doctor.txt (the table),
# doctor.json, status.txt, tags.txt, gres.conf, labels.txt, nvidia-smi.txt, stderr.log and
# exit_codes.txt. Where the FastAPI stack is missing (the offline GPU image, see
# ../shared/gpu-machine/README.md), the wheels carried in .whl/ are installed first.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

if [ -d .whl ] && ! python3 -c 'import fastapi' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
out=${OUT:-${TMPDIR:-/tmp}/doctor-run}
mkdir -p "$out"
: >"$out/exit_codes.txt"
limit=${DOCTOR_TIMEOUT_S:-300}

# run FILE ARGS...: one doctor run, stdout to FILE, exit code noted; returns that exit code.
run() {
    local file=$1
    shift
    local started=$SECONDS
    timeout "$limit" python3 -m gpu_matrix_service doctor "$@" >"$out/$file" 2>>"$out/stderr.log"
    local code=$?
    printf 'doctor %s\texit %s\t%ss\n' "$*" "$code" "$((SECONDS - started))" >>"$out/exit_codes.txt"
    printf '== gpu-matrix-service doctor %s (exit %s, %ss)\n' "$*" "$code" "$((SECONDS - started))"
    cat "$out/$file"
    return "$code"
}

{ nvidia-smi -L; nvidia-smi; } >"$out/nvidia-smi.txt" 2>&1
run doctor.txt "$@"
status=$?
run doctor.json --json "$@"
python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["status"])' \
    "$out/doctor.json" >"$out/status.txt" 2>>"$out/stderr.log"
run tags.txt --format tags "$@"
run gres.conf --format gres "$@"
run labels.txt --format labels "$@"
run quick_require_gpu.txt --quick --require-gpu --format status "$@"
echo "== exit codes"
cat "$out/exit_codes.txt"
exit "$status"
