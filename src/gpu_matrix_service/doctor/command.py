"""``gpu-matrix-service doctor``: the Typer command over :func:`diagnose` and the renderers.

Register it with ``app.command("doctor")(doctor_command)``. Tests build their own command with
:func:`make_doctor_command`, passing a fake NVML, a fake host and a fake probe runner.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from types import ModuleType
from typing import Annotated

import typer
from rich.console import Console

from gpu_matrix_service.doctor import report as render
from gpu_matrix_service.doctor.checks import Host
from gpu_matrix_service.doctor.diagnosis import DoctorReport, diagnose
from gpu_matrix_service.doctor.probe_runner import ProbeRunner
from gpu_matrix_service.settings import Settings


class OutputFormat(StrEnum):
    """What doctor prints."""

    table = "table"
    json = "json"
    status = "status"
    tags = "tags"
    gres = "gres"
    labels = "labels"


# These need the GPU inventory only, so they skip the slow probes.
INVENTORY_FORMATS = {OutputFormat.tags, OutputFormat.gres, OutputFormat.labels}


def make_doctor_command(
    settings: Settings | None = None,
    nvml: ModuleType | None = None,
    host: Host | None = None,
    probe: ProbeRunner | None = None,
) -> Callable[..., None]:
    """The doctor command over these (by default the real) settings, NVML, host and probes."""

    def doctor_command(
        require_gpu: Annotated[
            bool,
            typer.Option(
                "--require-gpu",
                help="A missing GPU is a failure (for GPU CI stages), not a warning.",
            ),
        ] = False,
        json_output: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
        format: Annotated[
            OutputFormat,
            typer.Option(
                "--format",
                "-f",
                help="table, json, status (one line), tags (CI worker tags), gres (Slurm "
                "gres.conf lines) or labels (Kubernetes node labels).",
            ),
        ] = OutputFormat.table,
        quick: Annotated[
            bool,
            typer.Option(
                "--quick", help="Only the cheap checks (NVML, devices, container): no probes."
            ),
        ] = False,
    ) -> None:
        """Check that the GPU stack works, and say what is wrong and how to fix it.

        Checks the driver, devices, container, toolkit and kernel library, frameworks,
        and a real workload through every backend.
        Exit code: 0 when every required check passes, 1 otherwise.
        """
        chosen = OutputFormat.json if json_output else format
        console = Console(stderr=True)
        with console.status("checking the GPU stack...", spinner="dots"):
            report = diagnose(
                settings or Settings(),
                require_gpu=require_gpu,
                quick=quick or chosen in INVENTORY_FORMATS,
                nvml=nvml,
                host=host,
                probe=probe,
            )
        if chosen is OutputFormat.table:
            render_table_to_stdout(report)
        else:
            typer.echo(format_report(report, chosen))
        raise typer.Exit(report.exit_code)

    return doctor_command


def render_table_to_stdout(report: DoctorReport) -> None:
    """The Rich table on stdout (wide enough to read when piped into a CI log)."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    render.render_table(report, console)


def format_report(report: DoctorReport, chosen: OutputFormat) -> str:
    """The report as text in any format but the table."""
    if chosen is OutputFormat.json:
        return render.render_json(report)
    if chosen is OutputFormat.status:
        return render.status_line(report)
    lines = {
        OutputFormat.tags: render.worker_tags,
        OutputFormat.gres: render.gres_conf,
        OutputFormat.labels: render.node_labels,
    }[chosen](report)
    return "\n".join(lines)


doctor_command = make_doctor_command()
