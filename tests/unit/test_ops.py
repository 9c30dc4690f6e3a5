"""The operation table's shape and dtype rules, and the NumPy backend against NumPy itself."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_matrix_service.backends.base import RunOptions
from gpu_matrix_service.backends.cpu import CpuBackend
from gpu_matrix_service.errors import ShapeMismatch, UnknownOperation, UnsupportedDType
from gpu_matrix_service.ops import OPS, get_op, plan

from arrayfiles import random_array

ELEMENTWISE = ["add", "subtract", "multiply"]
DTYPES = ["float32", "float64", "int32", "int64", "uint8", "float16", "complex64"]


def test_the_table_has_the_four_operations():
    assert sorted(OPS) == ["add", "matmul", "multiply", "subtract"]


def test_unknown_operation_names_the_available_ones():
    with pytest.raises(UnknownOperation, match="add, matmul, multiply, subtract"):
        get_op("divide")


@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("shape", [(1,), (7,), (1, 1), (1, 9), (9, 1), (17, 33), (2, 3, 4, 5)])
def test_elementwise_shape_is_the_common_shape(name, shape):
    assert get_op(name).result_shape(shape, shape) == shape


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_rejects_different_shapes_naming_both(name):
    with pytest.raises(ShapeMismatch, match=r"\[2, 3\] and \[3, 2\]"):
        get_op(name).result_shape((2, 3), (3, 2))


def test_elementwise_rejects_scalars():
    with pytest.raises(ShapeMismatch, match="scalars"):
        get_op("add").result_shape((), ())


def test_matmul_shape_rules():
    matmul = get_op("matmul")
    assert matmul.result_shape((3, 4), (4, 5)) == (3, 5)
    with pytest.raises(ShapeMismatch, match=r"\[3, 4\] @ \[5, 6\]"):
        matmul.result_shape((3, 4), (5, 6))
    with pytest.raises(ShapeMismatch, match="2-D"):
        matmul.result_shape((3,), (3,))


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [("int32", "float32", "float64"), ("int32", "int64", "int64"), ("float32", "float32",
     "float32"), ("uint8", "int8", "int16"), ("bool", "bool", "bool"), ("float16", "float32",
     "float32")],
)  # fmt: skip
def test_dtype_promotion_follows_numpy(left, right, expected):
    assert get_op("add").result_dtype(np.dtype(left), np.dtype(right)) == np.dtype(expected)


def test_boolean_subtraction_is_refused():
    with pytest.raises(UnsupportedDType, match="boolean"):
        get_op("subtract").result_dtype(np.dtype(bool), np.dtype(bool))


def test_non_numeric_dtype_is_refused():
    with pytest.raises(UnsupportedDType):
        get_op("add").result_dtype(np.dtype("U3"), np.dtype("f8"))


@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_backend_elementwise_matches_numpy(rng, name, dtype):
    a, b = random_array(rng, (31, 17), dtype), random_array(rng, (31, 17), dtype)
    result = CpuBackend().run(get_op(name), a, b, RunOptions())
    np.testing.assert_array_equal(result.array, getattr(np, name)(a, b))
    assert result.device == "CPU" and result.backend == "cpu"
    assert result.timings["total"] == result.elapsed_time >= 0


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "complex128"])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 1, 1), (1, 8, 5), (33, 47, 29)])
def test_cpu_backend_matmul_matches_numpy(rng, dtype, m, k, n):
    a, b = random_array(rng, (m, k), dtype), random_array(rng, (k, n), dtype)
    result = CpuBackend().run(get_op("matmul"), a, b, RunOptions())
    np.testing.assert_allclose(result.array, a @ b, rtol=1e-5)
    assert result.array.shape == (m, n)


def test_plan_reports_shape_and_promoted_dtype(rng):
    checked = plan(get_op("matmul"), np.ones((2, 3), np.int32), np.ones((3, 4), np.float32))
    assert checked.shape == (2, 4) and checked.dtype == np.float64


def test_only_tiny_work_is_computed_inline():
    from gpu_matrix_service.compute import is_tiny

    small, big = np.ones((64, 64), np.float32), np.ones((512, 512), np.float32)
    assert is_tiny(get_op("add"), small, small)
    assert not is_tiny(get_op("add"), big, big)
    assert is_tiny(get_op("matmul"), small, small)
    # Small operands, huge result: not tiny.
    assert not is_tiny(get_op("matmul"), np.ones((4096, 1)), np.ones((1, 4096)))
