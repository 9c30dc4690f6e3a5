"""Ways to show a :class:`~gpu_matrix_service.doctor.diagnosis.DoctorReport`: a Rich table for
people, JSON for machines, a one-line status for dashboards and CI logs, and inventory formats
for schedulers (CI worker tags, Slurm gres.conf lines, Kubernetes node labels).

All but the table are pure functions returning text, so they are tested as strings.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from gpu_matrix_service.doctor.checks import GROUPS, Check
from gpu_matrix_service.doctor.diagnosis import DoctorReport
from gpu_matrix_service.doctor.nvml_queries import DeviceFacts

VERDICT_STYLES = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro"}
MiB = 1024 * 1024


def visible_devices(report: DoctorReport) -> list[DeviceFacts]:
    """The GPUs CUDA may use, in CUDA's order."""
    by_index = {d.index: d for d in report.inventory.devices}
    return [by_index[i] for i in report.visible if i in by_index]


def model_summary(devices: Sequence[DeviceFacts]) -> str:
    """``2x NVIDIA H100 80GB HBM3`` (one part per model, in order of appearance)."""
    return ", ".join(f"{n}x {name}" for name, n in Counter(d.name for d in devices).items())


def status_line(report: DoctorReport) -> str:
    """One line: ``ready (GPU: 2x NVIDIA H100 80GB HBM3)``, ``ready (CPU only: no NVIDIA
    driver; 3 warnings)`` or ``not ready: <first failed check>: <its value>``."""
    if not report.ready:
        first, more = report.blocking[0], len(report.blocking) - 1
        value = first.value if len(first.value) <= 160 else first.value[:157] + "..."
        extra = f" (+{more} more failure{'s' if more > 1 else ''})" if more else ""
        return f"not ready: {first.name}: {value}{extra}"
    devices = visible_devices(report)
    what = f"GPU: {model_summary(devices)}" if devices else f"CPU only: {_no_gpu_reason(report)}"
    warnings = report.counts()["warn"]
    suffix = f"; {warnings} warning{'s' if warnings > 1 else ''}" if warnings else ""
    return f"ready ({what}{suffix})"


def _no_gpu_reason(report: DoctorReport) -> str:
    if not report.inventory.loaded:
        return "no NVIDIA driver"
    if not report.inventory.devices:
        return "no GPU"
    return "CUDA_VISIBLE_DEVICES hides every GPU"


def render_table(report: DoctorReport, console: Console) -> None:
    """The checks as a table grouped by subject, hints for what is not a pass, then the
    status line."""
    table = Table(title=f"gpu-matrix-service doctor on {report.hostname}", title_justify="left")
    hints = any(c.hint and c.verdict != "pass" for c in report.checks)
    columns = [("group", 1), ("check", 2), ("result", 1), ("value", 6)]
    for header, ratio in columns + ([("fix", 5)] if hints else []):
        table.add_column(header, ratio=ratio, overflow="fold")
    ordered = sorted(report.checks, key=lambda c: GROUPS.index(c.group))
    for position, check in enumerate(ordered):
        first_of_group = position == 0 or ordered[position - 1].group != check.group
        last_of_group = position + 1 == len(ordered) or ordered[position + 1].group != check.group
        cells = [check.group if first_of_group else "", check.name, _verdict_text(check)]
        cells.append(check.value)
        if hints:
            cells.append(check.hint if check.verdict != "pass" else "")
        table.add_row(*cells, end_section=last_of_group)
    console.print(table)
    console.print(Text(status_line(report), style="green" if report.ready else "bold red"))


def _verdict_text(check: Check) -> Text:
    label = check.verdict.upper() if check.blocking else check.verdict
    return Text(label, style=VERDICT_STYLES[check.verdict])


def report_data(report: DoctorReport) -> dict[str, Any]:
    """The whole report as JSON-ready data."""
    inventory = report.inventory
    return {
        "status": status_line(report),
        "ready": report.ready,
        "exit_code": report.exit_code,
        "require_gpu": report.require_gpu,
        "host": report.hostname,
        "driver": {
            "loaded": inventory.loaded,
            "reason": inventory.reason,
            "version": inventory.driver_version,
            "cuda_version": inventory.cuda_version_text,
        },
        "gpus": [d.as_dict() for d in inventory.devices],
        "visible_gpus": report.visible,
        "counts": report.counts(),
        "checks": [c.as_dict() for c in report.checks],
    }


def render_json(report: DoctorReport) -> str:
    """:func:`report_data` as indented JSON."""
    return json.dumps(report_data(report), indent=2, default=str)


def model_slug(name: str) -> str:
    """A tag-safe model name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def worker_tags(report: DoctorReport) -> list[str]:
    """CI worker tags for the GPUs this process may use (NVML indices in ``gpu-devices``):
    ``gpu``, ``gpu-type=nvidia``, ``gpu-count=N``, ``gpu-devices=0,1``, ``gpu-model=...``;
    ``cpu`` and ``gpu-count=0`` without a GPU."""
    devices = visible_devices(report)
    if not devices:
        return ["cpu", "gpu-count=0"]
    tags = [
        "gpu",
        "gpu-type=nvidia",
        f"gpu-count={len(devices)}",
        "gpu-devices=" + ",".join(str(d.index) for d in devices),
    ]
    tags += [f"gpu-model={model_slug(name)}" for name in dict.fromkeys(d.name for d in devices)]
    tags += [f"gpu-arch=sm_{a}" for a in dict.fromkeys(d.arch for d in devices) if a is not None]
    memory = min(d.memory_total_bytes for d in devices) // 2**30
    tags.append(f"gpu-memory-gib={memory}")
    if report.inventory.cuda_version_text:
        tags.append(f"cuda-driver={report.inventory.cuda_version_text}")
    return tags


def gres_type(name: str) -> str:
    """The Slurm GRES type of a model: ``h100``, ``a100``, ``rtx_4090``, ``l40s``."""
    words = [w for w in name.split() if w.lower() not in VENDOR_WORDS]
    if not words:
        return "gpu"
    kind = words[0].split("-")[0].lower()
    if kind in {"rtx", "gtx", "titan"} and len(words) > 1:
        kind += "_" + words[1].split("-")[0].lower()
    return re.sub(r"[^a-z0-9_]", "", kind) or "gpu"


def gres_conf(report: DoctorReport) -> list[str]:
    """gres.conf lines for every GPU on the node (NVML's view, not CUDA_VISIBLE_DEVICES),
    with the matching slurm.conf ``Gres=`` in a comment; ``AutoDetect=nvml`` under MIG."""
    host = report.hostname.split(".")[0]
    devices = report.inventory.devices
    if not devices:
        return [f"# no NVIDIA GPU found on {host}: nothing to put in gres.conf"]
    counts = Counter(gres_type(d.name) for d in devices)
    lines = [
        f"# gres.conf for {host}, from gpu-matrix-service doctor",
        f"# slurm.conf: NodeName={host} Gres="
        + ",".join(f"gpu:{t}:{n}" for t, n in counts.items()),
    ]
    if any(d.mig_mode and d.mig_mode[0] for d in devices):
        return [
            *lines,
            "# MIG is on: let slurmd discover the MIG devices itself",
            "AutoDetect=nvml",
        ]
    lines += [
        f"NodeName={host} Name=gpu Type={gres_type(d.name)} File={d.device_file}" for d in devices
    ]
    return [*lines, "# or let slurmd find them itself (slurmd built with NVML): AutoDetect=nvml"]


def gpu_family(capability: tuple[int, int] | None) -> str:
    """The architecture family GPU Feature Discovery names (``hopper``, ``ada-lovelace``)."""
    if capability is None:
        return "undefined"
    major, minor = capability
    if major == 7:
        return "turing" if minor >= 5 else "volta"
    if major == 8:
        return "ada-lovelace" if minor >= 9 else "ampere"
    names = {3: "kepler", 5: "maxwell", 6: "pascal", 9: "hopper", 10: "blackwell", 12: "blackwell"}
    return names.get(major, "undefined")


def label_value(text: str) -> str:
    """A valid Kubernetes label value: [A-Za-z0-9._-], at most 63, alphanumeric at the ends."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip())[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def node_labels(report: DoctorReport) -> list[str]:
    """Node labels as GPU Feature Discovery names them (``nvidia.com/gpu.count=2``,
    ``nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3``...), for the node's first GPU model."""
    devices = report.inventory.devices
    if not devices:
        return ["nvidia.com/gpu.present=false", "nvidia.com/gpu.count=0"]
    first = devices[0]
    labels = {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.count": str(len(devices)),
        "nvidia.com/gpu.product": label_value(first.name),
        "nvidia.com/gpu.memory": str(first.memory_total_bytes // MiB),
        "nvidia.com/gpu.family": gpu_family(first.compute_capability),
        "nvidia.com/mig.capable": str(any(d.mig_mode is not None for d in devices)).lower(),
    }
    if first.compute_capability:
        labels["nvidia.com/gpu.compute.major"] = str(first.compute_capability[0])
        labels["nvidia.com/gpu.compute.minor"] = str(first.compute_capability[1])
    labels |= _version_labels(report)
    return [f"{key}={value}" for key, value in labels.items()]


def _version_labels(report: DoctorReport) -> dict[str, str]:
    labels = {}
    driver = report.inventory.driver_version
    if driver:
        parts = [*driver.split("."), "", ""][:3]
        labels["nvidia.com/cuda.driver-version.full"] = driver
        for key, part in zip(("major", "minor", "revision"), parts, strict=True):
            if part:
                labels[f"nvidia.com/cuda.driver-version.{key}"] = part
    cuda = report.inventory.cuda_version_text
    if cuda:
        major, minor = cuda.split(".")
        labels["nvidia.com/cuda.runtime-version.full"] = cuda
        labels["nvidia.com/cuda.runtime-version.major"] = major
        labels["nvidia.com/cuda.runtime-version.minor"] = minor
    return labels
