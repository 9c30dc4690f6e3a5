"""``gpu-matrix-service bench compute``: the compute phase per backend, op, dtype and size.

Each backend runs through the same :class:`~gpu_matrix_service.backends.base.Backend` call the
service makes, on operands decoded the way the service decodes them (into ``empty_host``), and
the reported ``Result.timings["total"]`` is measured: the median of repeated runs after warm-up.
Next to it: the machine's ceilings (pinned and pageable copy bandwidth, device-to-device
bandwidth, cuBLAS rate), the floor they imply for each case, and the lab's naive float32 add.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Final

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from gpu_matrix_service.backends.base import Backend, BackendUnavailable, RunOptions
from gpu_matrix_service.backends.cuda.binding import CopyKind, KernelLibrary, locate_library
from gpu_matrix_service.backends.registry import create_backend
from gpu_matrix_service.errors import BackendFailure
from gpu_matrix_service.ops import OPS, Op
from gpu_matrix_service.settings import Settings

log = logging.getLogger(__name__)

GB: Final = 1e9
COPY_BYTES: Final = 256 * 1024 * 1024
GEMM_SIZE: Final = 8192
WARMUP_RUNS: Final = 3
FLOAT_DTYPES: Final = ("float32", "float64")
# The targets, for an H100 and float32: (op, size, limit).
ADD_FLOOR_LIMIT: Final = 1.5
ADD_BASELINE_SPEEDUP: Final = 5.0
MATMUL_FLOOR_LIMIT: Final = 1.25


@dataclass
class Ceilings:
    """What the machine can do at best, measured here: bandwidths in GB/s, rates in TFLOP/s."""

    device: str
    h2d_gbps: float
    d2h_gbps: float
    both_directions_gbps: float
    d2d_gbps: float
    pageable_h2d_gbps: float
    pageable_d2h_gbps: float
    cublas_tflops: dict[str, float]


@dataclass
class Measurement:
    """One backend, op, dtype and size: median seconds of the compute phase, per phase too."""

    backend: str
    op: str
    dtype: str
    size: int
    device: str
    runs: int
    median_s: float
    phases_s: dict[str, float]
    floor_s: float | None = None
    baseline_s: float | None = None


def measure_ceilings(library: KernelLibrary, ordinal: int, device: str) -> Ceilings:
    """Copy bandwidths over 256 MiB and cuBLAS rates at 8192^3, medians of repeated runs."""

    def gbps(kind: CopyKind, iterations: int, directions: int = 1) -> float:
        seconds = statistics.median(library.bench_copy(ordinal, kind, COPY_BYTES, iterations))
        return directions * COPY_BYTES / seconds / GB

    def tflops(dtype: str, tf32: bool) -> float:
        try:
            runs = library.bench_gemm(ordinal, np.dtype(dtype), tf32, GEMM_SIZE, 5)
        except BackendFailure as exc:  # no cuBLAS here: no rate, and no matmul floor
            log.warning("bench: cuBLAS rate not measured: %s", exc.detail)
            return float("nan")
        return 2 * GEMM_SIZE**3 / statistics.median(runs) / 1e12

    return Ceilings(
        device=device,
        h2d_gbps=gbps(CopyKind.H2D, 10),
        d2h_gbps=gbps(CopyKind.D2H, 10),
        both_directions_gbps=gbps(CopyKind.BOTH, 10, directions=2),
        d2d_gbps=gbps(CopyKind.D2D, 10, directions=2),  # bytes read plus bytes written
        pageable_h2d_gbps=gbps(CopyKind.H2D_PAGEABLE, 5),
        pageable_d2h_gbps=gbps(CopyKind.D2H_PAGEABLE, 5),
        cublas_tflops={
            "float32": tflops("float32", False),
            "tf32": tflops("float32", True),
            "float64": tflops("float64", False),
        },
    )


def floor_seconds(op: Op, dtype: np.dtype, size: int, ceilings: Ceilings) -> float:
    """The fastest a GPU could do this request from pinned host memory, in seconds.

    Elementwise: two operands in and one out with both directions overlapped. Matmul:
    operands in and result out at pinned bandwidth, plus cuBLAS's time for the product.
    """
    operand = size * size * np.dtype(dtype).itemsize
    if op.elementwise:
        return max(
            2 * operand / (ceilings.h2d_gbps * GB),
            operand / (ceilings.d2h_gbps * GB),
            3 * operand / (ceilings.both_directions_gbps * GB),
        )
    product = 2 * size**3 / (ceilings.cublas_tflops[np.dtype(dtype).name] * 1e12)
    return 2 * operand / (ceilings.h2d_gbps * GB) + operand / (ceilings.d2h_gbps * GB) + product


def random_operand(
    backend: Backend, shape: tuple[int, int], dtype: np.dtype, seed: int
) -> np.ndarray:
    """Random (never zero) data in the backend's host memory, as the service's decoder fills."""
    rng = np.random.default_rng(seed)
    out = backend.empty_host(shape, dtype)
    if np.dtype(dtype).kind == "f":
        out[...] = rng.standard_normal(shape)
    else:
        out[...] = rng.integers(-1000, 1000, size=shape, dtype=dtype)
    return out


def measure(
    backend: Backend, op: Op, dtype: np.dtype, size: int, repeats: int, budget_s: float
) -> Measurement:
    """Median ``Result.timings`` of ``op`` on two random size x size operands, after
    ``WARMUP_RUNS`` untimed runs.

    Warms up and then runs ``repeats`` times, each stopping early (after at least one run)
    once ``budget_s`` seconds have passed.
    """
    a = random_operand(backend, (size, size), dtype, seed=1)
    b = random_operand(backend, (size, size), dtype, seed=2)
    options = RunOptions()
    # Warm-up: module load, library handles, pool blocks, first DMA to fresh pinned pages.
    started = time.perf_counter()
    device = backend.run(op, a, b, options).device_name
    for _ in range(WARMUP_RUNS - 1):
        if time.perf_counter() - started > budget_s:
            break
        backend.run(op, a, b, options)
    samples: list[dict[str, float]] = []
    started = time.perf_counter()
    while len(samples) < repeats and (not samples or time.perf_counter() - started < budget_s):
        samples.append(dict(backend.run(op, a, b, options).timings))
    phases = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    return Measurement(
        backend=backend.name,
        op=op.name,
        dtype=np.dtype(dtype).name,
        size=size,
        device=device,
        runs=len(samples),
        median_s=phases["total"],
        phases_s=phases,
    )


def measure_naive_add(library: KernelLibrary, ordinal: int, size: int, repeats: int) -> float:
    """Median wall seconds of the lab's float32 add (per-call cudaMalloc, pageable copies)."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(a)
    library.naive_add(ordinal, a, b, out)
    if not np.array_equal(out, a + b):
        raise RuntimeError("the naive add baseline computed a wrong sum")
    return statistics.median(library.naive_add(ordinal, a, b, out) for _ in range(repeats))


def open_backends(names: list[str], settings: Settings) -> dict[str, Backend]:
    """The named backends that start on this machine (the others are logged and skipped)."""
    backends: dict[str, Backend] = {}
    for name in names:
        try:
            backends[name] = create_backend(name, settings)
        except (BackendUnavailable, ImportError, AttributeError) as exc:
            log.warning("bench: backend %s skipped: %s", name, exc)
    return backends


def run_cases(
    backends: dict[str, Backend],
    ops: list[str],
    dtypes: list[str],
    sizes: list[int],
    matmul_sizes: list[int],
    repeats: int,
    budget_s: float,
) -> list[Measurement]:
    """Every supported (backend, op, dtype, size); matmul only over floating dtypes."""
    results = []
    for op_name in ops:
        op = OPS[op_name]
        for dtype_name in dtypes if op.elementwise else [d for d in dtypes if d in FLOAT_DTYPES]:
            dtype = np.dtype(dtype_name)
            for size in sizes if op.elementwise else matmul_sizes:
                for backend in backends.values():
                    if not backend.supports(op, dtype):
                        continue
                    results.append(measure(backend, op, dtype, size, repeats, budget_s))
                    log.info("bench: %s", results[-1])
    return results


def targets(results: list[Measurement]) -> list[dict[str, object]]:
    """The issue's three float32 targets for the cuda backend, where those cases were run."""
    checks = []
    for m in results:
        if m.backend != "cuda" or m.dtype != "float32" or m.floor_s is None:
            continue
        if m.op == "add" and m.size == 4096:
            checks.append(
                _target(
                    "add 4096² vs overlapped PCIe floor",
                    m.median_s / m.floor_s,
                    ADD_FLOOR_LIMIT,
                    "<=",
                )
            )
            if m.baseline_s is not None:
                checks.append(
                    _target(
                        "add 4096² speed-up over lab baseline",
                        m.baseline_s / m.median_s,
                        ADD_BASELINE_SPEEDUP,
                        ">=",
                    )
                )
        if m.op == "matmul" and m.size == 8192:
            checks.append(
                _target(
                    "matmul 8192² vs transfers + cuBLAS",
                    m.median_s / m.floor_s,
                    MATMUL_FLOOR_LIMIT,
                    "<=",
                )
            )
    return checks


def _target(name: str, value: float, limit: float, sense: str) -> dict[str, object]:
    met = value <= limit if sense == "<=" else value >= limit
    return {"target": name, "value": round(value, 3), "limit": f"{sense} {limit}", "met": met}


COLUMNS: Final = (
    "backend", "op", "dtype", "size", "runs", "total", "h2d", "kernel", "d2h", "rate", "floor",
    "x floor", "lab",
)  # fmt: skip


def rate(m: Measurement) -> str:
    """Elementwise: GB/s of operands and result moved; matmul: TFLOP/s."""
    operand = m.size * m.size * np.dtype(m.dtype).itemsize
    if OPS[m.op].elementwise:
        return f"{3 * operand / m.median_s / GB:,.1f} GB/s"
    return f"{2 * m.size**3 / m.median_s / 1e12:,.2f} TFLOP/s"


def measurement_row(m: Measurement) -> list[str]:
    """One table row, times in milliseconds (a CPU's ``compute`` shows as ``kernel``)."""
    ms = {key: f"{value * 1e3:.3f}" for key, value in m.phases_s.items()}
    ms.setdefault("kernel", ms.get("compute", ""))
    return [
        m.backend,
        m.op,
        m.dtype,
        str(m.size),
        str(m.runs),
        ms["total"],
        ms.get("h2d", ""),
        ms["kernel"],
        ms.get("d2h", ""),
        rate(m),
        f"{m.floor_s * 1e3:.3f}" if m.floor_s else "",
        f"{m.median_s / m.floor_s:.2f}" if m.floor_s else "",
        f"{m.baseline_s * 1e3:.3f}" if m.baseline_s else "",
    ]


def render(
    console: Console,
    ceilings: Ceilings | None,
    results: list[Measurement],
    checks: list[dict[str, object]],
) -> None:
    """Rich tables: the ceilings, every measurement (ms), and the targets."""
    if ceilings is not None:
        table = Table("what", "measured", title=f"Ceilings on {ceilings.device}")
        for key, value in asdict(ceilings).items():
            if isinstance(value, float):
                table.add_row(key, f"{value:,.1f}")
        for key, value in ceilings.cublas_tflops.items():
            table.add_row(f"cuBLAS {key} TFLOP/s", f"{value:,.1f}")
        console.print(table)
    table = Table(*COLUMNS, title="Compute phase, median ms (phases overlap: may sum to more)")
    for m in results:
        table.add_row(*measurement_row(m))
    console.print(table)
    if checks:
        table = Table("target", "value", "limit", "met", title="Targets (cuda, float32)")
        for check in checks:
            table.add_row(*(str(check[c]) for c in ("target", "value", "limit", "met")))
        console.print(table)


def bench_compute(
    backend: Annotated[list[str] | None, typer.Option(help="Backends (repeatable).")] = None,
    op: Annotated[list[str] | None, typer.Option(help="Operations (repeatable).")] = None,
    dtype: Annotated[list[str] | None, typer.Option(help="Dtypes (repeatable).")] = None,
    size: Annotated[list[int] | None, typer.Option(help="Elementwise n for n x n.")] = None,
    matmul_size: Annotated[list[int] | None, typer.Option(help="Matmul n for n x n.")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per case.")] = 10,
    budget: Annotated[float, typer.Option(help="Stop repeating a case after this, s.")] = 3.0,
    ceilings: Annotated[bool, typer.Option(help="Measure the machine's ceilings.")] = True,
    json_path: Annotated[Path, typer.Option("--json", help="Where to write results.")] = Path(
        "bench-compute.json"
    ),
) -> dict[str, object]:
    """Measure the compute phase of each backend; print tables, write JSON, return it."""
    settings = Settings()
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough for every column
        console = Console(width=150)
    backends = open_backends(backend or ["cuda", "numba", "cpu"], settings)
    cuda = backends.get("cuda")
    library, ordinal, measured = None, 0, None
    if cuda is not None:
        library = KernelLibrary(locate_library(settings.kernel_lib))
        first = cuda.devices()[0]
        ordinal = first.index
        if ceilings:
            measured = measure_ceilings(library, ordinal, f"{first.name} (cuda:{ordinal})")
    results = run_cases(
        backends,
        op or list(OPS),
        dtype or ["float32", "float64", "int32", "int64"],
        size or [1024, 4096],
        matmul_size or [1024, 4096, 8192],
        repeats,
        budget,
    )
    baselines: dict[int, float] = {}
    for m in results:
        if m.backend in ("cuda", "numba") and measured is not None:
            m.floor_s = floor_seconds(OPS[m.op], np.dtype(m.dtype), m.size, measured)
        if library is not None and m.op == "add" and m.dtype == "float32":
            if m.size not in baselines:
                baselines[m.size] = measure_naive_add(library, ordinal, m.size, repeats)
            m.baseline_s = baselines[m.size]
    checks = targets(results)
    render(console, measured, results, checks)
    report: dict[str, object] = {
        "ceilings": asdict(measured) if measured else None,
        "results": [asdict(m) for m in results],
        "targets": checks,
    }
    json_path.write_text(json.dumps(report, indent=2))
    console.print(f"results written to {json_path}")
    for instance in backends.values():
        instance.close()
    return report


compute_app = typer.Typer(add_completion=False, help=__doc__)
compute_app.command("compute")(bench_compute)

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    typer.run(bench_compute)
