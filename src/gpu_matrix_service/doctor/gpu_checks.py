"""Checks on the driver and the GPUs as NVML sees them, and on which GPUs CUDA may use.

All of them read an :class:`~gpu_matrix_service.doctor.nvml_queries.NvmlInventory` taken once,
so they are cheap enough for readiness probes. Checks that span devices give one row per
aspect (MIG, ECC, ...) naming the GPUs concerned, so eight GPUs do not make forty rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict

from gpu_matrix_service.doctor.checks import Check, problem
from gpu_matrix_service.doctor.nvml_queries import DeviceFacts, NvmlInventory
from gpu_matrix_service.settings import Settings

GiB = 1024**3
HOT_CELSIUS = 85
NEARLY_FULL = 0.95

NO_GPU_HINT = (
    "check `nvidia-smi -L`; in a container pass the GPUs in (docker run --gpus all, Compose "
    "`gpus: all`, or a Kubernetes `nvidia.com/gpu` resource limit)"
)


def driver_checks(inventory: NvmlInventory, require_gpu: bool) -> list[Check]:
    """NVML loads; the driver version and the newest CUDA version the driver supports."""
    if not inventory.loaded:
        reason = inventory.reason or "NVML did not start"
        return [
            Check("nvml", "driver", problem(require_gpu), reason, _nvml_hint(reason), require_gpu)
        ]
    return [
        Check("nvml", "driver", "pass", "loaded"),
        Check(
            "driver",
            "driver",
            "pass",
            f"{inventory.driver_version} (supports CUDA {inventory.cuda_version_text})",
            data={
                "driver_version": inventory.driver_version,
                "cuda_driver_version": inventory.cuda_version_text,
            },
        ),
    ]


def _nvml_hint(reason: str) -> str:
    text = reason.lower()
    if "not installed" in text:
        return "install nvidia-ml-py (a dependency of this package): `pip install nvidia-ml-py`"
    if "mismatch" in text:
        return "the driver was upgraded but the old kernel module is still loaded: reboot"
    if "not loaded" in text:
        return "the nvidia kernel module is not loaded: `sudo modprobe nvidia`; see `dmesg`"
    return (
        "no NVIDIA driver here (libnvidia-ml.so.1 not found): install the driver on the host; "
        "in a container use the NVIDIA runtime (docker run --gpus all) so it is mounted"
    )


def device_checks(inventory: NvmlInventory, require_gpu: bool) -> list[Check]:
    """GPU count, one row per GPU (name, UUID, capability, memory), then MIG, ECC,
    persistence mode, temperature and clocks across all GPUs."""
    if not inventory.loaded:
        return [Check("gpu count", "devices", "skip", "no driver")]
    devices = inventory.devices
    checks = [_count_check(inventory, require_gpu)]
    if not devices:
        return checks
    checks += [_identity_check(d) for d in devices]
    return [
        *checks,
        mig_check(devices, require_gpu),
        ecc_check(devices),
        persistence_check(devices),
        thermals_check(devices),
    ]


def _count_check(inventory: NvmlInventory, require_gpu: bool) -> Check:
    count = len(inventory.devices)
    if inventory.unreadable:
        return Check(
            "gpu count",
            "devices",
            problem(require_gpu),
            f"{count} readable, cannot read: {'; '.join(inventory.unreadable)}",
            "a GPU NVML lists but cannot open has often fallen off the bus: check `dmesg` for "
            "Xid 79 and `nvidia-smi -q`; a reboot or `nvidia-smi -r` may bring it back",
            require_gpu,
        )
    if count == 0:
        return Check(
            "gpu count",
            "devices",
            problem(require_gpu),
            "NVML found no GPU",
            NO_GPU_HINT,
            require_gpu,
        )
    return Check(
        "gpu count",
        "devices",
        "pass",
        f"{count} GPU{'s' if count > 1 else ''}",
        data={"count": count},
    )


def _identity_check(device: DeviceFacts) -> Check:
    arch = f"sm_{device.arch}" if device.arch is not None else "capability unknown"
    used = device.memory_used_bytes / max(device.memory_total_bytes, 1)
    value = (
        f"{device.name}, {arch}, {device.memory_total_bytes / GiB:.1f} GiB "
        f"({device.memory_used_bytes / GiB:.1f} GiB used), {device.uuid}"
    )
    verdict, hint = "pass", ""
    if used > NEARLY_FULL:
        verdict = "warn"
        hint = (
            "other processes hold almost all memory: "
            "`nvidia-smi --query-compute-apps=pid,used_memory --format=csv`"
        )
    return Check(f"gpu{device.index}", "devices", verdict, value, hint, data=device.as_dict())


def mig_check(devices: Sequence[DeviceFacts], require_gpu: bool) -> Check:
    """MIG mode: off is plain; on with no instances leaves CUDA nothing to run on."""
    capable = [d for d in devices if d.mig_mode is not None]
    data = {f"gpu{d.index}": {"mig": d.mig_mode, "instances": d.mig_instances} for d in capable}
    if not capable:
        return Check("mig", "devices", "pass", "not MIG-capable", data=data)
    empty = [d for d in capable if d.mig_mode[0] and d.mig_instances == 0]
    if empty:
        names = _names(empty)
        return Check(
            "mig",
            "devices",
            problem(True),
            f"MIG on with no MIG devices on {names}: CUDA cannot use them",
            f"create MIG devices (`sudo nvidia-smi mig -i {empty[0].index} -cgi 1g.10gb -C`, "
            f"`nvidia-smi mig -lgip` lists profiles) or turn MIG off "
            f"(`sudo nvidia-smi -i {empty[0].index} -mig 0`, then reset the GPU)",
            True,
            data,
        )
    pending = [d for d in capable if d.mig_mode[0] != d.mig_mode[1]]
    if pending:
        return Check(
            "mig",
            "devices",
            "warn",
            f"MIG change pending on {_names(pending)}",
            "the change applies after a GPU reset (`sudo nvidia-smi -i N -r`) or a reboot",
            data=data,
        )
    on = [d for d in capable if d.mig_mode[0]]
    if on:
        instances = ", ".join(f"gpu{d.index}: {d.mig_instances}" for d in on)
        return Check(
            "mig",
            "devices",
            "warn",
            f"MIG on ({instances} MIG devices): CUDA sees MIG devices, not whole GPUs",
            "the service runs on a MIG slice; `nvidia-smi -L` lists them and "
            "CUDA_VISIBLE_DEVICES=MIG-<uuid> picks one; NVML utilisation is not reported",
            data=data,
        )
    return Check("mig", "devices", "pass", "off", data=data)


def ecc_check(devices: Sequence[DeviceFacts]) -> Check:
    """ECC: uncorrectable errors since the driver loaded (or a failed row remap) fail."""
    data = {
        f"gpu{d.index}": {
            "ecc": d.ecc and asdict(d.ecc),
            "remapped_rows": d.remapped_rows and asdict(d.remapped_rows),
        }
        for d in devices
    }
    bad = [d for d in devices if d.ecc and (d.ecc.uncorrected_volatile or 0) > 0]
    broken = [d for d in devices if d.remapped_rows and d.remapped_rows.failed]
    if bad or broken:
        parts = [f"gpu{d.index}: {d.ecc.uncorrected_volatile} uncorrectable errors" for d in bad]
        parts += [f"gpu{d.index}: row remapping failed" for d in broken]
        first = (bad or broken)[0].index
        return Check(
            "ecc",
            "devices",
            "fail",
            "; ".join(parts),
            f"results from this GPU may be wrong: keep work off it (CUDA_VISIBLE_DEVICES / "
            f"GMS_DEVICES without it), check `nvidia-smi -q -i {first} -d ECC,ROW_REMAPPER` and "
            f"`dmesg` for Xid 48/63/64, reset it (`sudo nvidia-smi -r -i {first}`); if errors "
            "return, the board needs service",
            True,
            data,
        )
    pending = [d for d in devices if d.remapped_rows and d.remapped_rows.pending]
    corrected = [d for d in devices if d.ecc and (d.ecc.corrected_volatile or 0) > 0]
    history = [d for d in devices if d.ecc and (d.ecc.uncorrected_aggregate or 0) > 0]
    if pending or corrected or history:
        parts = [f"gpu{d.index}: row remap pending" for d in pending]
        parts += [f"gpu{d.index}: {d.ecc.corrected_volatile} corrected errors" for d in corrected]
        parts += [
            f"gpu{d.index}: {d.ecc.uncorrected_aggregate} uncorrectable errors in its lifetime"
            for d in history
        ]
        return Check(
            "ecc",
            "devices",
            "warn",
            "; ".join(parts),
            "reset the GPU when idle to apply pending row remaps (`sudo nvidia-smi -r -i N`); "
            "watch the counts (`nvidia-smi -q -d ECC`): rising counts mean failing memory",
            data=data,
        )
    with_ecc = [d for d in devices if d.ecc is not None]
    if not with_ecc:
        return Check("ecc", "devices", "skip", "these GPUs have no ECC", data=data)
    off = [d for d in with_ecc if not d.ecc.enabled]
    value = f"off on {_names(off)}" if off else "on, no errors"
    return Check("ecc", "devices", "pass", value, data=data)


def persistence_check(devices: Sequence[DeviceFacts]) -> Check:
    """Persistence mode keeps the driver initialised between jobs (Linux)."""
    known = [d for d in devices if d.persistence_mode is not None]
    if not known:
        return Check("persistence mode", "devices", "skip", "not reported (not Linux?)")
    off = [d for d in known if not d.persistence_mode]
    if off:
        return Check(
            "persistence mode",
            "devices",
            "warn",
            f"off on {_names(off)}",
            "each CUDA start then pays the driver's initialisation (seconds on large GPUs): "
            "run nvidia-persistenced, or `sudo nvidia-smi -pm 1` on the host",
        )
    return Check("persistence mode", "devices", "pass", "on")


def thermals_check(devices: Sequence[DeviceFacts]) -> Check:
    """Temperature (°C) and SM / memory clocks (MHz, now / max); hot or slowed GPUs warn."""
    parts, troubled = [], []
    for d in devices:
        temp = "?" if d.temperature_celsius is None else f"{d.temperature_celsius} °C"
        sm = f"SM {_mhz(d.sm_clock_mhz)}/{_mhz(d.sm_clock_max_mhz)} MHz"
        mem = f"mem {_mhz(d.memory_clock_mhz)}/{_mhz(d.memory_clock_max_mhz)} MHz"
        slow = f" ({', '.join(d.slowdown_reasons)})" if d.slowdown_reasons else ""
        parts.append(f"gpu{d.index} {temp}, {sm}, {mem}{slow}")
        if d.slowdown_reasons or (d.temperature_celsius or 0) >= HOT_CELSIUS:
            troubled.append(d)
    if troubled:
        return Check(
            "temperature and clocks",
            "devices",
            "warn",
            "; ".join(parts),
            "the GPU is hot or slowed by thermal or power limits: check cooling and airflow; "
            "`nvidia-smi -q -d PERFORMANCE,TEMPERATURE` says why",
        )
    return Check("temperature and clocks", "devices", "pass", "; ".join(parts))


def _mhz(value: int | None) -> str:
    return "?" if value is None else str(value)


def _names(devices: Sequence[DeviceFacts]) -> str:
    return ", ".join(f"gpu{d.index}" for d in devices)


def visible_indices(devices: Sequence[DeviceFacts], environ: Mapping[str, str]) -> list[int]:
    """The NVML indices of the GPUs CUDA may use under CUDA_VISIBLE_DEVICES, in CUDA's order.

    Entries are indices or (prefixes of) ``GPU-`` UUIDs; CUDA ignores the first entry that
    matches nothing and everything after it. ``MIG-`` entries name MIG devices, not GPUs, and
    are left out here. Indices are read in PCI bus order (CUDA_DEVICE_ORDER=PCI_BUS_ID).
    """
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return [d.index for d in devices]
    chosen: list[int] = []
    for entry in (e.strip() for e in value.split(",")):
        if entry.startswith("MIG-"):
            continue
        index = _match_entry(entry, devices)
        if index is None or index in chosen:
            break
        chosen.append(index)
    return chosen


def _match_entry(entry: str, devices: Sequence[DeviceFacts]) -> int | None:
    if entry.isdigit():
        number = int(entry)
        return number if any(d.index == number for d in devices) else None
    if entry.startswith("GPU-"):
        matches = [d.index for d in devices if d.uuid.startswith(entry)]
        return matches[0] if len(matches) == 1 else None
    return None


def visibility_check(
    inventory: NvmlInventory,
    visible: Sequence[int],
    settings: Settings,
    environ: Mapping[str, str],
    require_gpu: bool,
) -> Check:
    """What CUDA_VISIBLE_DEVICES and NVIDIA_VISIBLE_DEVICES leave visible, and whether the
    service's GMS_DEVICES ordinals exist among them."""
    cuda_env = environ.get("CUDA_VISIBLE_DEVICES")
    shown = (
        "CUDA_VISIBLE_DEVICES unset" if cuda_env is None else f"CUDA_VISIBLE_DEVICES={cuda_env!r}"
    )
    nvidia_env = environ.get("NVIDIA_VISIBLE_DEVICES")
    if nvidia_env is not None:
        shown += f", NVIDIA_VISIBLE_DEVICES={nvidia_env!r}"
    data = {
        "cuda_visible_devices": cuda_env,
        "nvidia_visible_devices": nvidia_env,
        "visible": list(visible),
    }
    if not inventory.loaded or not inventory.devices:
        return Check("visible devices", "devices", "skip", f"{shown}: no GPU to show", data=data)
    total = len(inventory.devices)
    names = ", ".join(f"gpu{i}" for i in visible) or "none"
    value = f"{shown}: {len(visible)} of {total} GPUs visible ({names})"
    if not visible:
        return Check(
            "visible devices",
            "devices",
            problem(require_gpu),
            value,
            "CUDA_VISIBLE_DEVICES hides every GPU: unset it, or list GPUs as `0,1` or `GPU-<uuid>`",
            require_gpu,
            data,
        )
    wanted = settings.devices or []
    missing = [o for o in wanted if not 0 <= o < len(visible)]
    if missing:
        return Check(
            "visible devices",
            "devices",
            problem(True),
            f"{value}; GMS_DEVICES asks for CUDA ordinal(s) {missing}",
            f"GMS_DEVICES counts among the visible GPUs only (0..{len(visible) - 1}): fix it or "
            "CUDA_VISIBLE_DEVICES",
            True,
            data,
        )
    return _order_check(inventory, visible, value, environ, data)


def _order_check(
    inventory: NvmlInventory,
    visible: Sequence[int],
    value: str,
    environ: Mapping[str, str],
    data: dict,
) -> Check:
    cuda_env = environ.get("CUDA_VISIBLE_DEVICES")
    dropped = cuda_env is not None and len(visible) < len(
        [e for e in cuda_env.split(",") if e.strip() and not e.strip().startswith("MIG-")]
    )
    if dropped:
        return Check(
            "visible devices",
            "devices",
            "warn",
            value,
            "an entry of CUDA_VISIBLE_DEVICES matches no GPU (or repeats one): CUDA ignores it "
            "and every entry after it; use indices from `nvidia-smi -L` or GPU-<uuid>",
            data=data,
        )
    names = {d.name for d in inventory.devices if d.index in visible}
    if len(names) > 1 and environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        return Check(
            "visible devices",
            "devices",
            "warn",
            value,
            "mixed GPU models: CUDA numbers them fastest first, nvidia-smi by PCI bus; set "
            "CUDA_DEVICE_ORDER=PCI_BUS_ID so both agree",
            data=data,
        )
    return Check("visible devices", "devices", "pass", value, data=data)
