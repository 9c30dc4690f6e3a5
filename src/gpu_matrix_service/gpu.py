"""NVML queries: which GPUs the host has, their memory, utilisation, temperature and power.

Nothing else lives here. :class:`GpuMonitor` owns the NVML session (initialised once at
start-up, shut down with the app). On a host with no driver or no GPU it reports an empty
device list and the reason, and never raises. The ``nvml`` module is a parameter so tests can
replace NVML at its boundary with a fake.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024


@dataclass(frozen=True)
class GpuStatus:
    """One GPU as NVML sees it now. Bytes, percent (0-100), degrees Celsius, watts.

    A reading the device does not offer (power on some boards, utilisation under MIG) is None.
    """

    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_percent: float | None
    memory_utilization_percent: float | None
    temperature_celsius: float | None
    power_watts: float | None
    process_memory_bytes: int | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with the memory figures also in MiB for people."""
        fields = asdict(self)
        for key in ("memory_total", "memory_used", "memory_free"):
            fields[f"{key}_mib"] = round(fields[f"{key}_bytes"] / MiB, 1)
        return fields


@dataclass(frozen=True)
class GpuSnapshot:
    """Every GPU NVML can see, the driver and CUDA versions, or why there is nothing."""

    gpus: list[GpuStatus]
    driver_version: str | None
    cuda_version: str | None
    reason: str | None = None


def load_pynvml() -> ModuleType | None:
    """The ``pynvml`` module (nvidia-ml-py), or None when it is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def optional(nvml: ModuleType, read: Callable[..., T], *args: object) -> T | None:
    """``read(*args)``, or None when NVML says the device or driver does not offer it
    (NOT_SUPPORTED under MIG, on some boards)."""
    try:
        return read(*args)
    except nvml.NVMLError:
        return None


def text(value: str | bytes) -> str:
    """An NVML string (bytes in older nvidia-ml-py releases) as text."""
    return value.decode() if isinstance(value, bytes) else value


def cuda_text(code: int) -> str:
    """NVML's integer CUDA version (12040) as text ("12.4")."""
    return f"{code // 1000}.{(code % 1000) // 10}"


def this_process() -> set[int]:
    """The PIDs whose GPU memory counts as this service's: just this process."""
    return {os.getpid()}


def this_process_and_siblings() -> set[int]:
    """This process and its parent's other children: the service's server workers.

    Read from ``/proc/<ppid>/task/<ppid>/children`` (Linux); only this process elsewhere.
    """
    parent = os.getppid()
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return this_process()
    return {os.getpid(), *(int(pid) for pid in children)}


class GpuMonitor:
    """An NVML session. Calls are cheap (microseconds each) and serialised by a lock.

    ``service_pids`` names the processes whose GPU memory is "this service's" (several server
    workers share one service); ``nvml`` replaces the pynvml module, for tests.
    """

    def __init__(
        self,
        nvml: ModuleType | None = None,
        service_pids: Callable[[], Collection[int]] = this_process,
    ) -> None:
        self._service_pids = service_pids
        self._nvml = nvml if nvml is not None else load_pynvml()
        self._lock = threading.Lock()
        self.reason: str | None = None
        self.available = False
        if self._nvml is None:
            self.reason = "nvidia-ml-py is not installed"
            return
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as exc:
            self.reason = f"NVML could not start (no NVIDIA driver?): {exc}"
            log.info("no GPU monitoring: %s", self.reason)
            return
        self.available = True

    def snapshot(self) -> GpuSnapshot:
        """Read every GPU now. Never raises: a failing device is left out and logged."""
        if not self.available or self._nvml is None:
            return GpuSnapshot([], None, None, self.reason)
        nvml = self._nvml
        with self._lock:
            try:
                count = nvml.nvmlDeviceGetCount()
                driver = text(nvml.nvmlSystemGetDriverVersion())
                cuda = cuda_text(nvml.nvmlSystemGetCudaDriverVersion())
            except nvml.NVMLError as exc:
                return GpuSnapshot([], None, None, f"NVML query failed: {exc}")
            gpus = []
            for index in range(count):
                try:
                    gpus.append(self._status(index))
                except nvml.NVMLError as exc:
                    log.warning("NVML could not read GPU %d: %s", index, exc)
        reason = None if gpus else "NVML found no GPU"
        return GpuSnapshot(gpus, driver, cuda, reason)

    def _status(self, index: int) -> GpuStatus:
        nvml = self._nvml
        assert nvml is not None
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        util = optional(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
        temperature = optional(
            nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
        )
        power_mw = optional(nvml, nvml.nvmlDeviceGetPowerUsage, handle)
        return GpuStatus(
            index=index,
            name=text(nvml.nvmlDeviceGetName(handle)),
            uuid=text(nvml.nvmlDeviceGetUUID(handle)),
            memory_total_bytes=int(memory.total),
            memory_used_bytes=int(memory.used),
            memory_free_bytes=int(memory.free),
            utilization_percent=None if util is None else float(util.gpu),
            memory_utilization_percent=None if util is None else float(util.memory),
            temperature_celsius=None if temperature is None else float(temperature),
            power_watts=None if power_mw is None else power_mw / 1000.0,
            process_memory_bytes=self._process_memory(handle),
        )

    def _process_memory(self, handle: object) -> int | None:
        """GPU memory the service's processes hold on the device, in bytes (0 when none)."""
        assert self._nvml is not None
        processes = optional(self._nvml, self._nvml.nvmlDeviceGetComputeRunningProcesses, handle)
        if processes is None:
            return None
        pids = self._service_pids()
        used = [p.usedGpuMemory for p in processes if p.pid in pids]
        return int(sum(u for u in used if u is not None))

    def close(self) -> None:
        """End the NVML session."""
        if self.available and self._nvml is not None:
            with self._lock:
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError as exc:
                    log.debug("nvmlShutdown: %s", exc)
            self.available = False
