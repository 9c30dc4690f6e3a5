"""Shared fixtures: array files, an in-process app client, and a real server process."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from gpu_matrix_service.app import create_app
from gpu_matrix_service.backends.registry import leave_if_exit_handlers_would_crash
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


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """After the last report: a GPU run that used the Numba backend on two or more GPUs would
    segfault in numba-cuda's exit handlers (docs/backends.md) and fail its CI job with 139
    whatever the tests said; leave with the tests' own status instead."""
    leave_if_exit_handlers_would_crash(_EXIT_STATUS[-1] if _EXIT_STATUS else 0)
