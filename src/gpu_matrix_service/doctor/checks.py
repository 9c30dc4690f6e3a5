"""What a doctor check is, and what the checks look at besides NVML.

A :class:`Check` is one verdict (pass, warn, fail, skip) on one aspect of the GPU stack, with
the measured value and a fix hint. Only a *required* check that fails makes the stack "not
ready"; anything else that is wrong is a warning (:func:`problem` picks between the two).
:class:`Host` is the machine as the checks see it (environment, files, tools), so tests can
replace it as they replace NVML.

The check functions live by subject: :mod:`.gpu_checks` (driver, devices, visibility),
:mod:`.container`, :mod:`.library` (toolkit and kernel library) and :mod:`.workload`
(frameworks, backends, bandwidth, matmul); :mod:`.diagnosis` runs them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Verdict = Literal["pass", "warn", "fail", "skip"]
VERDICTS: tuple[Verdict, ...] = ("pass", "warn", "fail", "skip")
GROUPS = ("driver", "devices", "container", "toolkit", "frameworks", "workload")


@dataclass(frozen=True)
class Check:
    """One verdict on one aspect. ``value`` is what was measured, for people; ``hint`` how to
    fix it (empty when there is nothing to do); ``data`` the same facts as numbers for --json.

    ``required``: a failure means the stack is not ready (non-zero exit code).
    """

    name: str
    group: str
    verdict: Verdict
    value: str
    hint: str = ""
    required: bool = False
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def blocking(self) -> bool:
        """Whether this check keeps the stack from being ready."""
        return self.required and self.verdict == "fail"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "group": self.group,
            "name": self.name,
            "verdict": self.verdict,
            "value": self.value,
            "hint": self.hint,
            "required": self.required,
            "data": self.data,
        }


def problem(required: bool) -> Verdict:
    """The verdict for something wrong: fail when the check is required, else warn."""
    return "fail" if required else "warn"


@dataclass(frozen=True)
class ToolOutput:
    """What a command printed: its exit status and stdout and stderr together."""

    returncode: int
    output: str


def run_tool(command: Sequence[str], timeout_s: float = 10.0) -> ToolOutput | None:
    """Run a host tool (nvcc, cuobjdump, nvidia-ctk); None when it cannot start or hangs."""
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return ToolOutput(done.returncode, done.stdout + done.stderr)


@dataclass(frozen=True)
class Host:
    """Everything doctor looks at besides NVML: environment variables, files under ``root``
    (``/dev``, ``/proc``, ``/etc``), the tools on PATH and how to run them.

    Tests build one over a temporary directory; :meth:`current` is the real machine.
    """

    environ: Mapping[str, str]
    root: Path = Path("/")
    hostname: str = "localhost"
    which: Callable[[str], str | None] = shutil.which
    run: Callable[[Sequence[str], float], ToolOutput | None] = run_tool

    @classmethod
    def current(cls) -> Host:
        """This machine. Doctor diagnoses the process environment itself (CUDA_VISIBLE_DEVICES,
        NVIDIA_* set by the container runtime), so it reads it here, at the edge."""
        return cls(environ=dict(os.environ), hostname=socket.gethostname())

    def path(self, absolute: str) -> Path:
        """``absolute`` (``/dev/nvidiactl``) under this host's root."""
        return self.root / absolute.lstrip("/")

    def find_tool(self, name: str) -> str | None:
        """``name`` on PATH, else in the CUDA toolkit's usual bin directory."""
        found = self.which(name)
        fallback = self.path(f"/usr/local/cuda/bin/{name}")
        if found is None and os.access(fallback, os.X_OK):
            found = str(fallback)
        return found
