"""Running a probe in its own subprocess, with a time limit.

A broken CUDA install can hang in driver initialisation or crash the process (a segfault in
libcuda, an abort in a framework's import); in a subprocess that costs one probe, not doctor.
:func:`run_probe` says which of the two happened when there is no answer. The probes themselves
are in :mod:`.probes`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProbeResult:
    """A probe's answer (``data``), or why there is none (``error``: crashed, hung...).

    Both are set when the probe answered and then crashed on its way out.
    """

    data: dict[str, Any] | None
    error: str | None = None


ProbeRunner = Callable[[str, dict[str, Any], float], ProbeResult]


def run_probe(kind: str, args: dict[str, Any], timeout_s: float) -> ProbeResult:
    """Run probe ``kind`` with keyword ``args`` in a fresh interpreter; wait ``timeout_s``
    seconds at most (the probe is killed then)."""
    command = [sys.executable, "-m", "gpu_matrix_service.doctor.probes", kind, json.dumps(args)]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return ProbeResult(None, f"no answer after {timeout_s:.0f} s (killed): CUDA hangs here")
    except OSError as exc:
        return ProbeResult(None, f"cannot start {sys.executable}: {exc}")
    tail = " ".join(done.stderr.strip().splitlines()[-3:])[-400:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    try:
        data = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        data = None
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        if isinstance(data, dict):
            # It answered, then died in interpreter teardown (a library's exit handlers).
            return ProbeResult(data, f"crashed at exit with {name}: {tail or 'no message'}")
        return ProbeResult(None, f"crashed with {name}: {tail or 'no message'}")
    if not isinstance(data, dict):
        return ProbeResult(None, f"exit code {done.returncode}, no answer: {tail or 'no message'}")
    data["probe_seconds"] = round(time.monotonic() - started, 2)
    return ProbeResult(data)
