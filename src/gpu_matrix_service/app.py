"""The FastAPI app factory: wires settings, the compute backend, NVML, routes and metrics.

``create_app(settings)`` builds an app; its lifespan creates the owned resources (compute
service with its backend and threads, NVML session) at start-up and releases them at
shutdown. ``uvicorn --factory gpu_matrix_service.app:create_app`` works too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.telemetry import TelemetryConfig
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpu_matrix_service import __version__
from gpu_matrix_service.auth import require_token
from gpu_matrix_service.backends.base import Backend
from gpu_matrix_service.compute import ComputeService
from gpu_matrix_service.errors import ServiceError
from gpu_matrix_service.gpu import GpuMonitor, this_process, this_process_and_siblings
from gpu_matrix_service.metrics import GpuCollector, ServiceMetrics
from gpu_matrix_service.routes import health, metrics, ops
from gpu_matrix_service.routes.lane import OperationLane
from gpu_matrix_service.routes.state import OperationState, route_template
from gpu_matrix_service.settings import Settings

log = logging.getLogger(__name__)


class RequestMetricsMiddleware:
    """Counts and times every HTTP request by method, route template and status code."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics = self.metrics
        metrics.request_started()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            seconds = time.perf_counter() - start
            metrics.request_ended(scope["method"], route_template(scope), status, seconds)


# How stale batched metrics may get between scrapes (ServiceMetrics.flush): a scrape flushes
# first anyway; this bounds the memory the values wait in.
METRICS_FLUSH_SECONDS = 1.0


async def flush_metrics_every(metrics: ServiceMetrics, seconds: float) -> None:
    """Flush ``metrics`` every ``seconds`` until cancelled."""
    while True:
        await asyncio.sleep(seconds)
        metrics.flush()


def telemetry_config(enabled: bool) -> TelemetryConfig:
    """FastAPI's native OpenTelemetry: its defaults when ``enabled``, else all of it off, so
    requests skip the check of the global providers (``GMS_OPENTELEMETRY``)."""
    if enabled:
        return {}
    return {"tracing": False, "metrics": False, "logs": False}


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    """Build the service. ``backend`` replaces the one ``settings.backend`` would select."""
    settings = settings or Settings()
    multi = settings.metrics_dir is not None
    service_metrics = ServiceMetrics(settings.metrics_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        monitor = GpuMonitor(service_pids=this_process_and_siblings if multi else this_process)
        compute = ComputeService(settings, backend)
        log.info(
            "computing on %s (%s): %s",
            compute.backend.name,
            compute.backend.device_kind,
            ", ".join(d.name for d in compute.backend.devices()),
        )
        service_metrics.add_collector(GpuCollector(monitor))
        service_metrics.service_info.labels(
            __version__, compute.backend.name, settings.instance_name
        ).set(1)
        app.state.gpu, app.state.compute = monitor, compute
        app.state.operation = OperationState(settings, compute, service_metrics)
        flusher = asyncio.create_task(flush_metrics_every(service_metrics, METRICS_FLUSH_SECONDS))
        try:
            yield
        finally:
            flusher.cancel()
            app.state.compute = app.state.operation = None
            compute.close()
            monitor.close()
            service_metrics.close()

    app = FastAPI(
        title="gpu-matrix-service",
        version=__version__,
        summary="Matrix operations on the GPU over HTTP: upload two .npz/.npy arrays, get the "
        "result's shape and timing, or the result itself.",
        lifespan=lifespan,
        telemetry=telemetry_config(settings.opentelemetry),
    )
    app.state.settings = settings
    app.state.metrics = service_metrics
    # Without tokens there is nothing to check: no dependency at all keeps small requests fast.
    guard = [Depends(require_token)] if settings.api_tokens else []
    # Described here (security included); the lane below answers them.
    app.include_router(ops.router, dependencies=guard)
    app.include_router(health.router)
    app.include_router(metrics.router, dependencies=guard if settings.metrics_auth else [])
    # Innermost: POST /add and /v1/ops/{op} are answered here, inside CORS and metrics. Not
    # with OpenTelemetry: FastAPI names a span's http.route in its router, which the lane skips.
    if not settings.opentelemetry:
        app.add_middleware(
            OperationLane, routes=ops.dispatch_routes(), exception_handlers=app.exception_handlers
        )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
            expose_headers=[*ops.RESULT_HEADERS],
        )
    app.add_middleware(RequestMetricsMiddleware, metrics=service_metrics)
    _install_error_handlers(app, service_metrics)
    return app


def _install_error_handlers(app: FastAPI, service_metrics: ServiceMetrics) -> None:
    """One mapping from our errors (and FastAPI's validation errors) to status + JSON detail."""

    def record(request: Request, reason: str) -> None:
        errors = service_metrics.request_errors
        service_metrics.child(errors, route_template(request.scope), reason).inc()

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        record(request, type(exc).__name__)
        # %r: details quote client-chosen names, which must not forge log lines.
        log.info("%s %s -> %d: %r", request.method, request.url.path, exc.status_code, exc.detail)
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        record(request, "RequestValidationError")
        return JSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # Nobody reads this answer; 499 (nginx's "client closed request") keeps metrics honest.
        record(request, "ClientDisconnect")
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: log it whole, answer without internals, keep serving.
        record(request, type(exc).__name__)
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; see the service log"}, status_code=500)
