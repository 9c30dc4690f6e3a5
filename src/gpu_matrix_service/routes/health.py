"""Liveness, readiness, a summary for people, and what the GPUs are doing."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from gpu_matrix_service import __version__
from gpu_matrix_service.doctor import quick_checks
from gpu_matrix_service.routes.state import compute_service, gpu_monitor, settings_of

router = APIRouter(tags=["health"])


@router.get("/health", summary="Service status, backend and devices")
async def health(request: Request) -> dict[str, Any]:
    """``{"status": "ok"}`` with the backend in use, its device kind and the GPUs it computes on."""
    service = compute_service(request)
    devices = service.backend.devices()
    return {
        "status": "ok",
        "backend": service.backend.name,
        "device": service.backend.device_kind,
        "gpu_count": sum(1 for d in devices if d.kind == "GPU"),
        "devices": [d.name for d in devices],
        "version": __version__,
    }


@router.get("/health/live", summary="Liveness: the process answers")
async def live() -> dict[str, str]:
    """Always ``{"status": "ok"}`` while the event loop runs."""
    return {"status": "ok"}


@router.get(
    "/health/ready",
    summary="Readiness: a backend is loaded and the GPU stack is sound",
    responses={503: {"description": "Starting, shutting down, or a blocking GPU problem."}},
)
async def ready(request: Request) -> JSONResponse:
    """200 once the compute backend is up and doctor's quick checks (driver, devices, device
    nodes; NVML only, milliseconds) find nothing blocking; 503 otherwise, naming what failed."""
    service = getattr(request.app.state, "compute", None)
    if service is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    checks = await run_in_threadpool(quick_checks, settings_of(request))
    failing = [check.as_dict() for check in checks if check.blocking]
    if failing:
        return JSONResponse({"status": "unready", "failing": failing}, status_code=503)
    return JSONResponse({"status": "ready", "backend": service.backend.name})


@router.get("/gpu-info", summary="GPU memory, utilisation, temperature and power (NVML)")
async def gpu_info(request: Request) -> dict[str, Any]:
    """One entry per GPU on the host; an empty list and a ``reason`` when there is none."""
    snapshot = await run_in_threadpool(gpu_monitor(request).snapshot)
    backend = compute_service(request).backend
    return {
        "gpus": [gpu.as_dict() for gpu in snapshot.gpus],
        "count": len(snapshot.gpus),
        "driver_version": snapshot.driver_version,
        "cuda_version": snapshot.cuda_version,
        "backend": backend.name,
        "devices_in_use": [
            {"index": d.index, "name": d.name, "kind": d.kind} for d in backend.devices()
        ],
        "reason": snapshot.reason,
    }
