"""The probes that touch CUDA: the code that runs inside the probe subprocesses.

:mod:`.probe_runner` starts ``python -m gpu_matrix_service.doctor.probes KIND 'JSON-ARGS'``;
the probe prints one JSON object on its last line of stdout and reports every failure it can
catch inside that object, so only a crash or a hang loses the answer. Nothing in doctor imports
this module (CUDA libraries load here, in the child, only).

Probes set CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA ordinals follow NVML's order, which is how
doctor matches a measurement to the GPU it was taken on.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

MiB = 1024 * 1024


def probe_library(path: str) -> dict[str, Any]:
    """Load the kernel library: its ABI, the CUDA runtime it was built with, the driver's
    CUDA version and each device (capability, SM count) as the runtime sees them."""
    from pathlib import Path

    from gpu_matrix_service.backends.cuda import binding

    try:
        library = binding.KernelLibrary(Path(path))
    except Exception as exc:  # any load failure is the answer
        return {"loaded": False, "error": str(exc)}
    answer: dict[str, Any] = {"loaded": True, "abi": binding.ABI_VERSION}
    try:
        answer["runtime"], answer["driver"] = library.runtime_versions()
        devices = [library.device_info(i) for i in range(library.device_count())]
    except Exception as exc:  # no driver or no device: the library itself loaded
        answer["cuda_error"] = str(exc)
        return answer
    answer["devices"] = [
        {"ordinal": d.ordinal, "name": d.name, "sm_count": d.sm_count, "capability": d.capability}
        for d in devices
    ]
    return answer


def probe_framework(name: str) -> dict[str, Any]:
    """Import one framework (numba, cupy, torch), count the GPUs it sees and check a tiny
    operation on the first one (a sum; a host-device round trip for numba)."""
    try:
        return FRAMEWORKS[name]()
    except Exception as exc:  # a broken install answers with its error
        return {"sees_gpu": False, "error": f"{type(exc).__name__}: {exc}"}


def _numba() -> dict[str, Any]:
    # A host-device round trip only: the numba backend check compiles and runs real kernels.
    from importlib.metadata import version

    import numpy as np
    from numba import cuda

    answer: dict[str, Any] = {"version": version("numba-cuda")}
    if not cuda.is_available():
        return {**answer, "sees_gpu": False, "error": " ".join(str(cuda.cuda_error()).split())}
    data = np.arange(4, dtype=np.int32)
    back = cuda.to_device(data).copy_to_host()
    device = cuda.get_current_device()
    try:
        runtime = ".".join(map(str, cuda.runtime.get_version()))
    except Exception as exc:  # the runtime library is optional for numba's driver API use
        runtime = f"unknown ({type(exc).__name__})"
    return {
        **answer,
        "sees_gpu": True,
        "devices": len(cuda.gpus),
        "name": _text(getattr(device, "name", "?")),  # the CUDA simulator has none
        "runtime": runtime,
        "computes": back.tolist() == data.tolist(),
    }


def _cupy() -> dict[str, Any]:
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    name = _text(cupy.cuda.runtime.getDeviceProperties(0)["name"]) if count else None
    runtime = cupy.cuda.runtime.runtimeGetVersion()
    return {
        "version": cupy.__version__,
        "sees_gpu": count > 0,
        "devices": count,
        "name": name,
        "runtime": f"{runtime // 1000}.{runtime % 1000 // 10}",
        "computes": count > 0 and (cupy.arange(4) + 1).get().tolist() == [1, 2, 3, 4],
    }


def _torch() -> dict[str, Any]:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    computes = count > 0 and (torch.arange(4, device="cuda") + 1).tolist() == [1, 2, 3, 4]
    return {
        "version": torch.__version__,
        "sees_gpu": count > 0,
        "devices": count,
        "name": torch.cuda.get_device_name(0) if count else None,
        "runtime": torch.version.cuda,
        "computes": computes,
    }


FRAMEWORKS: dict[str, Callable[[], dict[str, Any]]] = {
    "numba": _numba,
    "cupy": _cupy,
    "torch": _torch,
}


def probe_backends(settings: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Build each backend named (its constructor probes every device) and check add,
    multiply and matmul against NumPy; ``settings`` are :class:`Settings` fields."""
    from gpu_matrix_service.settings import Settings

    config = Settings(_env_file=None, **settings)
    return {name: _check_backend(name, config) for name in names}


def _check_backend(name: str, settings: Any) -> dict[str, Any]:
    import numpy as np

    from gpu_matrix_service.backends import registry
    from gpu_matrix_service.backends.base import BackendUnavailable, RunOptions
    from gpu_matrix_service.ops import OPS

    started = time.perf_counter()
    try:
        backend = registry.create_backend(name, settings)
    except BackendUnavailable as exc:
        return {"status": "unavailable", "detail": str(exc)}
    except Exception as exc:  # a constructor that breaks instead of declining is an error
        return {"status": "error", "detail": f"{type(exc).__name__}: {exc}"}
    rng = np.random.default_rng(11)
    cases = [
        ("add", rng.standard_normal(1 << 20).astype(np.float32), None),
        ("multiply", rng.integers(-1000, 1000, 1 << 16).astype(np.int64), None),
        ("matmul", rng.standard_normal((384, 256)), rng.standard_normal((256, 320))),
        ("matmul", rng.standard_normal((256, 512)).astype(np.float32), None),
    ]
    checked, skipped = [], []
    try:
        for op_name, a, b in cases:
            b = b if b is not None else (a.T.copy() if op_name == "matmul" else a[::-1].copy())
            label = f"{op_name}/{a.dtype}"
            if not backend.supports(OPS[op_name], a.dtype):
                skipped.append(label)
                continue
            got = backend.run(OPS[op_name], a, b, RunOptions()).array
            want = OPS[op_name].reference(a, b)
            exact = op_name != "matmul"
            if not (
                np.array_equal(got, want) if exact else np.allclose(got, want, rtol=1e-4, atol=1e-3)
            ):
                return {"status": "wrong", "detail": f"{label} differs from NumPy"}
            checked.append(label)
        devices = [d.name for d in backend.devices()]
    except Exception as exc:  # a failing run is the answer
        return {"status": "error", "detail": f"{type(exc).__name__}: {exc}"}
    finally:
        backend.close()
    seconds = round(time.perf_counter() - started, 2)
    return {
        "status": "ok",
        "checked": checked,
        "skipped": skipped,
        "devices": devices,
        "seconds": seconds,
    }


def probe_measure(path: str, ordinals: list[int], copy_bytes: int, gemm_n: int) -> dict[str, Any]:
    """Pinned H2D and D2H copy bandwidth (bytes/s) and float32 cuBLAS matmul throughput
    (FLOP/s, no TF32) on each CUDA ordinal, medians of 5 runs after a warm-up."""
    from pathlib import Path

    import numpy as np

    from gpu_matrix_service.backends.cuda import binding

    library = binding.KernelLibrary(Path(path))
    runtime, _ = library.runtime_versions()
    cublas = binding.load_cublas(library, runtime // 1000)
    devices = []
    for ordinal in ordinals or range(library.device_count()):
        entry: dict[str, Any] = {"ordinal": ordinal}
        try:
            props = library.device_info(ordinal)
            entry.update(name=props.name, sm_count=props.sm_count, capability=props.capability)
            for key, kind in (("h2d", binding.CopyKind.H2D), ("d2h", binding.CopyKind.D2H)):
                seconds = statistics.median(library.bench_copy(ordinal, kind, copy_bytes, 5))
                entry[f"{key}_bytes_per_s"] = copy_bytes / seconds
            if cublas is not None:
                seconds = statistics.median(
                    library.bench_gemm(ordinal, np.float32, False, gemm_n, 5)
                )
                entry["matmul_fp32_flops"] = 2 * gemm_n**3 / seconds
        except Exception as exc:  # one failing device must not hide the others
            entry["error"] = str(exc)
        devices.append(entry)
    return {"devices": devices, "cublas": cublas[1] if cublas else None, "gemm_n": gemm_n}


PROBES: dict[str, Callable[..., dict[str, Any]]] = {
    "library": probe_library,
    "framework": probe_framework,
    "backends": probe_backends,
    "measure": probe_measure,
}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def main(argv: list[str]) -> int:
    """``KIND [JSON-ARGS]``: run one probe and print its answer as one JSON line."""
    # Before any CUDA library loads: ordinals in PCI bus order, as NVML numbers the GPUs.
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    kind, args = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    print(json.dumps(PROBES[kind](**args), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
