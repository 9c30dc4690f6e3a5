"""Which backends exist, and picking one at start-up by what really works on this machine.

Each entry names a module and a class taking ``Settings``; the class's constructor probes its
devices for real (a tiny kernel, not just an import) and raises ``BackendUnavailable`` with the
reason when it cannot compute. Adding a backend means adding its module and one line here.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Final

from gpu_matrix_service.backends.base import Backend, BackendUnavailable
from gpu_matrix_service.settings import Settings

log = logging.getLogger(__name__)

BACKENDS: Final[dict[str, str]] = {
    "cuda": "gpu_matrix_service.backends.cuda.backend:CudaBackend",
    "numba": "gpu_matrix_service.backends.numba_cuda:NumbaBackend",
    "cpu": "gpu_matrix_service.backends.cpu:CpuBackend",
}
AUTO_ORDER: Final = ("cuda", "numba", "cpu")


def create_backend(name: str, settings: Settings) -> Backend:
    """Build the backend called ``name``; ``BackendUnavailable`` when it cannot run here."""
    module_name, _, class_name = BACKENDS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(f"{name}: cannot import {module_name}: {exc}") from exc
    backend: Backend = getattr(module, class_name)(settings)
    return backend


def select_backend(settings: Settings) -> tuple[Backend, list[str]]:
    """The backend ``settings.backend`` asks for, and why each earlier candidate was skipped.

    ``auto`` tries cuda, then numba, then cpu and takes the first whose probe succeeds. A
    backend named explicitly must work, else ``BackendUnavailable`` stops the start-up.
    """
    if settings.backend != "auto":
        return create_backend(settings.backend, settings), []
    skipped: list[str] = []
    for name in AUTO_ORDER:
        try:
            backend = create_backend(name, settings)
        except BackendUnavailable as exc:
            skipped.append(str(exc))
            log.info("backend %s not used: %s", name, exc)
            continue
        log.info("backend %s selected (auto)", name)
        return backend, skipped
    raise BackendUnavailable("no backend could start: " + "; ".join(skipped))


def leave_if_exit_handlers_would_crash(status: int) -> None:
    """End the process now with ``status`` when a backend's interpreter-exit handlers are known
    to crash it; otherwise return. Call it where the process is done (resources released,
    answers given): numba-cuda 0.30 segfaults at exit once it has used two or more GPUs
    (docs/backends.md), which would turn a clean exit 0 into 139."""
    numba_cuda = sys.modules.get("gpu_matrix_service.backends.numba_cuda")
    if numba_cuda is None or not numba_cuda.exits_crash_at_interpreter_exit():
        return
    log.info("leaving without interpreter-exit handlers (numba-cuda on several GPUs)")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
