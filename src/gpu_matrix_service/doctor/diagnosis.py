"""Running the checks: the cheap readiness set, or everything.

:func:`quick_checks` only queries NVML and looks at /dev (device presence and health,
visibility, device nodes), so ``/health/ready`` and the container HEALTHCHECK can run it.
:func:`diagnose` adds the toolkit, framework and workload checks, whose probes run in
subprocesses with time limits so a broken CUDA install cannot hang or crash doctor.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from gpu_matrix_service.doctor import container, gpu_checks, library, probe_runner, workload
from gpu_matrix_service.doctor.checks import VERDICTS, Check, Host
from gpu_matrix_service.doctor.nvml_queries import NvmlInventory, read_inventory
from gpu_matrix_service.gpu import load_pynvml
from gpu_matrix_service.settings import Settings


@dataclass
class DoctorReport:
    """Every check run, and the facts the renderers need.

    ``visible`` holds the NVML indices of the GPUs CUDA may use (after CUDA_VISIBLE_DEVICES).
    """

    checks: list[Check]
    inventory: NvmlInventory
    visible: list[int]
    hostname: str
    require_gpu: bool

    @property
    def blocking(self) -> list[Check]:
        """The required checks that failed."""
        return [c for c in self.checks if c.blocking]

    @property
    def ready(self) -> bool:
        """True when no required check failed."""
        return not self.blocking

    @property
    def exit_code(self) -> int:
        """The command's exit status: 0 when ready, 1 otherwise."""
        return 0 if self.ready else 1

    def counts(self) -> dict[str, int]:
        """How many checks gave each verdict."""
        return {v: sum(1 for c in self.checks if c.verdict == v) for v in VERDICTS}


def _host_checks(
    settings: Settings, require_gpu: bool, nvml: ModuleType | None, host: Host
) -> tuple[NvmlInventory, list[int], list[Check]]:
    inventory = read_inventory(nvml if nvml is not None else load_pynvml())
    visible = gpu_checks.visible_indices(inventory.devices, host.environ)
    checks = [
        *gpu_checks.driver_checks(inventory, require_gpu),
        *gpu_checks.device_checks(inventory, require_gpu),
        gpu_checks.visibility_check(inventory, visible, settings, host.environ, require_gpu),
        *container.container_checks(inventory, host, require_gpu),
    ]
    return inventory, visible, checks


def quick_checks(
    settings: Settings,
    *,
    require_gpu: bool = False,
    nvml: ModuleType | None = None,
    host: Host | None = None,
) -> list[Check]:
    """The cheap checks (NVML queries and a look at /dev; no subprocess, no GPU work): the
    driver, each GPU's health, which GPUs are visible, device nodes and container setup.

    ``nvml`` defaults to pynvml and ``host`` to this machine; tests pass fakes. The stack is
    ready when no returned check is :attr:`~Check.blocking`.
    """
    return _host_checks(settings, require_gpu, nvml, host or Host.current())[2]


def diagnose(
    settings: Settings,
    *,
    require_gpu: bool = False,
    quick: bool = False,
    nvml: ModuleType | None = None,
    host: Host | None = None,
    probe: probe_runner.ProbeRunner | None = None,
) -> DoctorReport:
    """Run the checks and return the report: :func:`quick_checks`, then (unless ``quick``) the
    toolkit, framework and workload checks, which take tens of seconds.

    Once a GPU is visible, the GPU stack has to work: its failures are required even without
    ``require_gpu``, which only makes a *missing* GPU a failure. ``probe`` runs one probe
    subprocess (:func:`~gpu_matrix_service.doctor.probe_runner.run_probe` by default).
    """
    host = host or Host.current()
    inventory, visible, checks = _host_checks(settings, require_gpu, nvml, host)
    if not quick:
        run = probe or probe_runner.run_probe
        gpu_expected = require_gpu or bool(visible)
        lib = library.find_kernel_library(settings)
        checks += library.toolkit_checks(inventory, visible, lib, host, run, gpu_expected)
        checks += workload.framework_checks(visible, run, gpu_expected)
        checks += workload.workload_checks(settings, inventory, visible, lib, run, gpu_expected)
    return DoctorReport(checks, inventory, visible, host.hostname, require_gpu)
