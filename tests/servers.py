"""Real server processes for tests: a free loopback port, start, wait until ready, stop."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from gpu_matrix_service.bench.http import free_port, wait_until_ready

__all__ = ["REPO", "LiveServer", "free_port", "server_env"]

REPO = Path(__file__).resolve().parents[1]


class LiveServer:
    """A real service process on a free loopback port."""

    def __init__(self, args: list[str], env: dict[str, str], port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_until_ready(self.url, self.process, timeout)

    def stop(self) -> str:
        self.process.terminate()
        try:
            out, _ = self.process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        return out


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GMS_") and k != "PORT"}
    env["PYTHONPATH"] = str(REPO / "src")
    env.update(extra)
    return env
