"""scripts/request_cost.py, the in-process cost of one small request, runs and reports it."""

from __future__ import annotations

import re
import subprocess
import sys

from servers import REPO, server_env

SCRIPT = REPO / "scripts" / "request_cost.py"


def test_request_cost_reports_floor_service_essentials_and_each_stage():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--backend", "cpu", "--size", "16", "--requests", "40",
         "--repeats", "1", "--stages", "--essentials"],
        capture_output=True, text=True, env=server_env(), timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    line = done.stdout.strip().splitlines()[-1]
    found = re.fullmatch(
        r"16x16 float32 add: floor ([\d.]+) us, service ([\d.]+) us, essentials ([\d.]+) us "
        r"\(medians: read and decode "
        r"[\d.]+, operands [\d.]+, compute [\d.]+, metrics [\d.]+, handler ([\d.]+)\)",
        line,
    )
    assert found, line
    floor, service, essentials, handler = map(float, found.groups())
    assert floor > 0 and 0 < handler < 2 * service  # the handler is part of the request
    assert 0 < essentials < service  # the same work, without the framework and the checks
