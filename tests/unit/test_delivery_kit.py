"""The delivery kit (Dockerfile, compose files, pipelines, scripts) says what the issue asks.

The linters (scripts/lint_configs.sh) check syntax and schemas; these tests check meaning: the
commands the pipelines call exist, GPUs are reserved, GPU stages are gated by the doctor.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import yaml

from gpu_matrix_service.settings import Settings

from servers import REPO, server_env

# Files whose shell steps call the project's command line.
PIPELINE_FILES = sorted(
    [
        REPO / "Dockerfile",
        REPO / "Jenkinsfile",
        REPO / ".drone.yml",
        REPO / "ci" / "concourse" / "pipeline.yml",
        *(REPO / ".github" / "workflows").glob("*.yml"),
        *(REPO / "scripts").glob("*.sh"),
    ]
)
# Pipelines with a GPU stage: each must run the doctor gate before the GPU tests.
GPU_PIPELINES = [
    "Jenkinsfile",
    ".drone.yml",
    "ci/concourse/pipeline.yml",
    ".github/workflows/gpu.yml",
]
# Subcommands other engineers are adding; until they land, their absence is an expected failure.
PENDING_SUBCOMMANDS = {"doctor", "build-kernels", "bench"}

# `gpu-matrix-service SUB [SUBSUB] [--flag ...]` in a shell line, or ["gpu-matrix-service", "SUB"].
SHELL_COMMAND = re.compile(
    r"(?<![\w/:=.-])gpu-matrix-service\s+([a-z][a-z-]*)(?:\s+([a-z][a-z-]*))?((?:\s+--[a-z][a-z-]*)*)"
)
EXEC_FORM_COMMAND = re.compile(r'"gpu-matrix-service",\s*"([a-z][a-z-]*)"')


def code_lines(path: Path) -> list[str]:
    """The file's lines without whole-line comments (#, or // in the Jenkinsfile)."""
    marker = "//" if path.name == "Jenkinsfile" else "#"
    return [line for line in path.read_text().splitlines() if not line.lstrip().startswith(marker)]


def invoked_commands() -> dict[tuple[str, ...], set[str]]:
    """Every (subcommand[, subsubcommand]) the pipeline files call, with the flags they pass."""
    found: dict[tuple[str, ...], set[str]] = {}
    for path in PIPELINE_FILES:
        for line in code_lines(path):
            for sub, subsub, flags in SHELL_COMMAND.findall(line):
                words = (sub, subsub) if subsub else (sub,)
                found.setdefault(words, set()).update(flags.split())
            for sub in EXEC_FORM_COMMAND.findall(line):
                found.setdefault((sub,), set())
    return found


def cli_help(*words: str) -> subprocess.CompletedProcess[str]:
    env = server_env(COLUMNS="200", NO_COLOR="1", TERM="dumb")
    return subprocess.run(
        [sys.executable, "-m", "gpu_matrix_service", *words, "--help"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip


def test_pipelines_call_the_project_commands_they_need():
    commands = invoked_commands()
    for needed in [("serve",), ("doctor",), ("build-kernels",), ("bench", "compute")]:
        assert needed in commands, f"no pipeline file runs gpu-matrix-service {' '.join(needed)}"
    assert "--require-gpu" in commands[("doctor",)]


def test_every_subcommand_and_flag_the_pipelines_call_exists():
    missing, missing_flags = [], []
    for words, flags in sorted(invoked_commands().items()):
        done = cli_help(*words)
        if done.returncode != 0:
            missing.append(" ".join(words))
            continue
        missing_flags += [f"{' '.join(words)} {flag}" for flag in flags if flag not in done.stdout]
    not_pending = [m for m in missing if m.split()[0] not in PENDING_SUBCOMMANDS]
    assert not not_pending, f"pipelines call subcommands that do not exist: {not_pending}"
    if missing:
        pytest.xfail(f"subcommands not wired into the CLI yet: {', '.join(missing)}")
    assert not missing_flags, f"pipelines pass flags the commands lack: {missing_flags}"


@pytest.mark.parametrize("name", GPU_PIPELINES)
def test_gpu_pipeline_gates_on_doctor_before_the_gpu_tests(name: str):
    text = "\n".join(code_lines(REPO / name))
    doctor = text.find("gpu-matrix-service doctor --require-gpu")
    gpu_tests = text.find("pytest -m gpu")
    assert doctor != -1 and gpu_tests != -1, f"{name} must run the doctor and pytest -m gpu"
    assert doctor < gpu_tests, f"{name} runs the GPU tests before the doctor gate"


def test_concourse_gpu_task_runs_on_gpu_tagged_workers():
    pipeline = yaml.safe_load((REPO / "ci" / "concourse" / "pipeline.yml").read_text())
    tasks = [step for job in pipeline["jobs"] for step in job["plan"] if "task" in step]
    gpu_tasks = [task for task in tasks if "pytest -m gpu" in str(task["config"]["run"])]
    assert gpu_tasks, "no Concourse task runs the GPU tests"
    for task in gpu_tasks:
        assert task["tags"] == ["gpu"]
        assert task["config"]["params"]["NVIDIA_VISIBLE_DEVICES"] == "all"
        assert task["config"]["params"]["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"


def test_drone_gpu_step_sees_the_gpus():
    steps = yaml.safe_load((REPO / ".drone.yml").read_text())["steps"]
    (gpu_step,) = [step for step in steps if "pytest -m gpu" in " ".join(step["commands"])]
    assert gpu_step["image"].startswith("nvidia/cuda:")
    assert gpu_step["environment"]["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert gpu_step["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"


def test_github_gpu_job_runs_on_the_self_hosted_gpu_runner():
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "gpu.yml").read_text())
    assert workflow["jobs"]["gpu-tests"]["runs-on"] == ["self-hosted", "linux", "gpu"]
    labels = yaml.safe_load((REPO / ".github" / "actionlint.yaml").read_text())
    assert "gpu" in labels["self-hosted-runner"]["labels"]


@pytest.mark.parametrize("name", ["docker-compose.prod.yml", "docker-compose.yml"])
def test_compose_file_reserves_nvidia_gpus_for_the_service(name: str):
    path = REPO / name
    if not path.exists():
        pytest.skip(f"{name} is not in this checkout")
    service = yaml.safe_load(path.read_text())["services"]["gpu-matrix-service"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert all("count" in d or "device_ids" in d for d in devices)


def test_production_compose_limits_restarts_and_checks_the_service():
    compose = yaml.safe_load((REPO / "docker-compose.prod.yml").read_text())
    service = compose["services"]["gpu-matrix-service"]
    assert service["deploy"]["resources"]["limits"]["memory"]
    assert service["restart"] == "unless-stopped"
    assert "/health/ready" in " ".join(service["healthcheck"]["test"])
    assert service["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert "NVIDIA_VISIBLE_DEVICES" in service["environment"]
    grafana = compose["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert {"prometheus", "grafana"} <= set(compose["services"])


def dockerfile_stages() -> dict[str, list[str]]:
    """The Dockerfile's instructions (continuations joined) per stage name."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if match := re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE):
            current = stages.setdefault(match.group(1) or f"stage{len(stages)}", [])
        current.append(line)
    return stages


def test_dockerfile_builds_with_uv_and_nvcc_and_runs_slim_non_root_images():
    stages = dockerfile_stages()
    build = " ".join(stages["build"])
    assert "nvidia/cuda:" in stages["build"][0] and "-devel-" in stages["build"][0]
    assert "uv sync --locked --no-dev" in build and "UV_COMPILE_BYTECODE=1" in build
    assert "--mount=type=cache" in build
    assert "gpu-matrix-service build-kernels" in build
    assert "gpu-matrix-service build-native" in build
    assert "gpu-matrix-service build-native" in " ".join(stages["build-cpu"])
    assert "nvidia/cuda:" in stages["runtime"][0] and "-runtime-" in stages["runtime"][0]
    assert list(stages)[-1] == "runtime", "the GPU image must be the default (last) target"
    for name in ("runtime", "runtime-cpu"):
        instructions = stages[name]
        users = [i.split()[1] for i in instructions if i.startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name} runs as root"
        assert any(i.startswith("HEALTHCHECK") and "/health/ready" in i for i in instructions)
        assert any(i.startswith("EXPOSE ") for i in instructions)
        assert any(i.startswith("CMD") and "serve" in i for i in instructions)
        assert not any(
            "build-kernels" in i or "build-native" in i or "uv sync" in i for i in instructions
        )


def test_configuration_page_documents_every_setting():
    page = (REPO / "docs" / "configuration.md").read_text()
    missing = [f"GMS_{name.upper()}" for name in Settings.model_fields
               if f"`GMS_{name.upper()}`" not in page]  # fmt: skip
    assert not missing, f"docs/configuration.md lacks {missing}"


def git(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    identity = ["-c", "user.name=Test", "-c", "user.email=test@example.com"]
    return subprocess.run(["git", *identity, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip


def test_pre_commit_hook_refuses_commits_on_main_only(tmp_path: Path):
    assert git(tmp_path, "init", "--quiet", "--initial-branch=main").returncode == 0
    git(tmp_path, "config", "core.hooksPath", str(REPO / ".githooks"))
    (tmp_path / "a.txt").write_text("a\n")
    git(tmp_path, "add", "a.txt")
    refused = git(tmp_path, "commit", "--quiet", "-m", "on main")
    assert refused.returncode != 0 and "direct commits to main are refused" in refused.stderr
    git(tmp_path, "switch", "--quiet", "-c", "feature")
    assert git(tmp_path, "commit", "--quiet", "-m", "on a branch").returncode == 0


# --- the GPU watchdog (scripts/cancel_stale_gpu_runs.py), against a fake GitHub API ---------


@pytest.fixture(scope="module")
def watchdog() -> Iterator[ModuleType]:
    """scripts/cancel_stale_gpu_runs.py as a module (scripts/ is not a package)."""
    path = REPO / "scripts" / "cancel_stale_gpu_runs.py"
    spec = importlib.util.spec_from_file_location("cancel_stale_gpu_runs", path)
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve the module's annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def stamp(minutes_ago: float) -> str:
    return (NOW - timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeGitHub:
    """Runs and jobs of one repository; records the cancel requests it receives."""

    def __init__(self, runs: dict[str, list[dict]], jobs: dict[int, list[dict]]) -> None:
        self.runs, self.jobs, self.cancelled = runs, jobs, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and (m := re.fullmatch(r".*/runs/(\d+)/cancel", path)):
            self.cancelled.append(int(m.group(1)))
            return httpx.Response(202, json={})
        if m := re.fullmatch(r".*/actions/runs/(\d+)/jobs", path):
            return httpx.Response(200, json={"jobs": self.jobs.get(int(m.group(1)), [])})
        if path == "/repos/o/r/actions/workflows/gpu.yml/runs":
            status = request.url.params["status"]
            return httpx.Response(200, json={"workflow_runs": self.runs.get(status, [])})
        return httpx.Response(404, json={"message": f"unexpected {request.method} {path}"})


def run(run_id: int) -> dict:
    return {"id": run_id, "html_url": f"https://github.com/o/r/actions/runs/{run_id}"}


def job(status: str, minutes_ago: float, labels: list[str]) -> dict:
    return {"name": "gpu-tests", "status": status, "labels": labels,
            "created_at": stamp(minutes_ago), "started_at": stamp(minutes_ago)}  # fmt: skip


@pytest.fixture
def github() -> FakeGitHub:
    gpu = ["self-hosted", "linux", "gpu"]
    return FakeGitHub(
        runs={"queued": [run(1), run(2)], "in_progress": [run(3), run(4)]},
        jobs={
            1: [job("queued", 45, gpu)],  # stale: cancel
            2: [job("queued", 5, gpu)],  # queued, but not for long
            3: [job("completed", 50, ["ubuntu-latest"]), job("queued", 40, gpu)],  # stale
            4: [job("in_progress", 90, gpu)],  # running: timeout-minutes covers it
        },
    )


def test_watchdog_cancels_runs_whose_gpu_job_is_queued_too_long(watchdog, github: FakeGitHub):
    with httpx.Client(base_url="https://api.test", transport=httpx.MockTransport(github)) as c:
        cancelled = watchdog.cancel_stale_runs(
            c, "o/r", "gpu.yml", "gpu", timedelta(minutes=30), NOW
        )
    assert cancelled == [1, 3]
    assert github.cancelled == [1, 3]


def test_watchdog_dry_run_cancels_nothing(watchdog, github: FakeGitHub, capsys):
    with httpx.Client(base_url="https://api.test", transport=httpx.MockTransport(github)) as c:
        listed = watchdog.cancel_stale_runs(
            c, "o/r", "gpu.yml", "gpu", timedelta(minutes=30), NOW, dry_run=True
        )
    assert listed == [1, 3] and github.cancelled == []
    assert "would cancel run 1" in capsys.readouterr().out


def test_watchdog_ignores_jobs_for_other_runners(watchdog, github: FakeGitHub):
    with httpx.Client(base_url="https://api.test", transport=httpx.MockTransport(github)) as c:
        cancelled = watchdog.cancel_stale_runs(c, "o/r", "gpu.yml", "a100", timedelta(0), NOW)
    assert cancelled == [] and github.cancelled == []
