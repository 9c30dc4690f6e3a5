"""The Slurm scripts in deploy/slurm/ on a real (one-node, CPU) Slurm cluster.

Needs running Slurm daemons, so these run only with ``GMS_TEST_SLURM=1``: the CI stage
``scripts/ci_slurm.sh`` starts slurmctld, slurmd and munged on the machine and sets it.
Jobs are submitted in CPU mode: ``--gres=none`` overrides the scripts' ``--gres=gpu:1`` and
``GMS_BACKEND=cpu`` picks the NumPy backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from arrayfiles import npz_bytes
from servers import REPO, server_env

pytestmark = pytest.mark.skipif(
    os.environ.get("GMS_TEST_SLURM") != "1",
    reason="needs Slurm daemons: scripts/ci_slurm.sh starts them and sets GMS_TEST_SLURM=1",
)

SLURM_DIR = REPO / "deploy" / "slurm"
# The jobs run this checkout's command with this interpreter (the project's environment).
CLI = f"{sys.executable} -m gpu_matrix_service"
CPU_MODE = ["--gres=none", "--cpus-per-task=1"]
REFERENCE = {"add": np.add, "matmul": np.matmul, "multiply": np.multiply}


def job_env(**extra: str) -> dict[str, str]:
    return server_env(GMS_CLI=CLI, GMS_BACKEND="cpu", **extra)


def sbatch(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    """Submit; return the job id (``--parsable``). With ``--wait`` this returns at its end."""
    done = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={cwd}", *CPU_MODE, *args],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )  # fmt: skip
    job_id = done.stdout.strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch failed ({done.returncode}): {done.stderr}"
    return job_id


def write_pairs(directory: Path, rng: np.random.Generator) -> tuple[Path, dict[int, np.ndarray]]:
    """Three good pairs and one mismatched pair; the expected result of each good task."""
    expected: dict[int, np.ndarray] = {}
    lines = ["# op a b out", ""]
    cases = [
        ("add", (64, 32), (64, 32)),
        ("matmul", (16, 24), (24, 8)),
        ("multiply", (5, 6, 7), (5, 6, 7)),
        ("add", (4, 4), (5, 4)),  # task 4: mismatched shapes, must fail on its own
    ]
    for task, (op, a_shape, b_shape) in enumerate(cases, start=1):
        a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
        (directory / f"a{task}.npz").write_bytes(npz_bytes(a))
        (directory / f"b{task}.npz").write_bytes(npz_bytes(matrix=b))
        lines.append(f"{op} a{task}.npz b{task}.npz out/c{task}.npz")
        if a_shape == b_shape or op == "matmul":
            expected[task] = REFERENCE[op](a, b)
    pairs = directory / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    return pairs, expected


def test_array_job_computes_every_pair_and_reports_the_bad_one(tmp_path: Path):
    pairs, expected = write_pairs(tmp_path, np.random.default_rng(3))
    script = SLURM_DIR / "gms-array.sbatch"
    job = sbatch(
        ["--wait", "--array=1-4", str(script)], tmp_path, job_env(PAIRS=str(pairs)), timeout=240
    )
    for task, result in expected.items():
        with np.load(tmp_path / "out" / f"c{task}.npz") as saved:
            assert list(saved.keys()) == ["result"]
            np.testing.assert_allclose(saved["result"], result, rtol=1e-12)
        log = (tmp_path / f"gms-array-{job}_{task}.out").read_text()
        summary = json.loads(log.strip().splitlines()[-1])
        assert summary["device"] == "CPU" and summary["backend"] == "cpu"
        assert summary["matrix_shape"] == list(result.shape)
        assert summary["output"] == f"out/c{task}.npz"
    failed = (tmp_path / f"gms-array-{job}_4.out").read_text()
    assert "add needs operands of the same shape, got [4, 4] and [5, 4]" in failed
    assert not (tmp_path / "out" / "c4.npz").exists()


@pytest.fixture
def serve_job(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    script = SLURM_DIR / "gms-serve.sbatch"
    job = sbatch([str(script)], tmp_path, job_env(), timeout=60)
    try:
        yield job, tmp_path / f"gms-serve-{job}.out"
    finally:
        subprocess.run(["scancel", job], check=False, env=server_env())


def test_serve_job_prints_its_address_and_serves_until_cancelled(serve_job: tuple[str, Path]):
    job, log = serve_job
    url = wait_for_address(log, timeout=120)
    assert httpx.get(f"{url}/health/ready", timeout=10).json()["backend"] == "cpu"
    a = np.arange(12.0).reshape(3, 4)
    files = {"a": ("a.npz", npz_bytes(a)), "b": ("b.npz", npz_bytes(a))}
    answer = httpx.post(f"{url}/v1/ops/add?result=json", files=files, timeout=30).json()
    assert answer["result"] == (2 * a).tolist()

    subprocess.run(["scancel", job], check=True, env=server_env())
    deadline = time.monotonic() + 60
    while job_is_queued(job):
        assert time.monotonic() < deadline, f"job {job} still running after scancel"
        time.sleep(1)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health/live", timeout=2)


def wait_for_address(log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists():
            for line in log.read_text().splitlines():
                if "ready at http://" in line:
                    address = line.split("ready at ", 1)[1].split()[0]
                    # The job prints the node's name; the node is this machine.
                    return "http://127.0.0.1:" + address.rsplit(":", 1)[1]
        time.sleep(1)
    raise TimeoutError(f"no address in {log} after {timeout} s:\n{_read(log)}")


def job_is_queued(job: str) -> bool:
    done = subprocess.run(
        ["squeue", "--noheader", f"--jobs={job}", "--format=%T"],
        capture_output=True, text=True, env=server_env(), check=False,
    )  # fmt: skip
    return bool(done.stdout.strip())


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else "(no output file)"
