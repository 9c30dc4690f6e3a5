"""Leaving past numba-cuda's crashing exit handlers, only when they would crash."""

from __future__ import annotations

import sys
import types

import pytest

from gpu_matrix_service import cli
from gpu_matrix_service.backends import registry

NUMBA_MODULE = "gpu_matrix_service.backends.numba_cuda"


class Left(Exception):
    """What the patched os._exit raises instead of ending the test run."""


@pytest.fixture
def exits(monkeypatch) -> list[int]:
    seen: list[int] = []

    def fake_exit(status: int) -> None:
        seen.append(status)
        raise Left

    monkeypatch.setattr(registry.os, "_exit", fake_exit)
    return seen


def fake_numba(monkeypatch, crashes: bool) -> None:
    module = types.SimpleNamespace(exits_crash_at_interpreter_exit=lambda: crashes)
    monkeypatch.setitem(sys.modules, NUMBA_MODULE, module)


def test_nothing_happens_without_numba_or_on_one_gpu(monkeypatch, exits):
    monkeypatch.delitem(sys.modules, NUMBA_MODULE, raising=False)
    registry.leave_if_exit_handlers_would_crash(0)
    fake_numba(monkeypatch, crashes=False)
    registry.leave_if_exit_handlers_would_crash(3)
    assert exits == []


def test_numba_on_several_gpus_leaves_with_the_given_status(monkeypatch, exits):
    fake_numba(monkeypatch, crashes=True)
    with pytest.raises(Left):
        registry.leave_if_exit_handlers_would_crash(5)
    assert exits == [5]


@pytest.mark.parametrize(("argv", "status"), [(["version"], 0), (["no-such-command"], 2)])
def test_the_cli_leaves_with_its_commands_exit_status(monkeypatch, exits, argv, status):
    fake_numba(monkeypatch, crashes=True)
    monkeypatch.setattr(sys, "argv", ["gpu-matrix-service", *argv])
    with pytest.raises(Left):
        cli.main()
    assert exits == [status]
