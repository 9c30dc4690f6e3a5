"""Service configuration: the only place environment variables are read.

Every field can be set through an environment variable with the ``GMS_`` prefix (``GMS_PORT``,
``GMS_BACKEND``, ...) or a ``.env`` file, and overridden by the matching CLI flag. Tests build
their own :class:`Settings` and pass it to :func:`gpu_matrix_service.app.create_app`.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BackendName = Literal["auto", "cpu", "cuda", "numba"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Everything the service can be told. Units are in the field names (bytes, seconds)."""

    model_config = SettingsConfigDict(
        env_prefix="GMS_", env_file=".env", extra="ignore", validate_default=True
    )

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for all).")
    port: int = Field(
        8000,
        ge=0,
        le=65535,
        # PORT as well, because the lab's container sets PORT for ``python3 main.py``.
        validation_alias=AliasChoices("GMS_PORT", "PORT"),
        description="TCP port to listen on (GMS_PORT, or PORT).",
    )
    workers: int = Field(1, ge=1, description="Server worker processes.")
    log_level: LogLevel = Field("info", description="Log level of the service and the server.")
    backend: BackendName = Field(
        "auto", description="Compute backend: auto picks cuda, then numba, then cpu."
    )
    devices: Annotated[list[int] | None, NoDecode] = Field(
        None, description="GPU ordinals to use, comma-separated (default: every visible GPU)."
    )
    fallback: Literal["none", "cpu"] = Field(
        "none", description="On GPU out-of-memory: answer 507 (none) or compute on the CPU (cpu)."
    )
    kernel_lib: Path | None = Field(
        None, description="Path of the CUDA C library (default: the one built into the package)."
    )
    max_upload_bytes: int = Field(
        1024 * MiB, ge=1, description="Largest request body accepted, in bytes (413 beyond)."
    )
    max_array_elements: int = Field(
        1 << 28, ge=1, description="Most elements one operand may hold (413 beyond)."
    )
    max_array_bytes: int = Field(
        2048 * MiB, ge=1, description="Most data bytes one operand may hold once inflated (413)."
    )
    max_array_dims: int = Field(8, ge=1, le=32, description="Most dimensions one operand may have.")
    verify_stored_crc: bool = Field(
        True,
        description="Check the CRC-32 of uncompressed .npz members (costs about one pass "
        "over the data; compressed members are always checked).",
    )
    max_json_result_elements: int = Field(
        1 << 20, ge=0, description="Most elements returned inline with ?result=json (413 beyond)."
    )
    compute_threads: int = Field(
        4, ge=1, description="Worker threads that run computations off the event loop."
    )
    upload_threads: int = Field(
        4,
        ge=0,
        description="Threads that check large uploads while they arrive: CRC-32 and the search "
        "for the multipart boundary (0: on the event loop).",
    )
    launch_tiny: bool = Field(
        False,
        description="On the CUDA C backend, launch tiny elementwise work from the event loop "
        "and answer when the GPU reports it done (false: wait for the GPU on the loop). Off "
        "by default: no faster than waiting on H100 machines (docs/benchmarks.md, 2026-12-07), "
        "and it puts arrays of at most 32 KiB in pinned blocks, dearer for them than plain memory.",
    )
    native_uploads: bool = Field(
        True,
        description="Find the parts and arrays of a small two-file upload in one call of the "
        "C reader (built with the C compiler at hand; without one, Python reads them).",
    )
    max_queued: int = Field(
        64,
        ge=0,
        description="Requests admitted beyond the compute threads (uploading or waiting for a "
        "thread); beyond, 503 with Retry-After.",
    )
    upload_timeout_seconds: float = Field(
        300.0, gt=0, description="Longest a request body may take to arrive (408 beyond)."
    )
    max_matmul_macs: int = Field(
        1 << 42,
        ge=1,
        description="Most multiply-adds (m*k*n) one matmul may ask for (413 beyond); a 256th "
        "of it for integer and bool matmul, which NumPy computes without BLAS.",
    )
    compute_timeout_seconds: float = Field(
        300.0, gt=0, description="Longest a request may wait for and run its computation (504)."
    )
    shutdown_timeout_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests may still take."
    )
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens accepted on the compute endpoints, comma-separated "
        "(none: no authentication).",
    )
    metrics_auth: bool = Field(False, description="Require a token on /metrics as well.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS, comma-separated (none: off)."
    )
    opentelemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry spans, metrics and logs, for a configured "
        "OpenTelemetry provider. Off: its per-request check of the providers costs about 50 us "
        "of a small request even when none is configured.",
    )
    metrics_dir: Path | None = Field(
        None,
        description="Directory for multiprocess metrics files; serve sets one up when "
        "workers > 1 (and PROMETHEUS_MULTIPROC_DIR with it).",
    )
    instance: str | None = Field(
        None, description="Instance name for metrics (default: host name and port)."
    )

    @field_validator("api_tokens", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",") if part.strip()]
            if value.strip() and not parts:
                # "," must not quietly mean "no tokens, no authentication".
                raise ValueError("names no value, only commas or spaces")
            return parts
        return value

    @model_validator(mode="after")
    def _metrics_auth_needs_tokens(self) -> Settings:
        if self.metrics_auth and not self.api_tokens:
            raise ValueError("metrics_auth needs api_tokens: there is no token to check")
        return self

    @field_validator("devices", mode="before")
    @classmethod
    def _parse_devices(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if value in ("", "all"):
                return None
            return [int(part) for part in value.split(",") if part.strip()]
        return value

    @property
    def instance_name(self) -> str:
        """The instance label: ``GMS_INSTANCE`` or ``<hostname>:<port>``."""
        return self.instance or f"{socket.gethostname()}:{self.port}"
