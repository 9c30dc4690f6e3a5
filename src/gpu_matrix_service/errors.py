"""Our exception types and their one mapping to an HTTP status and a JSON ``detail``.

Core code (decoding, ops, backends) raises these; ``app.py`` installs one handler that turns
any :class:`ServiceError` into ``{"detail": "..."}`` with the status named on the class. Nothing
below the routes raises ``HTTPException``.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service answers on purpose. ``status_code`` is the HTTP status."""

    status_code: int = 400
    headers: dict[str, str] | None = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(ServiceError):
    """The request is malformed in a way no narrower class describes (missing parts, bad query)."""

    status_code = 400


class Unauthorized(ServiceError):
    """No bearer token, or one the service does not accept."""

    status_code = 401

    def __init__(self, detail: str, invalid: bool = False) -> None:
        super().__init__(detail)
        challenge = 'Bearer realm="gpu-matrix-service"'
        if invalid:
            challenge += ', error="invalid_token"'
        self.headers = {"WWW-Authenticate": challenge}


class BadArrayInput(ServiceError):
    """An upload is not a readable ``.npy``/``.npz``, or it is corrupt or truncated."""

    status_code = 400


class ShapeMismatch(ServiceError):
    """The operands' shapes do not fit the operation (elementwise: equal; matmul: inner dims)."""

    status_code = 400


class UnsupportedDType(ServiceError):
    """An array holds a dtype we never compute on (object, strings, void, datetime...)."""

    status_code = 415


class PayloadTooLarge(ServiceError):
    """The body, an array's bytes, its element count or its dimensions exceed a configured limit."""

    status_code = 413


class NotAcceptable(ServiceError):
    """The result cannot be given in the representation asked for (complex or inf in JSON)."""

    status_code = 406


class UnknownOperation(ServiceError):
    """The path names an operation the service does not have."""

    status_code = 404


class DeviceOutOfMemory(ServiceError):
    """The GPU could not hold the operands and result even after the pool was trimmed."""

    status_code = 507


class BackendFailure(ServiceError):
    """A device call failed for this request (a CUDA error); the service itself keeps serving."""

    status_code = 503


class ServiceOverloaded(ServiceError):
    """Too many computations are queued; the client should retry later."""

    status_code = 503

    def __init__(self, detail: str, retry_after_seconds: int = 1) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after_seconds)}


class RequestTimeout(ServiceError):
    """The request body did not arrive within the upload timeout."""

    status_code = 408


class ComputeTimeout(ServiceError):
    """A computation outlasted the per-request compute timeout."""

    status_code = 504
