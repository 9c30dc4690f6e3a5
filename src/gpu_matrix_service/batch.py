"""``gpu-matrix-service run``: one operation on two array files, without a server.

For batch jobs (a Slurm job array over many input pairs, see ``deploy/slurm/``): the same
decoder, limits, operation table, backends and fallback as the HTTP service, through the same
:class:`~gpu_matrix_service.compute.ComputeService`; the result goes to an ``.npz`` file with
the key ``result``, as ``?result=npz`` returns it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpu_matrix_service.arrays import encode_npz
from gpu_matrix_service.backends.base import BackendUnavailable, Result, RunOptions
from gpu_matrix_service.compute import ComputeService, NamedBytes
from gpu_matrix_service.errors import BadArrayInput, ServiceError
from gpu_matrix_service.ops import OPS, get_op
from gpu_matrix_service.settings import Settings

RESULT_KEY = "result"


def run_op_files(
    op_name: str,
    a_path: Path,
    b_path: Path,
    output: Path | None,
    settings: Settings,
    *,
    allow_tf32: bool = False,
) -> Result:
    """Compute ``op_name(a, b)`` from two ``.npy``/``.npz`` files; write it to ``output``.

    The result's ``timings`` (seconds) hold ``decode``, the backend's phases (``total`` is the
    compute time, as ``elapsed_time`` in the API) and, with an ``output``, ``write``. Raises
    :class:`ServiceError` subclasses for bad input (unreadable file, shapes, dtypes, limits)
    and :class:`BackendUnavailable` when the configured backend cannot start.
    """
    op = get_op(op_name)
    a = NamedBytes(str(a_path), _read_operand(a_path))
    b = NamedBytes(str(b_path), _read_operand(b_path))
    service = ComputeService(settings)
    try:
        result, decode_seconds = service.compute_sync(op, a, b, RunOptions(allow_tf32))
    finally:
        service.close()
    timings = {"decode": decode_seconds, **result.timings}
    if output is not None:
        start = time.perf_counter()
        write_result_npz(result, output)
        timings["write"] = time.perf_counter() - start
    return dataclasses.replace(result, timings=timings)


def _read_operand(path: Path) -> bytes:
    # Whole-file reads keep batch code simple; the HTTP path streams because it cannot know
    # sizes up front. The decoder still checks the array limits before it allocates.
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadArrayInput(f"cannot read {path}: {exc.strerror or exc}") from None


def write_result_npz(result: Result, output: Path) -> None:
    """Write ``result.array`` as an ``.npz`` (key ``result``), atomically.

    A job array's tasks are often judged by whether their output exists: a temporary file
    renamed into place means a crash never leaves a half-written result behind.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        partial.write_bytes(encode_npz(result.array, key=RESULT_KEY))
        partial.replace(output)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise BadArrayInput(f"cannot write {output}: {exc.strerror or exc}") from None


def result_summary(op_name: str, result: Result, output: Path | None) -> dict[str, Any]:
    """The fields the HTTP API answers with, plus where the result was written."""
    return {
        "op": op_name,
        "matrix_shape": list(result.array.shape),
        "elapsed_time": result.elapsed_time,
        "device": result.device,
        "backend": result.backend,
        "device_name": result.device_name,
        "dtype": str(result.array.dtype),
        "timings": result.timings,
        "output": None if output is None else str(output),
    }


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    table.add_row("op", summary["op"])
    table.add_row("matrix_shape", str(summary["matrix_shape"]))
    table.add_row("elapsed_time", f"{summary['elapsed_time']:.6f} s")
    table.add_row("device", summary["device"])
    table.add_row("device_name", escape(summary["device_name"]))
    table.add_row("backend", summary["backend"])
    table.add_row("dtype", summary["dtype"])
    for phase, seconds in summary["timings"].items():
        table.add_row(f"  {phase}", f"{seconds:.6f} s")
    if summary["output"] is not None:
        table.add_row("written", escape(summary["output"]))
    console.print(table)


def run_command(
    op: Annotated[str, typer.Argument(help=f"One of: {', '.join(OPS)}.")],
    a: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="First .npz/.npy.")],
    b: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Second .npz/.npy.")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the result here (.npz, key 'result')."),
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="auto, cuda, numba or cpu [GMS_BACKEND]", show_default=False)
    ] = None,
    devices: Annotated[
        str | None, typer.Option(help="GPU ordinals, e.g. 0,1 [GMS_DEVICES]", show_default=False)
    ] = None,
    fallback: Annotated[
        str | None,
        typer.Option(help="On GPU out-of-memory: none or cpu [GMS_FALLBACK]", show_default=False),
    ] = None,
    tf32: Annotated[bool, typer.Option(help="matmul: allow TF32 tensor cores.")] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    """Compute an operation on two array files here, without a server (batch jobs).

    Same decoder, limits and backends as the service; settings come from GMS_ variables,
    overridden by the options. Exit code 1 on bad input or when the backend cannot start, 2 on
    bad options.
    """
    err_console = Console(stderr=True, soft_wrap=True)
    overrides = {"backend": backend, "devices": devices, "fallback": fallback}
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            err_console.print(f"[red]error[/red] {escape(where)}: {escape(error['msg'])}")
        raise typer.Exit(2) from None
    try:
        result = run_op_files(op, a, b, output, settings, allow_tf32=tf32)
    except (ServiceError, BackendUnavailable) as exc:
        detail = exc.detail if isinstance(exc, ServiceError) else str(exc)
        err_console.print(f"[red]error[/red] {escape(detail)}")
        raise typer.Exit(1) from None
    summary = result_summary(op, result, output)
    if json_output:
        typer.echo(json.dumps(summary))
    else:
        _print_summary(Console(), summary)
