"""``run_op_files`` (the core of ``gpu-matrix-service run``) against NumPy, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from gpu_matrix_service.batch import run_command, run_op_files
from gpu_matrix_service.errors import (
    BadArrayInput,
    PayloadTooLarge,
    ShapeMismatch,
    UnknownOperation,
    UnsupportedDType,
)
from gpu_matrix_service.settings import Settings

from arrayfiles import npy_bytes, npz_bytes, npz_compressed_bytes, random_array


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def operands(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    a, b = random_array(rng, (32, 16), "float32"), random_array(rng, (32, 16), "float32")
    return write(tmp_path / "a.npz", npz_bytes(a)), write(tmp_path / "b.npy", npy_bytes(b)), a, b


@pytest.mark.parametrize(
    ("op", "reference"), [("add", np.add), ("subtract", np.subtract), ("multiply", np.multiply)]
)
def test_elementwise_ops_match_numpy_and_write_the_result_under_key_result(
    tmp_path: Path, operands, settings: Settings, op: str, reference
):
    a_path, b_path, a, b = operands
    output = tmp_path / "out" / "c.npz"
    result = run_op_files(op, a_path, b_path, output, settings)
    with np.load(output) as saved:
        assert list(saved.keys()) == ["result"]
        np.testing.assert_array_equal(saved["result"], reference(a, b))
        assert saved["result"].dtype == np.float32
    assert (result.device, result.backend) == ("CPU", "cpu")
    assert result.array.shape == (32, 16)
    assert {"decode", "total", "write"} <= set(result.timings)
    assert all(seconds >= 0 for seconds in result.timings.values())
    assert result.elapsed_time == result.timings["total"]


def test_matmul_promotes_dtypes_like_numpy(tmp_path: Path, rng, settings: Settings):
    a = random_array(rng, (8, 5), "int32")
    b = random_array(rng, (5, 3), "float64")
    a_path = write(tmp_path / "a.npz", npz_compressed_bytes(matrix=a))
    b_path = write(tmp_path / "b.npz", npz_bytes(b))
    result = run_op_files("matmul", a_path, b_path, tmp_path / "c.npz", settings)
    np.testing.assert_allclose(result.array, a @ b)
    assert result.array.dtype == np.float64


def test_without_an_output_nothing_is_written(tmp_path: Path, operands, settings: Settings):
    a_path, b_path, a, b = operands
    result = run_op_files("add", a_path, b_path, None, settings)
    np.testing.assert_array_equal(result.array, a + b)
    assert "write" not in result.timings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npy"]


def test_mismatched_shapes_raise_and_leave_no_output(tmp_path: Path, rng, settings: Settings):
    a_path = write(tmp_path / "a.npz", npz_bytes(random_array(rng, (4, 4), "float64")))
    b_path = write(tmp_path / "b.npz", npz_bytes(random_array(rng, (5, 4), "float64")))
    with pytest.raises(ShapeMismatch, match=r"got \[4, 4\] and \[5, 4\]"):
        run_op_files("add", a_path, b_path, tmp_path / "c.npz", settings)
    assert not (tmp_path / "c.npz").exists()


def test_unknown_op_is_refused_before_reading_files(tmp_path: Path, settings: Settings):
    with pytest.raises(UnknownOperation, match="available: add, matmul"):
        run_op_files("divide", tmp_path / "missing", tmp_path / "missing", None, settings)


def test_unreadable_and_non_array_files_are_bad_input(tmp_path: Path, operands, settings):
    a_path, *_ = operands
    with pytest.raises(BadArrayInput, match=r"cannot read .*missing\.npz"):
        run_op_files("add", a_path, tmp_path / "missing.npz", None, settings)
    text = write(tmp_path / "notes.npz", b"just text")
    with pytest.raises(BadArrayInput, match=r"neither a \.npy nor a \.npz"):
        run_op_files("add", a_path, text, None, settings)


def test_object_arrays_are_refused_without_unpickling(tmp_path: Path, operands, settings):
    a_path, *_ = operands
    objects = write(tmp_path / "o.npy", npy_bytes(np.array([{"x": 1}, None], dtype=object)))
    with pytest.raises(UnsupportedDType):
        run_op_files("add", a_path, objects, None, settings)


def test_the_services_array_limits_apply(tmp_path: Path, operands):
    a_path, b_path, *_ = operands
    small = Settings(backend="cpu", max_array_elements=100, _env_file=None)
    with pytest.raises(PayloadTooLarge):
        run_op_files("add", a_path, b_path, None, small)


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("run")(run_command)
    app.command("version")(lambda: None)  # two commands, so "run" stays a subcommand
    return app


def test_run_command_prints_a_json_summary(tmp_path: Path, operands):
    a_path, b_path, a, b = operands
    output = tmp_path / "c.npz"
    args = ["run", "add", str(a_path), str(b_path), "-o", str(output), "--json"]
    done = CliRunner().invoke(cli(), [*args, "--backend", "cpu"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["matrix_shape"] == [32, 16] and summary["device"] == "CPU"
    assert summary["output"] == str(output) and summary["op"] == "add"
    with np.load(output) as saved:
        np.testing.assert_array_equal(saved["result"], a + b)


def test_run_command_exits_1_with_the_reason_on_bad_input(tmp_path: Path, rng, operands):
    a_path, *_ = operands
    b_path = write(tmp_path / "b.npz", npz_bytes(random_array(rng, (3, 3), "float32")))
    done = CliRunner().invoke(cli(), ["run", "add", str(a_path), str(b_path), "--backend", "cpu"])
    assert done.exit_code == 1
    assert "add needs operands of the same shape" in done.stderr


def test_run_command_exits_2_on_an_unknown_backend(operands):
    a_path, b_path, *_ = operands
    done = CliRunner().invoke(cli(), ["run", "add", str(a_path), str(b_path), "--backend", "tpu"])
    assert done.exit_code == 2
    assert "backend" in done.stderr
