"""Checks that run real GPU code: which frameworks see the GPU, whether each backend gives the
right answers, which backend the service would pick, and how fast pinned copies and float32
matmul run compared with what the device should reach.

The work itself happens in :mod:`.probes` subprocesses; this module turns their answers into
verdicts. Performance below expectations only warns: a shared or throttled GPU is slow, not
broken.
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from gpu_matrix_service.doctor.checks import Check, problem
from gpu_matrix_service.doctor.library import LibraryLocation
from gpu_matrix_service.doctor.nvml_queries import DeviceFacts, NvmlInventory
from gpu_matrix_service.doctor.probe_runner import ProbeResult, ProbeRunner
from gpu_matrix_service.settings import Settings

MiB = 1024 * 1024
FRAMEWORK_TIMEOUT_S = 120.0
# Building the numba backend compiles every kernel (tens of seconds on a cold cache).
BACKENDS_TIMEOUT_S = 300.0
MEASURE_TIMEOUT_S = 120.0
COPY_BYTES = 256 * MiB
GEMM_N = 4096
MIN_BANDWIDTH_FRACTION = 0.5
MIN_MATMUL_FRACTION = 0.4
GPU_BACKENDS = ("cuda", "numba")
BACKEND_SETTINGS = {"backend", "devices", "kernel_lib"}
AUTO_ORDER = ("cuda", "numba", "cpu")
# Usable bytes/s per PCIe lane after line encoding, by generation.
PCIE_LANE_BYTES_PER_S = {1: 0.25e9, 2: 0.5e9, 3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.563e9}
# FP32 lanes per SM: 64 on Volta, Turing and A100; 128 from GA10x on.
FP32_LANES_PER_SM = {(7, 0): 64, (7, 2): 64, (7, 5): 64, (8, 0): 64}
NO_CUBLAS_HINT = (
    "cuBLAS was not found, so matmul runs on the CPU: install the CUDA toolkit libraries or "
    "the nvidia-cublas wheel matching the library's CUDA major version"
)


@dataclass(frozen=True)
class Framework:
    """A GPU framework doctor looks for; ``module`` is what is importable when installed."""

    name: str
    probe: str
    module: str
    optional: bool


FRAMEWORKS = (
    Framework("numba-cuda", "numba", "numba_cuda", optional=False),
    Framework("cupy", "cupy", "cupy", optional=True),
    Framework("pytorch", "torch", "torch", optional=True),
)


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported (looked up, not imported)."""
    return importlib.util.find_spec(module) is not None


def framework_checks(
    visible: Sequence[int],
    probe: ProbeRunner,
    gpu_expected: bool,
    installed: Callable[[str], bool] = is_installed,
) -> list[Check]:
    """numba-cuda (a dependency: it must see the GPU), CuPy and PyTorch (optional: they only
    warn), each probed in its own subprocess, all at once."""
    present = [f for f in FRAMEWORKS if installed(f.module)]
    with ThreadPoolExecutor(max_workers=len(FRAMEWORKS)) as pool:
        futures = {
            f.name: pool.submit(probe, "framework", {"name": f.probe}, FRAMEWORK_TIMEOUT_S)
            for f in present
        }
        answers = {name: future.result() for name, future in futures.items()}
    return [framework_check(f, answers.get(f.name), len(visible), gpu_expected) for f in FRAMEWORKS]


def framework_check(
    framework: Framework, answer: ProbeResult | None, visible: int, gpu_expected: bool
) -> Check:
    """The verdict on one framework from its probe's answer (None: not installed)."""
    required = gpu_expected and not framework.optional
    bad = "warn" if framework.optional else problem(required)
    name, group = framework.name, "frameworks"
    if answer is None:
        if framework.optional:
            return Check(name, group, "skip", "not installed (optional)")
        hint = f"reinstall the service: {name} is one of its dependencies"
        return Check(name, group, bad, "not installed", hint, required)
    if answer.data is None:
        hint = f"`python -c 'import {framework.probe}'` hangs or crashes: fix or reinstall {name}"
        return Check(name, group, bad, f"probe {answer.error}", hint, required)
    data = answer.data
    version = data.get("version", "?")
    if not data.get("sees_gpu"):
        value = f"{version}: sees no GPU ({data.get('error', 'no device')})"
        if not gpu_expected:
            return Check(name, group, "skip", value, data=data)
        hint = f"{name} cannot reach the driver or was built for another CUDA major version"
        return Check(name, group, bad, value, hint, required, data)
    value = (
        f"{version}: {data.get('devices')} GPU(s) ({data.get('name')}), "
        f"CUDA runtime {data.get('runtime')}"
    )
    if not data.get("computes"):
        hint = f"a tiny {name} computation gave a wrong answer: do not trust {name} here"
        return Check(name, group, bad, value + ", wrong answer", hint, required, data)
    if (data.get("devices") or 0) < visible:
        hint = f"{name} sees fewer GPUs than NVML shows visible: check CUDA_VISIBLE_DEVICES and MIG"
        return Check(name, group, "warn", value, hint, data=data)
    return Check(name, group, "pass", value, data=data)


EXIT_CRASH_HINT = (
    "the answers were right, but a service on this backend would crash when it stops (seen with "
    "numba-cuda 0.30 on two GPUs: its exit handlers unload a kernel module in another GPU's "
    "context); serve with the cuda backend, which auto picks, or limit GMS_DEVICES to one GPU"
)


def workload_checks(
    settings: Settings,
    inventory: NvmlInventory,
    visible: Sequence[int],
    lib: LibraryLocation,
    probe: ProbeRunner,
    gpu_expected: bool,
) -> list[Check]:
    """Each backend against NumPy, the backend the service would pick, then bandwidth and
    matmul throughput through the kernel library."""
    names = [n for n in AUTO_ORDER if n != "cuda" or lib.path is not None]
    # Only what backends read: the command line of a process is visible to every user.
    config = {
        **settings.model_dump(mode="json", include=BACKEND_SETTINGS),
        "kernel_lib": lib.path and str(lib.path),
    }
    # One process per backend, so a crash is pinned on the backend that crashed.
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        answer = probe("backends", {"settings": config, "names": [name]}, BACKENDS_TIMEOUT_S)
        if answer.data is None:
            results[name] = {"status": "error", "detail": f"probe {answer.error}"}
            continue
        result = dict(answer.data.get(name, {"status": "error", "detail": "no answer"}))
        if answer.error:
            result["exit_crash"] = answer.error
        results[name] = result
    results.setdefault("cuda", {"status": "unavailable", "detail": f"kernel library {lib.detail}"})
    missing = {"status": "error", "detail": "the probe did not answer for it"}
    checks = [backend_check(n, results.get(n, missing), gpu_expected) for n in AUTO_ORDER]
    checks.append(service_backend_check(settings, results, gpu_expected))
    if results["cuda"].get("status") != "ok" or lib.path is None:
        reason = "needs the cuda backend, which is not working here"
        return checks + [
            Check(name, "workload", "skip", reason)
            for name in ("pinned h2d", "pinned d2h", "matmul fp32")
        ]
    ordinals = list(range(len(visible)))
    args = {"path": str(lib.path), "ordinals": ordinals, "copy_bytes": COPY_BYTES, "gemm_n": GEMM_N}
    measured = probe("measure", args, MEASURE_TIMEOUT_S)
    by_index = {d.index: d for d in inventory.devices}
    return checks + measurement_checks(measured, [by_index[i] for i in visible])


def backend_check(name: str, result: dict[str, Any], gpu_expected: bool) -> Check:
    """One backend: built (probing every device) and computed the test cases right."""
    status, detail = result.get("status"), result.get("detail", "")
    label = f"backend {name}"
    if status == "ok":
        models = Counter(re.sub(r" \(cuda:\d+\)$", "", d) for d in result["devices"])
        on = ", ".join(f"{n}x {model}" if n > 1 else model for model, n in models.items())
        value = (
            f"{', '.join(result['checked'])} correct on {on} ({result['seconds']} s with start-up)"
        )
        if result.get("skipped") and name != "cpu":
            value += f"; not on the GPU: {', '.join(result['skipped'])}"
            return Check(label, "workload", "warn", value, NO_CUBLAS_HINT, data=result)
        if result.get("exit_crash"):
            value += f"; then its process {result['exit_crash']}"
            return Check(label, "workload", "warn", value, EXIT_CRASH_HINT, data=result)
        return Check(label, "workload", "pass", value, data=result)
    if status == "wrong":
        hint = (
            f"do not serve from this backend (GMS_BACKEND=another one) until it is fixed: {detail}"
        )
        return Check(label, "workload", "fail", f"WRONG ANSWER: {detail}", hint, True, result)
    if status == "error":
        hint = "the backend started but failed a computation: run doctor --json and see data"
        return Check(label, "workload", problem(gpu_expected), detail, hint, gpu_expected, result)
    if name not in GPU_BACKENDS:
        return Check(
            label, "workload", "fail", detail, "the NumPy backend must always work", True, result
        )
    if not gpu_expected:
        return Check(label, "workload", "skip", detail, data=result)
    return Check(
        label, "workload", "warn", detail, "see the toolkit and framework checks", data=result
    )


def service_backend_check(
    settings: Settings, results: dict[str, dict[str, Any]], gpu_expected: bool
) -> Check:
    """The backend the service would start with (GMS_BACKEND's, or auto's first that starts),
    and whether it then computes right."""
    status = {n: results.get(n, {}).get("status") for n in AUTO_ORDER}
    started = [n for n in AUTO_ORDER if status[n] in ("ok", "wrong", "error")]
    explicit = settings.backend != "auto"
    chosen = settings.backend if explicit else next(iter(started), None)
    how = f"GMS_BACKEND={chosen}" if explicit else f"auto picks {chosen}"
    if chosen is None or chosen not in started:
        detail = results.get(chosen or "", {}).get("detail", "nothing starts")
        return Check(
            "service backend",
            "workload",
            "fail",
            f"{how}, which cannot start: {detail}" if explicit else "no backend starts",
            "the service will not start: fix the backend, or set GMS_BACKEND=auto",
            True,
        )
    if status[chosen] != "ok":
        return Check(
            "service backend",
            "workload",
            "fail",
            f"{how}, which starts but then fails (see its row)",
            "requests would fail or be wrong: fix that backend or choose another with GMS_BACKEND",
            True,
        )
    if gpu_expected and chosen not in GPU_BACKENDS:
        return Check(
            "service backend",
            "workload",
            "fail",
            f"{how} although a GPU is expected",
            "no GPU backend works: see the backend rows above",
            True,
        )
    return Check("service backend", "workload", "pass", how)


def pcie_bytes_per_s(link: tuple[int, int] | None) -> float | None:
    """The theoretical bandwidth of a PCIe link (generation, lanes), bytes/s per direction."""
    if link is None or link[0] not in PCIE_LANE_BYTES_PER_S:
        return None
    return PCIE_LANE_BYTES_PER_S[link[0]] * link[1]


def fp32_peak_flops(device: DeviceFacts, sm_count: int | None) -> float | None:
    """FP32 peak FLOP/s: CUDA cores (NVML, else SMs x lanes per SM) x 2 x max SM clock."""
    if device.sm_clock_max_mhz is None:
        return None
    cores = device.cuda_cores
    if cores is None and sm_count and device.compute_capability:
        cores = sm_count * FP32_LANES_PER_SM.get(device.compute_capability, 128)
    return None if not cores else cores * 2 * device.sm_clock_max_mhz * 1e6


def measurement_checks(answer: ProbeResult, devices: Sequence[DeviceFacts]) -> list[Check]:
    """Pinned H2D and D2H bandwidth against the PCIe link, float32 matmul against FP32 peak."""
    if answer.data is None:
        return [Check("measurements", "workload", "warn", f"probe {answer.error}", "rerun doctor")]
    entries = answer.data.get("devices", [])
    rows = []
    for key, name in (("h2d", "pinned h2d"), ("d2h", "pinned d2h")):
        parts, slow = [], False
        for entry in entries:
            device = _device_for(entry, devices)
            measured = entry.get(f"{key}_bytes_per_s")
            if measured is None:
                parts.append(f"cuda:{entry['ordinal']} failed: {entry.get('error')}")
                slow = True
                continue
            expected = pcie_bytes_per_s(device.pcie_max if device else None)
            text = f"gpu{device.index if device else '?'} {measured / 1e9:.1f} GB/s"
            if expected:
                link = f"PCIe Gen{device.pcie_max[0]} x{device.pcie_max[1]}"
                text += f" ({measured / expected:.0%} of {link}, {expected / 1e9:.1f} GB/s)"
                slow |= measured < MIN_BANDWIDTH_FRACTION * expected
            parts.append(text)
        hint = (
            "below half the link's bandwidth: check the link (`nvidia-smi -q -d PCIE`), NUMA "
            "placement (run on the GPU's socket) and other transfers on the bus"
        )
        rows.append(_measure_row(name, parts, slow, hint, entries))
    rows.append(_matmul_row(entries, devices))
    return rows


def _matmul_row(entries: list[dict[str, Any]], devices: Sequence[DeviceFacts]) -> Check:
    parts, slow = [], False
    for entry in entries:
        device = _device_for(entry, devices)
        measured = entry.get("matmul_fp32_flops")
        if measured is None:
            parts.append(f"cuda:{entry['ordinal']}: {entry.get('error') or 'no cuBLAS'}")
            slow = True
            continue
        peak = fp32_peak_flops(device, entry.get("sm_count")) if device else None
        text = f"gpu{device.index if device else '?'} {measured / 1e12:.1f} TFLOP/s"
        if peak:
            text += f" ({measured / peak:.0%} of {peak / 1e12:.1f} FP32 peak)"
            slow |= measured < MIN_MATMUL_FRACTION * peak
        parts.append(text)
    hint = (
        "float32 matmul is slow: the GPU may be throttled or shared (see temperature and "
        "clocks, `nvidia-smi` for other processes), or cuBLAS missing"
    )
    return _measure_row("matmul fp32", parts, slow, hint, entries)


def _measure_row(
    name: str, parts: list[str], slow: bool, hint: str, entries: list[dict[str, Any]]
) -> Check:
    if not parts:
        return Check(name, "workload", "skip", "no device measured")
    verdict = "warn" if slow else "pass"
    return Check(
        name, "workload", verdict, "; ".join(parts), hint if slow else "", data={"devices": entries}
    )


def _device_for(entry: dict[str, Any], devices: Sequence[DeviceFacts]) -> DeviceFacts | None:
    ordinal = entry.get("ordinal", -1)
    return devices[ordinal] if 0 <= ordinal < len(devices) else None
