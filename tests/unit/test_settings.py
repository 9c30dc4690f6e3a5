"""Settings come from GMS_ variables (and PORT), with validation."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from gpu_matrix_service.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("GMS_PORT", "PORT", "GMS_BACKEND", "GMS_DEVICES", "GMS_INSTANCE"):
        monkeypatch.delenv(name, raising=False)


def test_defaults():
    settings = Settings(_env_file=None)
    assert (settings.host, settings.port, settings.backend) == ("127.0.0.1", 8000, "auto")
    assert settings.devices is None


def test_gms_variables_are_read(monkeypatch):
    monkeypatch.setenv("GMS_PORT", "9123")
    monkeypatch.setenv("GMS_BACKEND", "cpu")
    monkeypatch.setenv("GMS_MAX_UPLOAD_BYTES", "1000")
    settings = Settings(_env_file=None)
    assert (settings.port, settings.backend, settings.max_upload_bytes) == (9123, "cpu", 1000)


def test_plain_port_variable_is_honoured_for_the_lab_container(monkeypatch):
    monkeypatch.setenv("PORT", "8111")
    assert Settings(_env_file=None).port == 8111


@pytest.mark.parametrize(("value", "expected"), [("0,2", [0, 2]), ("1", [1]), ("all", None)])
def test_devices_list(monkeypatch, value, expected):
    monkeypatch.setenv("GMS_DEVICES", value)
    assert Settings(_env_file=None).devices == expected


@pytest.mark.parametrize(("name", "value"), [("GMS_BACKEND", "tpu"), ("GMS_PORT", "70000")])
def test_invalid_values_are_refused(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(pydantic.ValidationError):
        Settings(_env_file=None)


def test_instance_name_defaults_to_host_and_port(monkeypatch):
    assert Settings(_env_file=None, port=8001).instance_name.endswith(":8001")
    monkeypatch.setenv("GMS_INSTANCE", "alice")
    assert Settings(_env_file=None).instance_name == "alice"


def test_every_setting_has_a_serve_flag_and_a_readme_row():
    import typer.main

    from gpu_matrix_service.cli import app

    command = typer.main.get_command(app)
    flags = {opt for param in command.commands["serve"].params for opt in param.opts}
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in flags, name
        assert f"`GMS_{name.upper()}`" in readme, name
