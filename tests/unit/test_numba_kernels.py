"""The numba backend's kernels, run under Numba's CUDA simulator so CI covers them without a GPU.

Numba reads ``NUMBA_ENABLE_CUDASIM`` once, when it is first imported, and this test session may
already hold a real numba (GPU tests, other backends). So the cases in ``numba_sim_cases.py``
run with pytest in a child process whose environment turns the simulator on; any failing case
fails this test, with the child's report as the message.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("numba_sim_cases.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed"
)
def test_numba_kernels_match_numpy_under_the_cuda_simulator():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    child = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    report = child.stdout[-12000:] + child.stderr[-4000:]
    assert child.returncode == 0, f"simulator cases failed:\n{report}"
    assert " passed" in child.stdout and " skipped" not in child.stdout.splitlines()[-1], report
