"""scripts/smoke_test.sh, the check every pipeline runs after a deploy, against a real server."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from servers import REPO, LiveServer, free_port, server_env

SMOKE = REPO / "scripts" / "smoke_test.sh"

pytestmark = pytest.mark.skipif(
    not (shutil.which("bash") and shutil.which("curl")), reason="needs bash and curl"
)


def smoke(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SMOKE), url], capture_output=True, text=True, env=server_env(**env), timeout=120,
        check=False,
    )  # fmt: skip


def test_smoke_test_passes_against_a_live_server(live_server):
    done = smoke(live_server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"matrix_shape":[512,512]' in done.stdout
    assert f"smoke: PASS {live_server.url}" in done.stdout


def test_smoke_test_fails_quickly_when_nothing_listens():
    started = time.monotonic()
    done = smoke(f"http://127.0.0.1:{free_port()}", SMOKE_READY_TIMEOUT="2")
    assert done.returncode == 1
    assert "not 200 after 2s" in done.stderr
    assert time.monotonic() - started < 15


def test_smoke_test_fails_when_a_gpu_deploy_computes_on_the_cpu(live_server):
    done = smoke(live_server.url, SMOKE_EXPECT_DEVICE="GPU")
    assert done.returncode == 1
    assert "device CPU, expected GPU" in done.stderr


def test_smoke_test_sends_the_bearer_token_to_a_service_that_wants_one():
    port = free_port()
    args = [sys.executable, "-m", "gpu_matrix_service", "serve", "--port", str(port)]
    env = server_env(GMS_BACKEND="cpu", GMS_LOG_LEVEL="warning", GMS_API_TOKENS="s3cret")
    server = LiveServer(args, env, port)
    try:
        server.wait_ready()
        refused = smoke(server.url)
        assert refused.returncode == 1 and "POST /add answered 401" in refused.stderr
        accepted = smoke(server.url, SMOKE_TOKEN="s3cret")
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    finally:
        server.stop()


def test_smoke_test_without_a_url_is_a_usage_error():
    done = subprocess.run([str(SMOKE)], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "usage:" in done.stderr
