#!/usr/bin/env bash
# Smoke test of a deployed gpu-matrix-service, run by every pipeline after a deploy.
#
#   scripts/smoke_test.sh URL            e.g. scripts/smoke_test.sh http://127.0.0.1:8000
#
# 1. waits for GET /health/ready to answer 200, at most SMOKE_READY_TIMEOUT seconds (default 60);
# 2. checks GET /health says {"status": "ok"};
# 3. posts examples/matrix1.npz and examples/matrix2.npz to POST /add and checks the answer:
#    matrix_shape [512, 512], a non-negative elapsed_time, a device; with SMOKE_EXPECT_DEVICE=GPU
#    (or CPU) the device must be that one, so a GPU deploy that fell back to the CPU fails.
# SMOKE_TOKEN: a bearer token, sent with every request, for a service with GMS_API_TOKENS set.
# Exits 0 when all pass, 1 otherwise (2 on bad usage). Needs bash, curl and python3 (for JSON).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 URL  (env: SMOKE_READY_TIMEOUT=seconds SMOKE_EXPECT_DEVICE=GPU|CPU SMOKE_TOKEN)" >&2
    exit 2
fi
url=${1%/}
ready_timeout=${SMOKE_READY_TIMEOUT:-60}
expect_device=${SMOKE_EXPECT_DEVICE:-}
auth=()
if [ -n "${SMOKE_TOKEN:-}" ]; then
    auth=(--header "Authorization: Bearer $SMOKE_TOKEN")
fi
examples="$(cd "$(dirname "$0")/.." && pwd)/examples"
body=$(mktemp)
trap 'rm -f "$body"' EXIT

fail() {
    echo "smoke: FAIL $*" >&2
    exit 1
}

# GET or POST (extra curl arguments after the path); the body lands in $body, the status
# code is printed ("000" when nothing answered).
request() {
    local path=$1
    shift
    curl --silent --show-error --max-time 60 --output "$body" --write-out '%{http_code}' \
        ${auth[@]+"${auth[@]}"} "$@" "$url$path" 2>/dev/null || true
}

# Checks the JSON answer in $body: `health` or `add`; prints the reason and the body on failure.
check_json() {
    local what=$1 reason
    if ! reason=$(python3 - "$what" "$body" "$expect_device" 2>&1 <<'PY'
import json, sys

what, path, expect_device = sys.argv[1:]
try:
    with open(path, encoding="utf-8") as f:
        b = json.load(f)
except ValueError:
    sys.exit("not JSON")
if what == "health" and b.get("status") != "ok":
    sys.exit(f"status {b.get('status')!r}, expected 'ok'")
if what == "add":
    if b.get("matrix_shape") != [512, 512]:
        sys.exit(f"matrix_shape {b.get('matrix_shape')!r}, expected [512, 512]")
    elapsed = b.get("elapsed_time")
    if not isinstance(elapsed, (int, float)) or elapsed < 0:
        sys.exit(f"elapsed_time {elapsed!r}, expected seconds >= 0")
    if b.get("device") not in ("GPU", "CPU"):
        sys.exit(f"device {b.get('device')!r}, expected GPU or CPU")
    if expect_device and b["device"] != expect_device:
        sys.exit(f"device {b['device']}, expected {expect_device} (SMOKE_EXPECT_DEVICE)")
PY
    ); then
        fail "$what: $reason; answer: $(head -c 500 "$body")"
    fi
}

echo "smoke: waiting up to ${ready_timeout}s for $url/health/ready"
deadline=$((SECONDS + ready_timeout))
until [ "$(request /health/ready --max-time 3)" = 200 ]; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        fail "$url/health/ready not 200 after ${ready_timeout}s"
    fi
    sleep 1
done

status=$(request /health)
[ "$status" = 200 ] || fail "GET /health answered $status"
check_json health
echo "smoke: /health ok: $(cat "$body")"

status=$(request /add -F "file_a=@$examples/matrix1.npz" -F "file_b=@$examples/matrix2.npz")
[ "$status" = 200 ] || fail "POST /add answered $status: $(head -c 500 "$body")"
check_json add
echo "smoke: /add ok: $(cat "$body")"
echo "smoke: PASS $url"
