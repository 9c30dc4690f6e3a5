"""The NVML readings doctor needs beyond :mod:`gpu_matrix_service.gpu`: capability, MIG, ECC,
persistence, clocks, PCIe link, device node numbers.

Every function takes the ``nvml`` module (``pynvml`` or a test fake) and a device handle. A
reading the device does not offer (NOT_SUPPORTED on consumer boards, under MIG, on old
drivers) comes back as None rather than an exception, so one missing feature never hides the
others. :func:`read_inventory` opens and closes its own NVML session (NVML counts
``nvmlInit`` calls, so this is safe next to the service's ``GpuMonitor``).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

from gpu_matrix_service.gpu import cuda_text, optional, text

# Clock-event bits that mean the GPU is being slowed down by heat or the board, not by idling.
SLOWDOWN_REASONS: dict[int, str] = {
    0x08: "hardware slowdown",
    0x20: "software thermal slowdown",
    0x40: "hardware thermal slowdown",
    0x80: "power brake",
}


@dataclass(frozen=True)
class EccCounts:
    """ECC state and error counts. Volatile counts are since the last driver load; aggregate
    counts over the board's life. None where the board does not count that kind."""

    enabled: bool
    pending_enabled: bool
    corrected_volatile: int | None
    uncorrected_volatile: int | None
    uncorrected_aggregate: int | None


@dataclass(frozen=True)
class RemappedRows:
    """HBM row remapping (A100 and later): rows remapped, and whether a reset is pending or a
    remap failed (the board then needs service)."""

    corrected: int
    uncorrected: int
    pending: bool
    failed: bool


@dataclass(frozen=True)
class DeviceFacts:
    """One GPU as NVML reports it. Bytes, MHz, degrees Celsius; None where not offered.

    ``mig_mode`` is (current, pending) or None on a board without MIG; ``mig_instances`` the
    MIG devices that exist now. ``pcie_max`` and ``pcie_now`` are (generation, lanes).
    """

    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_used_bytes: int
    minor_number: int | None = None
    pci_bus_id: str | None = None
    compute_capability: tuple[int, int] | None = None
    mig_mode: tuple[bool, bool] | None = None
    mig_instances: int = 0
    ecc: EccCounts | None = None
    remapped_rows: RemappedRows | None = None
    persistence_mode: bool | None = None
    temperature_celsius: int | None = None
    sm_clock_mhz: int | None = None
    sm_clock_max_mhz: int | None = None
    memory_clock_mhz: int | None = None
    memory_clock_max_mhz: int | None = None
    slowdown_reasons: list[str] = field(default_factory=list)
    pcie_max: tuple[int, int] | None = None
    pcie_now: tuple[int, int] | None = None
    cuda_cores: int | None = None

    @property
    def arch(self) -> int | None:
        """The compute capability as one number, as in ``sm_90``; None if unknown."""
        if self.compute_capability is None:
            return None
        major, minor = self.compute_capability
        return major * 10 + minor

    @property
    def device_file(self) -> str:
        """The device node for this GPU, ``/dev/nvidia<minor>`` (the index when unknown)."""
        minor = self.minor_number if self.minor_number is not None else self.index
        return f"/dev/nvidia{minor}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with the architecture and device node added."""
        return {**asdict(self), "arch": self.arch, "device_file": self.device_file}


@dataclass(frozen=True)
class NvmlInventory:
    """What NVML says about the host: driver versions and every GPU, or why nothing.

    ``cuda_driver_version`` is NVML's integer form (13000 for CUDA 13.0); ``unreadable`` holds
    a message for each GPU NVML lists but could not read.
    """

    loaded: bool
    reason: str | None = None
    driver_version: str | None = None
    cuda_driver_version: int | None = None
    devices: list[DeviceFacts] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    @property
    def cuda_version_text(self) -> str | None:
        """The driver's CUDA version as ``13.0``; None when NVML did not say."""
        return None if self.cuda_driver_version is None else cuda_text(self.cuda_driver_version)


def read_inventory(nvml: ModuleType | None) -> NvmlInventory:
    """Open NVML, read the driver and every GPU, close NVML. Never raises on NVML errors."""
    if nvml is None:
        return NvmlInventory(False, "nvidia-ml-py (pynvml) is not installed")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return NvmlInventory(False, f"NVML could not start: {exc}")
    try:
        return _read_all(nvml)
    finally:
        # The readings are taken; a failing shutdown changes nothing about them.
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()


def _read_all(nvml: ModuleType) -> NvmlInventory:
    try:
        driver = text(nvml.nvmlSystemGetDriverVersion())
        cuda = int(nvml.nvmlSystemGetCudaDriverVersion())
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as exc:
        return NvmlInventory(False, f"NVML started but could not list GPUs: {exc}")
    devices, unreadable = [], []
    for index in range(count):
        try:
            devices.append(read_device(nvml, index))
        except nvml.NVMLError as exc:
            unreadable.append(f"GPU {index}: {exc}")
    return NvmlInventory(True, None, driver, cuda, devices, unreadable)


def read_device(nvml: ModuleType, index: int) -> DeviceFacts:
    """Every reading of GPU ``index``; raises NVMLError only when the GPU cannot be opened."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return DeviceFacts(
        index=index,
        name=text(nvml.nvmlDeviceGetName(handle)),
        uuid=text(nvml.nvmlDeviceGetUUID(handle)),
        memory_total_bytes=int(memory.total),
        memory_used_bytes=int(memory.used),
        minor_number=optional(nvml, nvml.nvmlDeviceGetMinorNumber, handle),
        pci_bus_id=pci_bus_id(nvml, handle),
        compute_capability=compute_capability(nvml, handle),
        mig_mode=mig_mode(nvml, handle),
        mig_instances=mig_instance_count(nvml, handle),
        ecc=ecc_counts(nvml, handle),
        remapped_rows=remapped_rows(nvml, handle),
        persistence_mode=persistence_mode(nvml, handle),
        temperature_celsius=optional(
            nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
        ),
        sm_clock_mhz=optional(nvml, nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM),
        sm_clock_max_mhz=optional(nvml, nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_SM),
        memory_clock_mhz=optional(nvml, nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM),
        memory_clock_max_mhz=optional(
            nvml, nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_MEM
        ),
        slowdown_reasons=slowdown_reasons(nvml, handle),
        pcie_max=_pair(
            optional(nvml, nvml.nvmlDeviceGetMaxPcieLinkGeneration, handle),
            optional(nvml, nvml.nvmlDeviceGetMaxPcieLinkWidth, handle),
        ),
        pcie_now=_pair(
            optional(nvml, nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
            optional(nvml, nvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
        ),
        cuda_cores=optional(nvml, nvml.nvmlDeviceGetNumGpuCores, handle),
    )


def compute_capability(nvml: ModuleType, handle: object) -> tuple[int, int] | None:
    """(major, minor) CUDA compute capability, e.g. (9, 0) for an H100."""
    value = optional(nvml, nvml.nvmlDeviceGetCudaComputeCapability, handle)
    return None if value is None else (int(value[0]), int(value[1]))


def pci_bus_id(nvml: ModuleType, handle: object) -> str | None:
    """The PCI bus id, e.g. ``00000000:18:00.0``."""
    info = optional(nvml, nvml.nvmlDeviceGetPciInfo, handle)
    return None if info is None else text(info.busId)


def mig_mode(nvml: ModuleType, handle: object) -> tuple[bool, bool] | None:
    """(current, pending) MIG mode; None on a board without MIG."""
    value = optional(nvml, nvml.nvmlDeviceGetMigMode, handle)
    return None if value is None else (bool(value[0]), bool(value[1]))


def mig_instance_count(nvml: ModuleType, handle: object) -> int:
    """How many MIG devices exist on the GPU now (0 without MIG)."""
    slots = optional(nvml, nvml.nvmlDeviceGetMaxMigDeviceCount, handle) or 0
    found = 0
    for slot in range(int(slots)):
        # Empty slots answer NOT_FOUND; MIG devices need not occupy the first slots.
        if optional(nvml, nvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, slot) is not None:
            found += 1
    return found


def ecc_counts(nvml: ModuleType, handle: object) -> EccCounts | None:
    """ECC mode and error counts; None on a board without ECC."""
    mode = optional(nvml, nvml.nvmlDeviceGetEccMode, handle)
    if mode is None:
        return None

    def total(kind: int, counter: int) -> int | None:
        return optional(nvml, nvml.nvmlDeviceGetTotalEccErrors, handle, kind, counter)

    corrected, uncorrected = (
        nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
        nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
    )
    return EccCounts(
        enabled=bool(mode[0]),
        pending_enabled=bool(mode[1]),
        corrected_volatile=total(corrected, nvml.NVML_VOLATILE_ECC),
        uncorrected_volatile=total(uncorrected, nvml.NVML_VOLATILE_ECC),
        uncorrected_aggregate=total(uncorrected, nvml.NVML_AGGREGATE_ECC),
    )


def remapped_rows(nvml: ModuleType, handle: object) -> RemappedRows | None:
    """Row-remapping counts and state; None on boards before A100."""
    value = optional(nvml, nvml.nvmlDeviceGetRemappedRows, handle)
    if value is None:
        return None
    corrected, uncorrected, pending, failed = value
    return RemappedRows(int(corrected), int(uncorrected), bool(pending), bool(failed))


def persistence_mode(nvml: ModuleType, handle: object) -> bool | None:
    """Whether the driver stays loaded with no client (Linux persistence mode)."""
    value = optional(nvml, nvml.nvmlDeviceGetPersistenceMode, handle)
    return None if value is None else bool(value)


def slowdown_reasons(nvml: ModuleType, handle: object) -> list[str]:
    """The thermal, power-brake or hardware slowdowns active now (empty when none)."""
    bits = optional(nvml, nvml.nvmlDeviceGetCurrentClocksThrottleReasons, handle) or 0
    return [reason for bit, reason in SLOWDOWN_REASONS.items() if int(bits) & bit]


def _pair(first: int | None, second: int | None) -> tuple[int, int] | None:
    return None if first is None or second is None else (int(first), int(second))
