"""``gpu-matrix-service bench http``: end-to-end load on the HTTP service, against its floor.

An async load generator (httpx) sends the same multipart upload from ``concurrency`` tasks for
``duration`` seconds and records each request's latency. Beside the service it starts (or is
pointed at) the receive-only floor of :mod:`gpu_matrix_service.bench.floor` on the same server
stack, so every figure comes with its ratio to what merely receiving the upload costs. Each
case alternates service and floor in ``rounds`` slices, so that both see the same machine.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console(width=150)
BOUNDARY = "gms-bench-boundary"


@dataclass
class LoadResult:
    """One target under one load: rates in requests/s, latencies in seconds.

    ``rps`` and the latency percentiles count successful (2xx) requests only.
    """

    target: str
    op: str
    size: int
    dtype: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    statuses: dict[str, int]
    rps: float
    p50_s: float
    p95_s: float
    p99_s: float
    upload_bytes: int
    clients: int = 1
    rounds: int = 1
    server_timings_s: dict[str, float] = field(default_factory=dict)
    latencies_s: list[float] = field(repr=False, default_factory=list)


def multipart_upload(size: int, dtype: str, seed: int = 0) -> tuple[bytes, str]:
    """A two-file multipart body of ``size`` x ``size`` random arrays (.npz), and its type."""
    rng = np.random.default_rng(seed)
    parts = []
    for name in ("file_a", "file_b"):
        buffer = io.BytesIO()
        np.savez(buffer, matrix=(rng.standard_normal((size, size)) * 10).astype(dtype))
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{name}.npz"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + buffer.getvalue()
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    return body, f"multipart/form-data; boundary={BOUNDARY}"


async def drive(
    url: str,
    body: bytes,
    content_type: str,
    *,
    concurrency: int,
    duration: float,
    token: str | None = None,
) -> tuple[list[float], dict[str, int], float, dict[str, list[float]]]:
    """POST ``body`` from ``concurrency`` tasks for ``duration`` s.

    Returns latencies, status counts, wall seconds, and the per-phase ``timings`` the service
    reported (decode, h2d, kernel, d2h, total), so the server's own share is visible.
    """
    headers = {"content-type": content_type}
    if token:
        headers["authorization"] = f"Bearer {token}"
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    phases: dict[str, list[float]] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            while True:  # at least one request each, so duration=0 is a warm-up
                sent = time.perf_counter()
                try:
                    response = await http.post(url, content=body, headers=headers)
                    status = str(response.status_code)
                    if response.is_success and b'"timings"' in response.content[:4096]:
                        for phase, seconds in response.json()["timings"].items():
                            phases.setdefault(phase, []).append(seconds)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                if status.startswith("2"):  # failures would skew the percentiles
                    latencies.append(time.perf_counter() - sent)
                statuses[status] = statuses.get(status, 0) + 1
                if time.perf_counter() >= deadline:
                    break

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return latencies, statuses, wall, phases


def drive_in_process(job: tuple[str, bytes, str, int, float, str | None]) -> tuple:
    """:func:`drive` in a separate load-generator process (picklable entry point)."""
    url, body, content_type, concurrency, duration, token = job
    return asyncio.run(
        drive(url, body, content_type, concurrency=concurrency, duration=duration, token=token)
    )


def drive_clients(
    url: str, body: bytes, content_type: str, *, clients: int, concurrency: int,
    duration: float, token: str | None,
) -> tuple:  # fmt: skip
    """:func:`drive` from ``clients`` processes sharing ``concurrency`` tasks, merged.

    One Python process tops out at a few hundred small requests per second; several are
    needed to load a service with several workers.
    """
    share = [concurrency // clients + (i < concurrency % clients) for i in range(clients)]
    jobs = [(url, body, content_type, n, duration, token) for n in share if n]
    with ProcessPoolExecutor(len(jobs)) as pool:
        runs = list(pool.map(drive_in_process, jobs))
    # The processes ran side by side: the wall time is the longest, not the sum.
    latencies, statuses, _, phases = merge_runs(runs)
    return latencies, statuses, max(run[2] for run in runs), phases


def summarize(
    target: str, op: str, size: int, dtype: str, concurrency: int, body: bytes, run: tuple
) -> LoadResult:
    """Rates and latency percentiles of one :func:`drive` run."""
    latencies, statuses, wall, phases = run
    ordered = sorted(latencies) or [float("nan")]

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    errors = sum(n for status, n in statuses.items() if not status.startswith("2"))
    return LoadResult(
        target, op, size, dtype, concurrency, wall, sum(statuses.values()), errors, statuses,
        len(latencies) / wall, statistics.median(ordered), pct(0.95), pct(0.99), len(body),
        server_timings_s={k: statistics.median(v) for k, v in phases.items()},
        latencies_s=latencies,
    )  # fmt: skip


@contextmanager
def local_server(kind: str, port: int, workers: int, backend: str) -> Iterator[str]:
    """Start the service or the floor on ``port`` (same uvicorn stack); yields its base URL."""
    if kind == "service":
        args = [sys.executable, "-m", "gpu_matrix_service", "serve", "--port", str(port),
                "--workers", str(workers), "--backend", backend,
                "--log-level", "warning"]  # fmt: skip
    else:
        args = [sys.executable, "-m", "uvicorn", "--factory",
                "gpu_matrix_service.bench.floor:create_floor_app", "--port", str(port),
                "--workers", str(workers), "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll ``url``'s ``/health/ready`` until it answers 200; raise if ``process`` exits first
    (with its stderr, when captured) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stderr or process.stdout
            raise RuntimeError(f"{url} exited early:\n{output.read() if output else ''}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def compare(results: list[LoadResult]) -> list[dict[str, Any]]:
    """Service over floor, per size and concurrency: latency and rate ratios."""
    floors = {(r.size, r.concurrency): r for r in results if r.target == "floor"}
    rows = []
    for r in results:
        floor = floors.get((r.size, r.concurrency))
        if r.target != "service" or floor is None:
            continue
        rows.append({
            "size": r.size, "concurrency": r.concurrency,
            "p50_ratio": r.p50_s / floor.p50_s, "rate_ratio": r.rps / floor.rps,
        })  # fmt: skip
    return rows


def render(results: list[LoadResult], ratios: list[dict[str, Any]]) -> None:
    """Print the results and the ratios as Rich tables."""
    table = Table(title="bench http")
    for column in ("target", "op", "size", "conc.", "req", "err", "req/s", "p50 ms", "p95 ms",
                   "p99 ms", "MB/req", "srv decode ms", "srv compute ms"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r.target, r.op, f"{r.size}x{r.size}", str(r.concurrency), str(r.requests),
            str(r.errors), f"{r.rps:.1f}", f"{r.p50_s * 1e3:.1f}", f"{r.p95_s * 1e3:.1f}",
            f"{r.p99_s * 1e3:.1f}", f"{r.upload_bytes / 1e6:.1f}",
            _ms(r.server_timings_s.get("decode")), _ms(r.server_timings_s.get("total")),
        )  # fmt: skip
    console.print(table)
    if ratios:
        ratio_table = Table(title="service / receive-only floor")
        for column in ("size", "concurrency", "p50 latency ratio", "rate ratio"):
            ratio_table.add_column(column, justify="right")
        for row in ratios:
            ratio_table.add_row(
                f"{row['size']}x{row['size']}", str(row["concurrency"]),
                f"{row['p50_ratio']:.2f}x", f"{row['rate_ratio']:.2f}x",
            )  # fmt: skip
        console.print(ratio_table)


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.2f}"


def plot(results: list[LoadResult], path: Path) -> None:
    """Latency distributions per case (service and floor) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        raise typer.BadParameter(
            "--plot needs matplotlib: pip install 'gpu-matrix-service[plot]'"
        ) from None
    cases = sorted({(r.size, r.concurrency) for r in results})
    figure, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4), squeeze=False)
    for axis, (size, concurrency) in zip(axes[0], cases, strict=True):
        for r in results:
            if (r.size, r.concurrency) == (size, concurrency) and r.latencies_s:
                ordered = np.sort(np.array(r.latencies_s) * 1e3)
                axis.plot(ordered, np.linspace(0, 1, len(ordered)), label=f"{r.target}")
        axis.set(title=f"{size}x{size}, concurrency {concurrency}", xlabel="latency (ms)",
                 ylabel="fraction of requests", xscale="log")  # fmt: skip
        # Labels at 1, 2 and 5 per decade as plain numbers: the default labels every minor
        # tick in powers of ten, which overlap within one decade.
        axis.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def bench_http(
    url: Annotated[str | None, typer.Option(help="A running service (default: start one).")] = None,
    floor_url: Annotated[
        str | None, typer.Option(help="A running floor (default: start one beside).")
    ] = None,
    no_floor: Annotated[bool, typer.Option("--no-floor", help="Skip the floor.")] = False,
    op: Annotated[str, typer.Option(help="Operation to call.")] = "add",
    size: Annotated[list[int] | None, typer.Option(help="n for n x n (repeatable).")] = None,
    dtype: Annotated[str, typer.Option(help="Operand dtype.")] = "float32",
    concurrency: Annotated[list[int] | None, typer.Option(help="Tasks (repeatable).")] = None,
    duration: Annotated[float, typer.Option(help="Seconds per case.")] = 10.0,
    workers: Annotated[int, typer.Option(help="Server workers when started here.")] = 1,
    clients: Annotated[
        int, typer.Option(min=1, help="Load-generator processes sharing the concurrency.")
    ] = 1,
    rounds: Annotated[
        int, typer.Option(min=1, help="Slices per case, alternating service and floor.")
    ] = 3,
    backend: Annotated[str, typer.Option(help="Backend when started here.")] = "auto",
    token: Annotated[str | None, typer.Option(envvar="GMS_TOKEN", help="Bearer token.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Write a PNG here.")] = None,
) -> None:
    """Load the HTTP service and its receive-only floor; print req/s and p50/p95/p99."""
    sizes, concurrencies = size or [64, 4096], concurrency or [1, 32]
    with ExitStack() as stack:
        service = url or stack.enter_context(local_server("service", free_port(), workers, backend))
        floor = None
        if not no_floor:
            floor = floor_url or stack.enter_context(
                local_server("floor", free_port(), workers, backend)
            )
        results = _run_cases(
            service, floor, op, sizes, dtype, concurrencies, duration, token, clients, rounds
        )
    ratios = compare(results)
    render(results, ratios)
    if json_path is not None:
        payload = {"results": [_without_samples(r) for r in results], "ratios": ratios}
        json_path.write_text(json.dumps(payload, indent=2))
    if plot_path is not None:
        plot(results, plot_path)
        console.print(f"plot written to {plot_path}")


def _run_cases(
    service: str, floor: str | None, op: str, sizes: list[int], dtype: str,
    concurrencies: list[int], duration: float, token: str | None, clients: int = 1,
    rounds: int = 1,
) -> list[LoadResult]:  # fmt: skip
    """Each case's ``duration`` per target, in ``rounds`` slices that alternate service and
    floor: drift on a shared machine (another tenant, clocks, the page cache) then weighs on
    both alike instead of on whichever ran second."""
    targets = [("service", service)] + ([("floor", floor)] if floor else [])
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        for n in sizes:
            body, content_type = multipart_upload(n, dtype)
            for conc in concurrencies:
                task = progress.add_task(f"{n}x{n} c={conc}", total=duration * len(targets))
                for _, base in targets:  # one warm-up request keeps start-up costs out
                    asyncio.run(drive(f"{base}/v1/ops/{op}", body, content_type,
                                      concurrency=1, duration=0.0, token=token))  # fmt: skip
                runs: dict[str, list[tuple]] = {name: [] for name, _ in targets}
                for _ in range(rounds):
                    for name, base in targets:
                        url, share = f"{base}/v1/ops/{op}", duration / rounds
                        if clients > 1:
                            run = drive_clients(url, body, content_type, clients=clients,
                                                concurrency=conc, duration=share,
                                                token=token)  # fmt: skip
                        else:
                            run = asyncio.run(drive(url, body, content_type, concurrency=conc,
                                                    duration=share, token=token))  # fmt: skip
                        runs[name].append(run)
                        progress.advance(task, share)
                for name, _ in targets:
                    result = summarize(name, op, n, dtype, conc, body, merge_runs(runs[name]))
                    result.clients, result.rounds = clients, rounds
                    results.append(result)
                progress.remove_task(task)
    return results


def merge_runs(runs: list[tuple]) -> tuple:
    """Several :func:`drive` results as one: latencies and timings pooled, status counts and
    wall seconds summed."""
    latencies = [x for run in runs for x in run[0]]
    statuses: dict[str, int] = {}
    phases: dict[str, list[float]] = {}
    for _, run_statuses, _, run_phases in runs:
        for status, n in run_statuses.items():
            statuses[status] = statuses.get(status, 0) + n
        for phase, values in run_phases.items():
            phases.setdefault(phase, []).extend(values)
    return latencies, statuses, sum(run[2] for run in runs), phases


def _without_samples(result: LoadResult) -> dict[str, Any]:
    fields = asdict(result)
    fields.pop("latencies_s")
    return fields
