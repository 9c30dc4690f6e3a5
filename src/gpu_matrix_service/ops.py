"""The operation table: each operation's name, shape rule, dtype rule and NumPy reference.

Backends look operations up here; the API layer validates operands here before any device
work, so a shape or dtype error never reaches a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple

import numpy as np

from gpu_matrix_service.errors import ShapeMismatch, UnknownOperation, UnsupportedDType

# Kinds NumPy can add and multiply: bool, signed and unsigned ints, floats, complex.
NUMERIC_KINDS: Final = frozenset("biufc")


@dataclass(frozen=True)
class Op:
    """One binary operation.

    ``elementwise`` ops take two arrays of equal shape (1 to N dimensions) and give that shape;
    ``matmul`` takes ``(m, k)`` and ``(k, n)`` and gives ``(m, n)``. ``reference`` is the NumPy
    function whose result every backend must match.
    """

    name: str
    elementwise: bool
    reference: Callable[[np.ndarray, np.ndarray], np.ndarray]
    summary: str

    def result_shape(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output shape for these operand shapes, or :class:`ShapeMismatch` saying why."""
        if self.elementwise:
            if a_shape != b_shape:
                raise ShapeMismatch(
                    f"{self.name} needs operands of the same shape, got {list(a_shape)} "
                    f"and {list(b_shape)}"
                )
            if len(a_shape) == 0:
                raise ShapeMismatch(
                    f"{self.name} needs arrays of at least 1 dimension, got scalars"
                )
            return a_shape
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise ShapeMismatch(
                f"matmul needs two 2-D matrices, got shapes {list(a_shape)} and {list(b_shape)}"
            )
        if a_shape[1] != b_shape[0]:
            raise ShapeMismatch(
                f"matmul inner dimensions differ: {list(a_shape)} @ {list(b_shape)} "
                f"({a_shape[1]} != {b_shape[0]})"
            )
        return (a_shape[0], b_shape[1])

    def result_dtype(self, a_dtype: np.dtype, b_dtype: np.dtype) -> np.dtype:
        """NumPy's promotion of the two operand dtypes; non-numeric dtypes are refused."""
        return _result_dtype(self.name, a_dtype, b_dtype)


@functools.lru_cache(maxsize=256)
def _result_dtype(op_name: str, a_dtype: np.dtype, b_dtype: np.dtype) -> np.dtype:
    """:meth:`Op.result_dtype`, remembered (a refusal raises each time, and is not kept):
    numeric dtypes are a small set, and the checks and ``np.result_type`` took about a
    microsecond a request."""
    for dtype in (a_dtype, b_dtype):
        check_numeric_dtype(dtype)
    dtype = np.result_type(a_dtype, b_dtype)
    if op_name == "subtract" and dtype == np.bool_:
        # NumPy refuses boolean subtraction; say so plainly instead of failing in a backend.
        raise UnsupportedDType("subtract is not defined for two boolean arrays")
    return dtype


def check_numeric_dtype(dtype: np.dtype) -> None:
    """Raise :class:`UnsupportedDType` unless ``dtype`` is bool, integer, float or complex."""
    if dtype.hasobject or dtype.kind not in NUMERIC_KINDS or dtype.fields is not None:
        raise UnsupportedDType(
            f"dtype {dtype.str!r} ({dtype}) is not supported: send bool, integer, float or "
            "complex arrays"
        )


OPS: Final[dict[str, Op]] = {
    op.name: op
    for op in (
        Op("add", True, np.add, "Elementwise sum a + b of two arrays of equal shape."),
        Op("subtract", True, np.subtract, "Elementwise difference a - b of equal shapes."),
        Op("multiply", True, np.multiply, "Elementwise (Hadamard) product a * b of equal shapes."),
        Op("matmul", False, np.matmul, "Matrix product a @ b of (m, k) and (k, n) matrices."),
    )
}


def get_op(name: str) -> Op:
    """The operation called ``name``, or :class:`UnknownOperation` listing the ones we have."""
    try:
        return OPS[name]
    except KeyError:
        raise UnknownOperation(
            f"unknown operation {name!r}; available: {', '.join(sorted(OPS))}"
        ) from None


class Plan(NamedTuple):
    """What one request computes, checked before any device work: op, output shape and dtype.
    (A named tuple: a third of a frozen dataclass's cost to make, once per request.)"""

    op: Op
    shape: tuple[int, ...]
    dtype: np.dtype


def plan(op: Op, a: np.ndarray, b: np.ndarray) -> Plan:
    """Validate ``a`` and ``b`` for ``op`` and return the output's shape and dtype."""
    dtype = op.result_dtype(a.dtype, b.dtype)
    return Plan(op, op.result_shape(a.shape, b.shape), dtype)
