"""The ``gpu-matrix-service`` command: a thin skin (Typer + Rich) over the service's own core."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from gpu_matrix_service import __version__
from gpu_matrix_service.client import DEFAULT_URL, Client, OpResult, ServiceResponseError
from gpu_matrix_service.ops import OPS
from gpu_matrix_service.settings import Settings

app = typer.Typer(
    name="gpu-matrix-service",
    help="Matrix operations on the GPU behind an HTTP API.",
    no_args_is_help=True,
    pretty_exit_exceptions=False,
)
console = Console()
err_console = Console(stderr=True)

UrlOption = Annotated[
    str, typer.Option("--url", envvar="GMS_URL", help="Base URL of a running service.")
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


def _uvicorn_log_config(level: str) -> dict[str, Any]:
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["gpu_matrix_service"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return config


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on [GMS_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [GMS_PORT or PORT].")] = None,
    backend: Annotated[
        str | None, typer.Option(help="auto, cuda, numba or cpu [GMS_BACKEND].")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes [GMS_WORKERS].")] = None,
    log_level: Annotated[str | None, typer.Option(help="Log level [GMS_LOG_LEVEL].")] = None,
) -> None:
    """Start the HTTP service (on the GPU when one works, else the CPU)."""
    import uvicorn

    settings = _apply_overrides(
        host=host, port=port, backend=backend, workers=workers, log_level=log_level
    )
    uvicorn.run(
        "gpu_matrix_service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        log_config=_uvicorn_log_config(settings.log_level),
    )


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
) -> None:
    """Add two matrices on a running service (POST /add)."""
    out = _call_service(url, lambda c: c.add(a, b, want_result=output is not None))
    _print_result(out, output)


@app.command("op")
def op_command(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(OPS)}.")],
    a: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="First .npz/.npy.")],
    b: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Second .npz/.npy.")],
    url: UrlOption = DEFAULT_URL,
    output: OutputOption = None,
    tf32: Annotated[bool, typer.Option(help="matmul: allow TF32 tensor cores.")] = False,
) -> None:
    """Apply an operation on a running service (POST /v1/ops/NAME)."""
    if name not in OPS:
        err_console.print(f"[red]error[/red] unknown op {name!r}; choose from {', '.join(OPS)}")
        raise typer.Exit(2)
    out = _call_service(
        url, lambda c: c.op(name, a, b, want_result=output is not None, allow_tf32=tf32)
    )
    _print_result(out, output)


@app.command()
def health(url: UrlOption = DEFAULT_URL) -> None:
    """Print a running service's /health and /gpu-info as JSON."""
    body = _call_service(url, lambda c: {"health": c.health(), "gpu_info": c.gpu_info()})
    console.print_json(json.dumps(body))


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


def _call_service(url: str, action: Any) -> Any:
    """Run ``action(client)``; turn service errors and unreachable URLs into exit codes."""
    import httpx

    try:
        with Client(url) as client:
            return action(client)
    except ServiceResponseError as exc:
        err_console.print(f"[red]error[/red] HTTP {exc.status_code}: {exc.detail}")
        raise typer.Exit(1) from None
    except httpx.HTTPError as exc:
        err_console.print(f"[red]error[/red] cannot reach {url}: {exc}")
        raise typer.Exit(2) from None


def main() -> None:
    """Entry point of the ``gpu-matrix-service`` console script."""
    app()
