"""The ``gpu-matrix-service`` command: a thin skin (Typer + Rich) over the service's own core."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpu_matrix_service import __version__
from gpu_matrix_service.backends.registry import leave_if_exit_handlers_would_crash
from gpu_matrix_service.batch import run_command
from gpu_matrix_service.bench.compute import bench_compute
from gpu_matrix_service.bench.http import bench_http
from gpu_matrix_service.client import DEFAULT_URL, Client, OpResult, ServiceResponseError
from gpu_matrix_service.doctor.command import doctor_command
from gpu_matrix_service.ops import OPS
from gpu_matrix_service.settings import Settings

app = typer.Typer(
    name="gpu-matrix-service",
    help="Matrix operations on the GPU behind an HTTP API.",
    no_args_is_help=True,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

APP_FACTORY = "gpu_matrix_service.app:create_app"

UrlOption = Annotated[
    str, typer.Option("--url", envvar="GMS_URL", help="Base URL of a running service.")
]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", envvar="GMS_TOKEN", help="Bearer token, for a service with tokens."),
]
OutputOption = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write the result to this .npz file.")
]


def _apply_overrides(**overrides: Any) -> Settings:
    """Export CLI overrides as GMS_ variables (server workers read them), then validate all."""
    for key, value in overrides.items():
        if value is not None:
            os.environ[f"GMS_{key.upper()}"] = str(value)
    return Settings()


def _graceful_server_class() -> type:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, except that a SIGTERM/SIGINT shutdown ends with exit code 0.

        uvicorn re-raises the signal after its graceful shutdown, so the process dies by
        signal (exit -15) even when every request finished; orchestrators and CI read that as
        a crash. This handles the same signals the same way, without the re-raise.
        """

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return GracefulServer


def _uvicorn_log_config(level: str) -> dict[str, Any]:
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["gpu_matrix_service"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return config


# serve's options for --engine ray: not settings, so never exported as GMS_ variables.
RAY_OPTIONS = frozenset(
    {"ray_address", "replicas", "num_gpus", "num_cpus", "min_replicas", "max_replicas",
     "target_ongoing_requests"}
)  # fmt: skip


class Engine(StrEnum):
    """What runs the app: uvicorn on this machine, or Ray Serve replicas on a Ray cluster."""

    uvicorn = "uvicorn"
    ray = "ray"


def _opt(kind: type, env: str, text: str) -> Any:
    return Annotated[kind | None, typer.Option(help=f"{text} [{env}]", show_default=False)]


@app.command()
def serve(
    host: _opt(str, "GMS_HOST", "Address to listen on.") = None,
    port: _opt(int, "GMS_PORT or PORT", "Port.") = None,
    backend: _opt(str, "GMS_BACKEND", "auto, cuda, numba or cpu.") = None,
    workers: _opt(int, "GMS_WORKERS", "Worker processes.") = None,
    log_level: _opt(str, "GMS_LOG_LEVEL", "critical, error, warning, info or debug.") = None,
    devices: _opt(str, "GMS_DEVICES", "GPU ordinals, e.g. 0,1 (default: all).") = None,
    fallback: _opt(str, "GMS_FALLBACK", "On GPU out-of-memory: none (507) or cpu.") = None,
    kernel_lib: _opt(Path, "GMS_KERNEL_LIB", "Path of the CUDA C library.") = None,
    max_upload_bytes: _opt(int, "GMS_MAX_UPLOAD_BYTES", "Largest request body.") = None,
    max_array_elements: _opt(int, "GMS_MAX_ARRAY_ELEMENTS", "Most elements per operand.") = None,
    max_array_bytes: _opt(int, "GMS_MAX_ARRAY_BYTES", "Most data bytes per operand.") = None,
    max_array_dims: _opt(int, "GMS_MAX_ARRAY_DIMS", "Most dimensions per operand.") = None,
    verify_stored_crc: _opt(
        bool, "GMS_VERIFY_STORED_CRC", "Check CRCs of uncompressed .npz members."
    ) = None,
    max_json_result_elements: _opt(
        int, "GMS_MAX_JSON_RESULT_ELEMENTS", "Most elements for ?result=json."
    ) = None,
    compute_threads: _opt(int, "GMS_COMPUTE_THREADS", "Threads running computations.") = None,
    upload_threads: _opt(
        int, "GMS_UPLOAD_THREADS", "Threads checking large uploads as they arrive (0: none)."
    ) = None,
    launch_tiny: _opt(
        bool, "GMS_LAUNCH_TINY", "Launch tiny GPU work without waiting on the loop."
    ) = None,
    native_uploads: _opt(
        bool, "GMS_NATIVE_UPLOADS", "Read small two-file uploads with the C reader."
    ) = None,
    max_queued: _opt(int, "GMS_MAX_QUEUED", "Requests that may wait; beyond, 503.") = None,
    compute_timeout_seconds: _opt(
        float, "GMS_COMPUTE_TIMEOUT_SECONDS", "Per-request compute timeout (504)."
    ) = None,
    upload_timeout_seconds: _opt(
        float, "GMS_UPLOAD_TIMEOUT_SECONDS", "Longest an upload may take (408)."
    ) = None,
    max_matmul_macs: _opt(int, "GMS_MAX_MATMUL_MACS", "Most multiply-adds per matmul.") = None,
    shutdown_timeout_seconds: _opt(
        float, "GMS_SHUTDOWN_TIMEOUT_SECONDS", "Grace for in-flight requests on SIGTERM."
    ) = None,
    api_tokens: _opt(
        str,
        "GMS_API_TOKENS",
        "Bearer tokens, comma-separated (prefer the variable: flags show in ps).",
    ) = None,
    metrics_auth: _opt(bool, "GMS_METRICS_AUTH", "Require a token on /metrics too.") = None,
    cors_origins: _opt(str, "GMS_CORS_ORIGINS", "CORS origins, comma-separated.") = None,
    opentelemetry: _opt(
        bool, "GMS_OPENTELEMETRY", "FastAPI's OpenTelemetry (needs a provider)."
    ) = None,
    metrics_dir: _opt(Path, "GMS_METRICS_DIR", "Multiprocess metrics directory.") = None,
    instance: _opt(str, "GMS_INSTANCE", "Instance name for metrics.") = None,
    engine: Annotated[
        Engine, typer.Option(help="uvicorn (this machine) or ray (Ray Serve replicas).")
    ] = Engine.uvicorn,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="--engine ray: auto, HOST:PORT or ray://HOST:10001 (default: RAY_ADDRESS, "
            "a cluster on this node, else a new local one).",
            show_default=False,
        ),
    ] = None,
    replicas: Annotated[int, typer.Option(min=1, help="--engine ray: replicas.")] = 1,
    num_gpus: Annotated[
        float, typer.Option(min=0, help="--engine ray: GPUs per replica (0.5 shares one).")
    ] = 1.0,
    num_cpus: Annotated[float, typer.Option(min=0, help="--engine ray: CPUs per replica.")] = 1.0,
    min_replicas: Annotated[
        int | None,
        typer.Option(min=0, help="--engine ray: autoscale from this many.", show_default=False),
    ] = None,
    max_replicas: Annotated[
        int | None,
        typer.Option(min=1, help="--engine ray: autoscale up to this many.", show_default=False),
    ] = None,
    target_ongoing_requests: Annotated[
        float | None,
        typer.Option(
            min=0, help="--engine ray: ongoing requests per replica to aim at.", show_default=False
        ),
    ] = None,
) -> None:
    """Start the HTTP service (on the GPU when one works, else the CPU).

    Every option overrides the GMS_ environment variable in brackets; see the README's
    configuration table.
    """
    settings = _apply_overrides(
        **{k: v for k, v in locals().items() if k not in RAY_OPTIONS and k != "engine"}
    )
    if engine is Engine.ray:
        plan = {k: v for k, v in locals().items() if k in RAY_OPTIONS and k != "ray_address"}
        _serve_with_ray(settings, plan, ray_address)
        return
    import uvicorn

    if settings.workers > 1 or settings.metrics_dir is not None:
        settings = _prepare_multiprocess_metrics(settings)
    options: dict[str, Any] = {
        "factory": True,
        "host": settings.host,
        "port": settings.port,
        "workers": settings.workers,
        "log_level": settings.log_level,
        "log_config": _uvicorn_log_config(settings.log_level),
        # On SIGTERM: stop accepting, let in-flight requests finish, then run the lifespan
        # shutdown that releases GPU memory.
        "timeout_graceful_shutdown": settings.shutdown_timeout_seconds,
    }
    if settings.workers > 1:  # uvicorn's supervisor process manages the workers' signals
        uvicorn.run(APP_FACTORY, **options)
    else:
        _graceful_server_class()(uvicorn.Config(APP_FACTORY, **options)).run()


def _serve_with_ray(settings: Settings, plan_options: dict[str, Any], address: str | None) -> None:
    from gpu_matrix_service.engines import EngineUnavailable

    try:
        from gpu_matrix_service.engines.ray_serve import ReplicaPlan, serve_with_ray
    except EngineUnavailable as exc:
        err_console.print(f"[red]error[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    serve_with_ray(settings, ReplicaPlan(**plan_options), address)


def _prepare_multiprocess_metrics(settings: Settings) -> Settings:
    """Give the workers one fresh directory for prometheus-client's multiprocess files.

    prometheus-client reads PROMETHEUS_MULTIPROC_DIR when it is imported, so it must be in
    the environment before the workers start; stale files from an earlier run are removed.
    """
    directory = settings.metrics_dir or Path(tempfile.mkdtemp(prefix="gms-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return _apply_overrides(metrics_dir=directory)


def _print_result(out: OpResult, output: Path | None) -> None:
    if output is not None and out.result is not None:
        np.savez(output, result=out.result)
    table = Table(show_header=False, box=None)
    table.add_row("matrix_shape", str(out.matrix_shape))
    table.add_row("elapsed_time", f"{out.elapsed_time:.6f} s")
    table.add_row("device", out.device)
    table.add_row("backend", out.backend)
    table.add_row("dtype", out.dtype)
    for phase, seconds in out.timings.items():
        table.add_row(f"  {phase}", f"{seconds:.6f} s")
    if output is not None:
        table.add_row("written", str(output))
    console.print(table)


@app.command()
def add(
    a: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="First .npz/.npy.")],
    b: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Second .npz/.npy.")],
    url: UrlOption = DEFAULT_URL,
    output: OutputOption = None,
    token: TokenOption = None,
) -> None:
    """Add two matrices on a running service (POST /add)."""
    out = _call_service(url, token, lambda c: c.add(a, b, want_result=output is not None))
    _print_result(out, output)


@app.command("op")
def op_command(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(OPS)}.")],
    a: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="First .npz/.npy.")],
    b: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Second .npz/.npy.")],
    url: UrlOption = DEFAULT_URL,
    output: OutputOption = None,
    token: TokenOption = None,
    tf32: Annotated[bool, typer.Option(help="matmul: allow TF32 tensor cores.")] = False,
) -> None:
    """Apply an operation on a running service (POST /v1/ops/NAME)."""
    if name not in OPS:
        err_console.print(f"[red]error[/red] unknown op {name!r}; choose from {', '.join(OPS)}")
        raise typer.Exit(2)
    out = _call_service(
        url, token, lambda c: c.op(name, a, b, want_result=output is not None, allow_tf32=tf32)
    )
    _print_result(out, output)


@app.command()
def health(url: UrlOption = DEFAULT_URL, token: TokenOption = None) -> None:
    """Print a running service's /health and /gpu-info as JSON."""
    body = _call_service(url, token, lambda c: {"health": c.health(), "gpu_info": c.gpu_info()})
    console.print_json(json.dumps(body))


@app.command("build-kernels")
def build_kernels_command(
    output_dir: Annotated[
        Path | None, typer.Option(help="Where to write libgms_kernels.so (default: package).")
    ] = None,
    nvcc: Annotated[str | None, typer.Option(help="nvcc to use (default: on PATH).")] = None,
    arch: Annotated[
        list[str] | None, typer.Option(help="Architectures, e.g. sm_90 (repeatable; default all).")
    ] = None,
) -> None:
    """Compile the CUDA C library with nvcc (sm_75..sm_90 that nvcc supports, plus PTX)."""
    from gpu_matrix_service.backends.cuda.build import BuildError, build_kernels

    try:
        library = build_kernels(output_dir, nvcc, arch)
    except BuildError as exc:
        err_console.print(f"[red]error[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    console.print(f"built {library}")


@app.command("build-native")
def build_native_command(
    output_dir: Annotated[
        Path | None, typer.Option(help="Where to write libgms_whole_body.so (default: package).")
    ] = None,
    compiler: Annotated[str | None, typer.Option(help="C compiler (default: cc on PATH).")] = None,
) -> None:
    """Compile the C reader of small uploads (native/whole_body.c) with the C compiler."""
    from gpu_matrix_service.native.whole_body import NativeBuildError, build_whole_body_library

    try:
        library = build_whole_body_library(output_dir, compiler)
    except NativeBuildError as exc:
        err_console.print(f"[red]error[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    console.print(f"built {library}")


app.command("doctor")(doctor_command)

app.command("run")(run_command)

bench_app = typer.Typer(help="Benchmarks: the compute phase per backend, and HTTP end to end.")
app.add_typer(bench_app, name="bench")
bench_app.command("compute")(bench_compute)
bench_app.command("http")(bench_http)


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


def _call_service(url: str, token: str | None, action: Any) -> Any:
    """Run ``action(client)``; turn service errors and unreachable URLs into exit codes."""
    import httpx

    try:
        with Client(url, token=token) as client:
            return action(client)
    except ServiceResponseError as exc:
        err_console.print(f"[red]error[/red] HTTP {exc.status_code}: {escape(str(exc.detail))}")
        raise typer.Exit(1) from None
    except httpx.HTTPError as exc:
        err_console.print(f"[red]error[/red] cannot reach {url}: {escape(str(exc))}")
        raise typer.Exit(2) from None


def main() -> None:
    """Entry point of the ``gpu-matrix-service`` console script."""
    try:
        app()
    except SystemExit as done:  # Click ends every command this way, in success too
        if isinstance(done.code, str):
            err_console.print(done.code, markup=False)
            leave_if_exit_handlers_would_crash(1)
        else:
            leave_if_exit_handlers_would_crash(done.code or 0)
        raise
