"""The service on a real Ray cluster: Ray Serve replicas behind Serve's HTTP proxy.

A single-node cluster starts on the CPU (``ray start --head``), the app is deployed with two
replicas and ``num_gpus: 0``, requests go through the proxy, and the answers and the
replica-labelled metrics show that both replicas served. Ray is an optional extra: without it
these tests skip, except in CI (``CI`` set), where a missing Ray is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gpu_matrix_service.settings import Settings

from arrayfiles import npz_bytes
from servers import REPO, free_port, server_env

# Under `uv run` (as CI runs pytest), Ray would start every worker through `uv run` in an
# uploaded copy of the checkout. The cluster here runs from this environment already.
os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
try:
    import ray
    from ray import serve
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema
except ImportError:
    if os.environ.get("CI"):
        raise  # CI installs the dev group, Ray included: its absence is a broken setup
    pytest.skip("Ray Serve is not installed (pip install ray[serve])", allow_module_level=True)

from gpu_matrix_service.engines.ray_serve import (
    APP_NAME,
    DEPLOYMENT_NAME,
    ReplicaPlan,
    app_builder,
    deploy_on_ray,
    replica_gpus,
    wait_for_replicas,
)

SERVE_CONFIG = REPO / "deploy" / "ray" / "serve.yaml"
OPS_ENDPOINT = "/v1/ops/{op}"


class RayHead:
    """``ray start --head --block`` on loopback, in a temp dir of its own; SIGTERM stops it."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Short: Ray puts unix sockets under it, and their paths are limited to 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="gmsray", dir="/tmp")
        ray_cli = Path(sys.executable).with_name("ray")
        args = [
            str(ray_cli) if ray_cli.exists() else shutil.which("ray") or "ray",
            "start", "--head", "--block", "--disable-usage-stats",
            f"--port={self.port}", "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
            # Two replicas of half a CPU fit a two-core CI machine with room to spare.
            "--num-cpus=2", "--num-gpus=0", "--object-store-memory=100000000",
        ]  # fmt: skip
        self.log = log_path.open("w")
        self.process = subprocess.Popen(
            args, env=server_env(), stdout=self.log, stderr=subprocess.STDOUT
        )

    def connect(self, timeout: float = 90.0) -> None:
        """Attach this test process as a Ray driver once the head answers."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}")
            try:
                ray.init(address=self.address, logging_level="WARNING")
                return
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    # Ray 2.59+ turns token authentication on for local clusters when ~/.ray/auth_token
    # exists; one left there by an earlier ray.init() made this driver fail to connect
    # (InvalidAuthToken), and so did a token of our own through RAY_AUTH_TOKEN or
    # RAY_AUTH_TOKEN_PATH (Ray 2.60). The cluster listens on loopback only, for this test:
    # authentication off, in the environment the head, this driver and `serve` inherit.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        head = RayHead(tmp_path_factory.mktemp("ray") / "ray-start.log")
        try:
            head.connect()
            yield head
        finally:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
            head.stop()


@pytest.fixture(scope="module")
def proxy_port() -> int:
    """Serve keeps the HTTP options of its first start: every test here uses this port."""
    return free_port()


def cpu_settings(port: int) -> Settings:
    return Settings(backend="cpu", host="127.0.0.1", port=port, compute_threads=2, _env_file=None)


def post_op(url: str, op: str, a: np.ndarray, b: np.ndarray) -> dict:
    files = {"a": ("a.npz", npz_bytes(a)), "b": ("b.npz", npz_bytes(b))}
    response = httpx.post(f"{url}/v1/ops/{op}?result=json", files=files, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def scrape_replica(url: str) -> tuple[str, dict[str, float]]:
    """One /metrics scrape through the proxy (it reaches one replica): that replica's id, its
    requests to the ops endpoint and its service_info instance."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    seen: dict[str, float] = {}
    replica = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            replica = sample.labels.get("replica", replica)
            if sample.name == "request_count_total" and sample.labels["endpoint"] == OPS_ENDPOINT:
                seen["ops_requests"] = seen.get("ops_requests", 0) + sample.value
            if sample.name == "service_info":
                seen["instance:" + sample.labels["instance"]] = sample.value
    assert replica, "a replica's metrics must carry the replica label"
    return replica, seen


def replica_views(url: str, replicas: int, deadline: float) -> dict[str, dict[str, float]]:
    """Scrape, several at a time so the router spreads them, until every replica answered
    (or the deadline passes); the latest view of each replica."""
    views: dict[str, dict[str, float]] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        while len(views) < replicas and time.monotonic() < deadline:
            views.update(pool.map(lambda _: scrape_replica(url), range(16)))
    return views


def test_two_replicas_on_the_cpu_answer_through_the_serve_proxy(ray_head: RayHead, proxy_port: int):
    plan = ReplicaPlan(replicas=2, num_gpus=0, num_cpus=0.5)
    url = deploy_on_ray(cpu_settings(proxy_port), plan, address=ray_head.address)
    wait_for_replicas(2)
    rng = np.random.default_rng(7)
    sent = 0
    deadline = time.monotonic() + 90
    served: dict[str, float] = {}
    # Rounds of concurrent requests until both replicas have served (bounded in rounds and
    # time); every answer is checked against NumPy.
    for _ in range(10):
        cases = []
        for i in range(24):
            a, b = rng.standard_normal((16, 8)), rng.standard_normal((16, 8))
            cases.append(("add", a, b) if i % 2 else ("matmul", a, b.T.copy()))
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda case: post_op(url, *case), cases))
        for (op, a, b), answer in zip(cases, answers, strict=True):
            expected = np.add(a, b) if op == "add" else a @ b
            assert answer["op"] == op and answer["backend"] == "cpu"
            assert answer["matrix_shape"] == list(expected.shape)
            np.testing.assert_allclose(np.array(answer["result"]), expected, rtol=1e-12)
        sent += len(cases)
        views = replica_views(url, 2, deadline)
        served = {replica: view.get("ops_requests", 0) for replica, view in views.items()}
        if len(served) == 2 and all(count > 0 for count in served.values()):
            break
    assert len(views) == 2, f"expected both replicas in the metrics, saw {sorted(views)}"
    assert all(count > 0 for count in served.values()), f"a replica served nothing: {served}"
    assert sum(served.values()) == sent
    for replica, view in views.items():
        assert view[f"instance:{DEPLOYMENT_NAME}#{replica}"] == 1
    # Both replicas answer replica_gpus too; on the CPU neither holds GPU memory.
    assert replica_gpus(url, replicas=2) == {replica: set() for replica in views}
    serve.delete(APP_NAME)


def test_serve_command_with_the_ray_engine_deploys_and_stops_cleanly(
    ray_head: RayHead, proxy_port: int, tmp_path: Path
):
    args = [
        sys.executable, "-m", "gpu_matrix_service", "serve", "--engine", "ray",
        "--ray-address", ray_head.address, "--replicas", "2", "--num-gpus", "0",
        "--num-cpus", "0.5", "--port", str(proxy_port),
    ]  # fmt: skip
    log = (tmp_path / "serve.log").open("w+")
    process = subprocess.Popen(
        args,
        env=server_env(GMS_BACKEND="cpu", PYTHONUNBUFFERED="1"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{proxy_port}"
    try:
        deadline = time.monotonic() + 90
        while "on Ray Serve at" not in _tail(log) or not _ready(url):
            assert process.poll() is None, _tail(log)
            assert time.monotonic() < deadline, "the Serve app never became ready\n" + _tail(log)
            time.sleep(1)
        a = np.arange(6.0).reshape(2, 3)
        assert post_op(url, "add", a, a)["result"] == (2 * a).tolist()
    finally:
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=60)
    assert returncode == 0, _tail(log)
    assert APP_NAME not in serve.status().applications


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _tail(log: IO[str]) -> str:
    log.seek(0)
    return log.read()[-4000:]


def test_serve_config_is_valid_and_builds_the_application():
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(config)
    (application,) = schema.applications
    assert application.import_path == "gpu_matrix_service.engines.ray_serve:app_builder"
    (deployment,) = application.deployments
    assert deployment.name == DEPLOYMENT_NAME
    assert deployment.ray_actor_options.num_gpus == 1
    scaling = config["applications"][0]["deployments"][0]["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]
    assert isinstance(app_builder(application.args), Application)


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        (ReplicaPlan(), {"num_replicas": 1}),
        (ReplicaPlan(replicas=3, num_gpus=0.5), {"num_replicas": 3}),
        (
            ReplicaPlan(min_replicas=1, max_replicas=4, target_ongoing_requests=3),
            {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4,
                                    "target_ongoing_requests": 3}},
        ),
    ],
)  # fmt: skip
def test_replica_plan_becomes_serve_deployment_options(plan: ReplicaPlan, expected: dict):
    settings = Settings(compute_threads=4, max_queued=16, _env_file=None)
    options = plan.deployment_options(settings)
    assert {k: options[k] for k in expected} == expected
    assert ("num_replicas" in options) != ("autoscaling_config" in options)
    assert options["ray_actor_options"] == {"num_gpus": plan.num_gpus, "num_cpus": 1.0}
    assert options["max_ongoing_requests"] == 20


def gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 2, reason="needs a machine with two GPUs")
def test_two_gpu_replicas_land_on_different_gpus(proxy_port: int):
    """Documented proof for a 2-GPU machine: one replica per GPU, none sharing."""
    ray.init(num_gpus=2, logging_level="WARNING")
    try:
        settings = Settings(backend="auto", port=proxy_port, _env_file=None)
        url = deploy_on_ray(settings, ReplicaPlan(replicas=2, num_gpus=1), address=None)
        wait_for_replicas(2)
        a = np.ones((2048, 2048), dtype=np.float32)
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda _: post_op_summary(url, a), range(16)))
        assert {answer["device"] for answer in answers} == {"GPU"}
        gpus_by_replica = replica_gpus(url, replicas=2)
        assert len(gpus_by_replica) == 2, gpus_by_replica
        first, second = gpus_by_replica.values()
        assert len(first) == len(second) == 1 and first != second, gpus_by_replica
    finally:
        serve.shutdown()
        ray.shutdown()


def post_op_summary(url: str, a: np.ndarray) -> dict:
    files = {"a": ("a.npz", npz_bytes(a)), "b": ("b.npz", npz_bytes(a))}
    response = httpx.post(f"{url}/v1/ops/matmul", files=files, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()
