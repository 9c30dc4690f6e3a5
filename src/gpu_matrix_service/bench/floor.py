"""The receive-only floor for ``bench http``: the same server stack, an endpoint that streams the
request body and discards it. No service can answer an upload faster than this reads it, so
``/add``'s latency and rate are reported as ratios to it.

    uvicorn --factory gpu_matrix_service.bench.floor:create_floor_app
"""

from __future__ import annotations

from fastapi import FastAPI, Request

from gpu_matrix_service.app import telemetry_config


def create_floor_app() -> FastAPI:
    """A FastAPI app whose ``POST /add`` reads the whole body, keeps nothing, answers its size."""
    # FastAPI configured as the service is by default (GMS_OPENTELEMETRY off): the same stack.
    app = FastAPI(title="receive-only floor", telemetry=telemetry_config(False))

    @app.post("/add")
    @app.post("/v1/ops/{op}")
    async def discard(request: Request) -> dict[str, int]:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
        return {"received_bytes": received}

    @app.get("/health/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app
