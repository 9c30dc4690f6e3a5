"""The service's FastAPI app as a Ray Serve deployment: many replicas, on many GPUs and nodes.

Each replica builds the app with :func:`gpu_matrix_service.app.create_app`, inside the replica
(Serve's FastAPI ingress with a builder function), so every replica owns its compute service,
backend, threads and NVML session exactly as a uvicorn process does; the lifespan runs at
replica start and stop. Ray gives each replica ``num_gpus`` of a GPU (fractions share one) and
sets its ``CUDA_VISIBLE_DEVICES``, so the backend's "every visible GPU" means "the replica's
GPU". Serve's HTTP proxy balances requests over the replicas and autoscales them on ongoing
requests.

Metrics: each replica keeps the service's own prometheus-client registry, and every series it
exports carries ``application``, ``deployment`` and ``replica`` labels (the tag names of Ray
Serve's built-in ``ray_serve_*`` metrics, so the two join); ``service_info``'s ``instance`` is
the replica's id. A scrape through the proxy reaches one replica at a time, and the labels keep
each replica's counters apart instead of mixing them into one jumping series.

Three ways in: ``gpu-matrix-service serve --engine ray`` (:func:`serve_with_ray`),
``serve deploy deploy/ray/serve.yaml`` (:func:`app_builder`) and tests
(:func:`deploy_on_ray`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from rich.console import Console

from gpu_matrix_service.app import create_app
from gpu_matrix_service.engines import EngineUnavailable
from gpu_matrix_service.metrics import ServiceMetrics
from gpu_matrix_service.settings import Settings

try:
    import ray
    from ray import serve
    from ray.serve.deployment import Application
except ImportError as exc:  # only this engine needs Ray; the single-machine path never does
    raise EngineUnavailable(
        f"the Ray engine needs Ray Serve ({exc}); install it with "
        "pip install 'gpu-matrix-service[ray]'"
    ) from exc

APP_NAME: Final = "gpu-matrix-service"
DEPLOYMENT_NAME: Final = "GpuMatrixService"


@dataclass(frozen=True)
class ReplicaPlan:
    """How many replicas, and what each one holds.

    ``num_gpus`` and ``num_cpus`` are Ray resources per replica (fractions allowed: two
    replicas of ``num_gpus=0.5`` share one GPU). With ``min_replicas``/``max_replicas`` set,
    Serve autoscales between them, aiming at ``target_ongoing_requests`` per replica (Ray's
    default when None); otherwise it runs ``replicas`` fixed replicas.
    """

    replicas: int = 1
    num_gpus: float = 1.0
    num_cpus: float = 1.0
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None

    @property
    def autoscaling(self) -> bool:
        """Whether Serve scales the replica count instead of holding ``replicas``."""
        return self.min_replicas is not None or self.max_replicas is not None

    def deployment_options(self, settings: Settings) -> dict[str, Any]:
        """Keyword arguments for ``serve.deployment``: resources, replica count or autoscaling."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus},
            # The replica admits compute_threads + max_queued requests and answers 503 beyond;
            # sending it more than that only turns Serve's queueing into refusals.
            "max_ongoing_requests": settings.compute_threads + settings.max_queued,
            "graceful_shutdown_timeout_s": settings.shutdown_timeout_seconds,
        }
        if self.autoscaling:
            min_replicas = self.min_replicas if self.min_replicas is not None else 1
            autoscaling: dict[str, Any] = {
                "min_replicas": min_replicas,
                "max_replicas": max(self.max_replicas or self.replicas, min_replicas),
            }
            if self.target_ongoing_requests is not None:
                autoscaling["target_ongoing_requests"] = self.target_ongoing_requests
            options["autoscaling_config"] = autoscaling
        else:
            options["num_replicas"] = self.replicas
        return options


class ConstantLabels:
    """A registry seen with extra labels on every sample (the replica's identity).

    Stands in for :class:`ServiceMetrics`' registry: registrations go through to the real
    one, and :meth:`collect`, which the exposition reads, adds the labels.
    """

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self.registry = registry
        self.labels = labels

    def register(self, collector: Collector) -> None:
        """Register ``collector`` in the underlying registry."""
        self.registry.register(collector)

    def unregister(self, collector: Collector) -> None:
        """Unregister ``collector`` from the underlying registry."""
        self.registry.unregister(collector)

    def collect(self) -> Iterator[Any]:
        """Every family of the registry, its samples with the constant labels added."""
        for family in self.registry.collect():
            family.samples = [
                sample._replace(labels={**sample.labels, **self.labels})
                for sample in family.samples
            ]
            yield family


def label_every_series(metrics: ServiceMetrics, labels: dict[str, str]) -> None:
    """Make every series ``metrics`` exports carry ``labels`` (one process per replica)."""
    metrics.registry = ConstantLabels(metrics.registry, labels)  # type: ignore[assignment]


def replica_settings(settings: Settings, instance: str, gpus_assigned: bool) -> Settings:
    """The settings one replica runs with.

    One process per replica: no server workers, no multiprocess metrics directory. When Ray
    assigned GPUs it also set ``CUDA_VISIBLE_DEVICES``, so ordinals from ``GMS_DEVICES``
    would name the wrong devices: the replica uses what Ray gave it.
    """
    update: dict[str, Any] = {"instance": instance, "workers": 1, "metrics_dir": None}
    if gpus_assigned:
        update["devices"] = None
    return settings.model_copy(update=update)


def build_replica_app(settings: Settings) -> FastAPI:
    """The service's app for the replica this runs in, labelled with the replica's id."""
    context = serve.get_replica_context()
    labels = {
        "application": context.app_name,
        "deployment": context.deployment,
        "replica": context.replica_tag,
    }
    instance = f"{context.deployment}#{context.replica_tag}"
    app = create_app(replica_settings(settings, instance, gpus_assigned=bool(ray.get_gpu_ids())))
    label_every_series(app.state.metrics, labels)
    return app


class ReplicaIngress:
    """The deployment's class: Serve wraps it with the replica's ASGI app and adds nothing."""


def build_application(settings: Settings, plan: ReplicaPlan) -> Application:
    """The Serve application: one deployment whose FastAPI ingress is the service's app."""

    def asgi_app() -> FastAPI:
        # Runs in each replica (Serve calls ingress builder functions at replica start), so
        # the app's resources are created where they are used; ``settings`` travels pickled.
        return build_replica_app(settings)

    ingress = serve.ingress(asgi_app)(ReplicaIngress)
    deployment = serve.deployment(
        ingress, name=DEPLOYMENT_NAME, **plan.deployment_options(settings)
    )
    return deployment.bind()


def app_builder(args: dict[str, Any]) -> Application:
    """Application builder for ``import_path`` in a Serve config (``deploy/ray/serve.yaml``).

    ``args`` are :class:`Settings` fields (``backend: cuda``, ``compute_threads: 8``...), on
    top of the ``GMS_`` variables of the application's ``runtime_env``. Replica count,
    resources and autoscaling belong in the config's ``deployments`` section, which
    overrides the one-replica, one-GPU default here.
    """
    return build_application(Settings(**args), ReplicaPlan())


def deploy_on_ray(settings: Settings, plan: ReplicaPlan, address: str | None = None) -> str:
    """Connect to Ray, run the application, and return the Serve proxy's URL.

    ``address``: ``"auto"`` (a cluster running on this node), ``"HOST:PORT"`` of a head
    node, ``"ray://HOST:10001"`` (Ray Client), or None to use ``RAY_ADDRESS`` or a running
    local cluster, else start one. The proxy listens on ``settings.host``:``settings.port``;
    Serve keeps the first HTTP options a cluster was started with. Returns once every
    replica is ready.
    """
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(settings, plan), name=APP_NAME, route_prefix="/")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def wait_for_replicas(count: int, timeout: float = 180) -> None:
    """Until Serve reports exactly ``count`` replicas of the deployment RUNNING and the
    deployment HEALTHY (after a scale up or down too); :class:`TimeoutError` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    running = 0
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        deployment = app and app.deployments.get(DEPLOYMENT_NAME)
        running = deployment.replica_states.get("RUNNING", 0) if deployment else 0
        if running == count and deployment.status == "HEALTHY":
            return
        time.sleep(0.5)
    raise TimeoutError(f"{running} of {count} replicas running after {timeout} s")


def replica_gpus(url: str, replicas: int, timeout: float = 60) -> dict[str, set[str]]:
    """Per replica, the GPUs (NVML UUIDs) its process holds memory on, from the replicas' own
    ``/metrics`` through the proxy at ``url``. A scrape reaches one replica, so they go
    several at a time until ``replicas`` replicas have answered, or ``timeout`` passes."""
    held: dict[str, set[str]] = {}

    def scrape(_: int) -> tuple[str | None, set[str]]:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        replica, uuids = None, set()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                replica = sample.labels.get("replica", replica)
                if sample.name == "gpu_process_memory_bytes" and sample.value > 0:
                    uuids.add(sample.labels["uuid"])
        return replica, uuids

    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(8) as pool:
        while len(held) < replicas and time.monotonic() < deadline:
            for replica, uuids in pool.map(scrape, range(16)):
                if replica:
                    held.setdefault(replica, set()).update(uuids)
    return held


def serve_with_ray(settings: Settings, plan: ReplicaPlan, address: str | None = None) -> None:
    """``serve --engine ray``: deploy, hold until SIGINT/SIGTERM, then remove the application.

    Like ``serve run``, the application lives as long as this command (Ctrl-C while it is
    still deploying aborts and cleans up too); a long-lived deployment on a cluster goes
    through ``serve deploy deploy/ray/serve.yaml`` instead.
    """
    try:
        url = deploy_on_ray(settings, plan, address)
        Console().print(f"gpu-matrix-service on Ray Serve at {url}: {_describe(plan)}")
        _wait_for_stop_signal()
    finally:
        if ray.is_initialized():
            serve.delete(APP_NAME)
            ray.shutdown()


def _wait_for_stop_signal() -> None:
    stop = threading.Event()
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in handled}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _describe(plan: ReplicaPlan) -> str:
    if plan.autoscaling:
        count = f"{plan.min_replicas or 1} to {plan.max_replicas or plan.replicas} replicas"
    else:
        count = f"{plan.replicas} replica(s)"
    return f"{count}, {plan.num_gpus:g} GPU and {plan.num_cpus:g} CPU each"
