"""Prometheus exposition."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from gpu_matrix_service.metrics import CONTENT_TYPE
from gpu_matrix_service.routes.state import service_metrics

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}}},
)
async def metrics(request: Request) -> Response:
    """Request, compute and GPU metrics in Prometheus' text format."""
    # NVML readings happen during rendering: keep them off the event loop.
    body = await run_in_threadpool(service_metrics(request).render)
    return Response(body, media_type=CONTENT_TYPE)
