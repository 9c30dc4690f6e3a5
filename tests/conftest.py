"""Shared fixtures: array files, an in-process app client, and a real server process."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from gpu_matrix_service.app import create_app
from gpu_matrix_service.settings import Settings

from servers import LiveServer, free_port, server_env


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()


@pytest.fixture
def settings() -> Settings:
    return Settings(backend="cpu", _env_file=None)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def live_server() -> Iterator[LiveServer]:
    """``python -m gpu_matrix_service serve`` on a free port, CPU backend."""
    port = free_port()
    args = [sys.executable, "-m", "gpu_matrix_service", "serve", "--port", str(port)]
    server = LiveServer(args, server_env(GMS_BACKEND="cpu", GMS_LOG_LEVEL="warning"), port)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
