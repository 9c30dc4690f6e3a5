"""Engines that run the service's one FastAPI app: uvicorn on one machine, Ray Serve on many.

``gpu-matrix-service serve`` runs :func:`gpu_matrix_service.app.create_app` under uvicorn
(the default, ``--engine uvicorn``); ``--engine ray`` runs the same app as a Ray Serve
deployment (:mod:`gpu_matrix_service.engines.ray_serve`). Ray is an optional extra
(``pip install 'gpu-matrix-service[ray]'``) and nothing on the single-machine path imports it.
"""

from __future__ import annotations


class EngineUnavailable(RuntimeError):
    """An engine's optional dependencies are missing; the message says what to install."""
