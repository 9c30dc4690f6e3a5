"""`gpu-matrix-service doctor` with NVML, the host and the CUDA probes replaced by fakes: no
driver, zero GPUs, two GPUs, MIG, ECC errors, a library built for the wrong architecture."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gpu_matrix_service.doctor import Check, Host, diagnose, quick_checks
from gpu_matrix_service.doctor.checks import ToolOutput
from gpu_matrix_service.doctor.command import make_doctor_command
from gpu_matrix_service.doctor.gpu_checks import visible_indices
from gpu_matrix_service.doctor.library import (
    CodeArchs,
    driver_runtime_check,
    elf_section,
    fatbin_archs,
    find_kernel_library,
    read_code_archs,
)
from gpu_matrix_service.doctor.nvml_queries import NvmlInventory, read_inventory
from gpu_matrix_service.doctor.probe_runner import ProbeResult, run_probe
from gpu_matrix_service.doctor.report import gpu_family, gres_type, label_value
from gpu_matrix_service.doctor.workload import FRAMEWORKS, framework_check, measurement_checks
from gpu_matrix_service.gpu import load_pynvml
from gpu_matrix_service.settings import Settings

from fake_nvml import FakeGpu, FakeNvml

H100 = "NVIDIA H100 80GB HBM3"


# --- fakes: a library file, the host, the probes -------------------------------------------


def fatbin(entries: list[tuple[int, int]]) -> bytes:
    """A fatbin container holding (kind, arch) entries: kind 1 is PTX, 2 machine code."""
    body = b""
    for kind, arch in entries:
        payload = b"\x00" * 24
        header = struct.pack("<HHIQIIII", kind, 0x0101, 64, len(payload), 0, len(payload), 0, arch)
        body += header.ljust(64, b"\x00") + payload
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def write_library(path: Path, entries: list[tuple[int, int]]) -> Path:
    """A minimal 64-bit ELF file whose .nv_fatbin section holds ``entries``."""
    names = b"\x00.shstrtab\x00.nv_fatbin\x00"
    blob = fatbin(entries)
    names_at, blob_at = 64, 64 + len(names)
    headers_at = blob_at + len(blob)
    elf = b"\x7fELF\x02\x01\x01".ljust(16, b"\x00") + b"\x00" * 24
    elf += struct.pack("<Q", headers_at) + b"\x00" * 10 + struct.pack("<HHH", 64, 3, 1)
    sections = b"\x00" * 64
    sections += struct.pack("<IIQQQQ", 1, 3, 0, 0, names_at, len(names)).ljust(64, b"\x00")
    sections += struct.pack("<IIQQQQ", 11, 1, 0, 0, blob_at, len(blob)).ljust(64, b"\x00")
    path.write_bytes(elf + names + blob + sections)
    return path


NVCC_VERSION = "Cuda compilation tools, release 13.0, V13.0.88\n"


def make_host(
    tmp_path: Path,
    *,
    gpus: int = 0,
    env: dict[str, str] | None = None,
    container: bool = False,
    nodes: list[str] | None = None,
    tools: dict[str, str] | None = None,
) -> Host:
    """A host under ``tmp_path``: device nodes for ``gpus`` GPUs, tools answering ``tools``."""
    dev = tmp_path / "dev"
    dev.mkdir(exist_ok=True)
    default_nodes = ["nvidiactl", "nvidia-uvm", *(f"nvidia{i}" for i in range(gpus))]
    for name in default_nodes if nodes is None else nodes:
        (dev / name).touch()
    if container:
        (tmp_path / ".dockerenv").touch()
    tools = {"nvcc": NVCC_VERSION, "nvidia-ctk": "NVIDIA Container Toolkit CLI version 1.17.8"} | (
        tools or {}
    )

    def run(command: list[str], timeout_s: float) -> ToolOutput:
        output = tools[Path(command[0]).name]
        return ToolOutput(0, output if isinstance(output, str) else output(command))

    return Host(
        environ=env or {},
        root=tmp_path,
        hostname="gpu-node-1.example.org",
        which=lambda name: f"/opt/cuda/bin/{name}" if name in tools else None,
        run=run,
    )


def gpu_device(ordinal: int) -> dict:
    return {"ordinal": ordinal, "name": H100, "sm_count": 132, "capability": [9, 0]}


def backend_ok(name: str, devices: list[str]) -> dict:
    checked = ["add/float32", "multiply/int64", "matmul/float64", "matmul/float32"]
    return {"status": "ok", "checked": checked, "skipped": [], "devices": devices, "seconds": 1.5}


class FakeProbes:
    """Canned probe answers for a healthy two-GPU H100 host; records every call."""

    def __init__(self, **answers: object) -> None:
        gpus = [f"{H100} (cuda:{i})" for i in range(2)]
        self.answers = {
            "library": {"loaded": True, "abi": 1, "runtime": 13000, "driver": 13000}
            | {"devices": [gpu_device(0), gpu_device(1)]},
            "framework": {"version": "0.30.4", "sees_gpu": True, "devices": 2, "name": H100}
            | {"runtime": "13.0", "computes": True},
            "backends": {
                "cuda": backend_ok("cuda", gpus),
                "numba": backend_ok("numba", gpus),
                "cpu": backend_ok("cpu", ["cpu"]),
            },
            "measure": {
                "devices": [
                    gpu_device(i)
                    | {"h2d_bytes_per_s": 53e9, "d2h_bytes_per_s": 54e9, "matmul_fp32_flops": 5e13}
                    for i in range(2)
                ]
            },
        } | answers
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, kind: str, args: dict, timeout_s: float) -> ProbeResult:
        self.calls.append((kind, args))
        answer = self.answers[kind]
        if isinstance(answer, ProbeResult):
            return answer
        if kind == "backends":  # like the real probe, answer for the backends asked about
            answer = {name: answer[name] for name in args["names"]}
        return ProbeResult(copy.deepcopy(answer))


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """A kernel library like the real build: sm_75..sm_90 machine code and compute_90 PTX."""
    return write_library(tmp_path / "libgms_kernels.so", [(2, 75), (2, 80), (2, 90), (1, 90)])


@pytest.fixture
def settings(library: Path) -> Settings:
    return Settings(_env_file=None, kernel_lib=library)


def two_gpus(**fields: object) -> FakeNvml:
    return FakeNvml([FakeGpu(uuid="GPU-aaaa-0"), FakeGpu(uuid="GPU-bbbb-1", **fields)])


def doctor(
    args: list[str], settings: Settings, nvml: FakeNvml, host: Host, probe: FakeProbes | None = None
):
    """Invoke the command as a user would, through a Typer app."""
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test app."""

    command = make_doctor_command(settings, nvml, host, probe or FakeProbes())
    app.command("doctor")(command)
    return CliRunner().invoke(app, ["doctor", *args])


def doctor_json(*args: object, extra: list[str] | None = None) -> tuple[int, dict]:
    result = doctor(["--json", *(extra or [])], *args)
    return result.exit_code, json.loads(result.stdout)


def verdicts(report: dict) -> dict[str, str]:
    return {c["name"]: c["verdict"] for c in report["checks"]}


def find(checks: list[Check] | list[dict], name: str):
    return next(c for c in checks if (c["name"] if isinstance(c, dict) else c.name) == name)


# --- no driver ------------------------------------------------------------------------------


def test_no_driver_is_a_warning_and_the_service_is_ready_on_the_cpu(settings, tmp_path):
    nvml, host = FakeNvml([], init_error="Driver Not Loaded"), make_host(tmp_path, nodes=[])
    code, report = doctor_json(settings, nvml, host, extra=["--quick"])
    nvml_check = find(report["checks"], "nvml")
    assert code == 0 and report["ready"] is True
    assert nvml_check["verdict"] == "warn" and "Driver Not Loaded" in nvml_check["value"]
    assert "modprobe nvidia" in nvml_check["hint"]
    assert report["status"] == "ready (CPU only: no NVIDIA driver; 1 warning)"


def test_no_driver_fails_with_require_gpu(settings, tmp_path):
    nvml, host = FakeNvml([], init_error="Driver Not Loaded"), make_host(tmp_path, nodes=[])
    result = doctor(["--require-gpu", "--quick", "--format", "status"], settings, nvml, host)
    assert result.exit_code == 1
    assert result.stdout.strip() == "not ready: nvml: NVML could not start: Driver Not Loaded"


def test_no_driver_formats_describe_a_cpu_node(settings, tmp_path):
    nvml, host = FakeNvml([], init_error="Driver Not Loaded"), make_host(tmp_path, nodes=[])
    tags = doctor(["--format", "tags"], settings, nvml, host)
    gres = doctor(["--format", "gres"], settings, nvml, host)
    labels = doctor(["--format", "labels"], settings, nvml, host)
    assert tags.stdout.split() == ["cpu", "gpu-count=0"] and tags.exit_code == 0
    assert gres.stdout.startswith("# no NVIDIA GPU found on gpu-node-1")
    assert labels.stdout.split() == ["nvidia.com/gpu.present=false", "nvidia.com/gpu.count=0"]


def test_this_machine_without_nvml_is_the_no_driver_case():
    nvml = load_pynvml()
    if nvml is not None and read_inventory(nvml).loaded:
        pytest.skip("NVML works on this machine")
    checks = quick_checks(Settings(_env_file=None))
    assert find(checks, "nvml").verdict == "warn" and not any(c.blocking for c in checks)
    assert find(quick_checks(Settings(_env_file=None), require_gpu=True), "nvml").blocking


# --- zero GPUs ------------------------------------------------------------------------------


def test_zero_gpus_warn_then_fail_with_require_gpu(settings, tmp_path):
    nvml, host = FakeNvml([]), make_host(tmp_path)
    code, report = doctor_json(settings, nvml, host, extra=["--quick"])
    assert code == 0 and verdicts(report)["gpu count"] == "warn"
    assert (
        report["driver"]["version"] == "580.159.04" and report["driver"]["cuda_version"] == "13.0"
    )
    assert report["status"].startswith("ready (CPU only: no GPU")
    code, report = doctor_json(settings, nvml, host, extra=["--quick", "--require-gpu"])
    assert code == 1 and report["status"] == "not ready: gpu count: NVML found no GPU"


# --- two GPUs -------------------------------------------------------------------------------


def test_two_healthy_gpus_pass_everything_and_report_ready(settings, tmp_path):
    probes = FakeProbes()
    code, report = doctor_json(settings, two_gpus(), make_host(tmp_path, gpus=2), probes)
    assert code == 0, [c for c in report["checks"] if c["verdict"] in ("warn", "fail")]
    assert report["status"] == f"ready (GPU: 2x {H100})"
    assert report["counts"]["fail"] == 0 and report["counts"]["warn"] == 0
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["gpu1"]["value"].startswith(f"{H100}, sm_90, 80.0 GiB (2.0 GiB used), GPU-bbbb")
    assert checks["driver"]["value"] == "580.159.04 (supports CUDA 13.0)"
    assert checks["library architectures"]["value"].endswith("sm_90 GPUs: machine code sm_90")
    assert checks["service backend"]["value"] == "auto picks cuda"
    assert "gpu0 53.0 GB/s (84% of PCIe Gen5 x16, 63.0 GB/s)" in checks["pinned h2d"]["value"]
    assert "gpu1 50.0 TFLOP/s (75% of 66.9 FP32 peak)" in checks["matmul fp32"]["value"]
    assert report["gpus"][1]["device_file"] == "/dev/nvidia1" and report["visible_gpus"] == [0, 1]
    assert {kind for kind, _ in probes.calls} == {"library", "framework", "backends", "measure"}
    backends_args = next(args for kind, args in probes.calls if kind == "backends")
    assert set(backends_args["settings"]) == {"backend", "devices", "kernel_lib"}  # no secrets


def test_two_gpus_as_worker_tags_gres_lines_and_node_labels(settings, tmp_path):
    nvml, host = two_gpus(), make_host(tmp_path, gpus=2)
    tags = doctor(["--format", "tags"], settings, nvml, host).stdout.split()
    gres = doctor(["--format", "gres"], settings, nvml, host).stdout.splitlines()
    labels = doctor(["--format", "labels"], settings, nvml, host).stdout.splitlines()
    assert tags == [
        "gpu",
        "gpu-type=nvidia",
        "gpu-count=2",
        "gpu-devices=0,1",
        "gpu-model=nvidia-h100-80gb-hbm3",
        "gpu-arch=sm_90",
        "gpu-memory-gib=80",
        "cuda-driver=13.0",
    ]
    assert "# slurm.conf: NodeName=gpu-node-1 Gres=gpu:h100:2" in gres
    assert "NodeName=gpu-node-1 Name=gpu Type=h100 File=/dev/nvidia0" in gres
    assert "NodeName=gpu-node-1 Name=gpu Type=h100 File=/dev/nvidia1" in gres
    for label in (
        "nvidia.com/gpu.count=2",
        "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3",
        "nvidia.com/gpu.memory=81920",
        "nvidia.com/gpu.family=hopper",
        "nvidia.com/gpu.compute.major=9",
        "nvidia.com/cuda.driver-version.major=580",
        "nvidia.com/cuda.runtime-version.full=13.0",
    ):
        assert label in labels


def test_inventory_formats_and_quick_never_start_a_probe(settings, tmp_path):
    probes = FakeProbes()
    for args in (["--format", "tags"], ["--format", "labels"], ["--quick"]):
        assert (
            doctor(args, settings, two_gpus(), make_host(tmp_path, gpus=2), probes).exit_code == 0
        )
    assert probes.calls == []


def test_table_shows_groups_verdicts_hints_and_the_status_line(settings, tmp_path):
    result = doctor([], settings, two_gpus(persistence=0), make_host(tmp_path, gpus=2))
    assert result.exit_code == 0
    for text in ("driver", "devices", "container", "toolkit", "frameworks", "workload"):
        assert text in result.stdout
    assert "nvidia-smi -pm 1" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == f"ready (GPU: 2x {H100}; 1 warning)"


def test_cuda_visible_devices_narrows_what_the_service_sees(settings, tmp_path):
    host = make_host(tmp_path, gpus=2, env={"CUDA_VISIBLE_DEVICES": "1"})
    tags = doctor(["--format", "tags"], settings, two_gpus(), host).stdout.split()
    code, report = doctor_json(settings, two_gpus(), host, extra=["--quick"])
    assert code == 0 and "gpu-count=1" in tags and "gpu-devices=1" in tags
    assert report["status"] == f"ready (GPU: 1x {H100})"
    assert "1 of 2 GPUs visible (gpu1)" in find(report["checks"], "visible devices")["value"]


def test_cuda_visible_devices_hiding_every_gpu_warns_then_fails(settings, tmp_path):
    host = make_host(tmp_path, gpus=2, env={"CUDA_VISIBLE_DEVICES": ""})
    code, report = doctor_json(settings, two_gpus(), host, extra=["--quick"])
    assert code == 0 and verdicts(report)["visible devices"] == "warn"
    assert report["status"].startswith("ready (CPU only: CUDA_VISIBLE_DEVICES hides every GPU")
    code, _ = doctor_json(settings, two_gpus(), host, extra=["--quick", "--require-gpu"])
    assert code == 1


def test_visible_indices_take_uuid_prefixes_and_stop_at_an_unknown_entry():
    devices = read_inventory(two_gpus()).devices
    assert visible_indices(devices, {"CUDA_VISIBLE_DEVICES": "GPU-bbbb,0"}) == [1, 0]
    assert visible_indices(devices, {"CUDA_VISIBLE_DEVICES": "0,7,1"}) == [0]
    assert visible_indices(devices, {"CUDA_VISIBLE_DEVICES": "GPU-,1"}) == []
    assert visible_indices(devices, {}) == [0, 1]


def test_gms_devices_beyond_the_visible_gpus_fail(tmp_path, library):
    settings = Settings(_env_file=None, kernel_lib=library, devices="0,2")
    checks = quick_checks(settings, nvml=two_gpus(), host=make_host(tmp_path, gpus=2))
    check = find(checks, "visible devices")
    assert check.blocking and "GMS_DEVICES asks for CUDA ordinal(s) [2]" in check.value


# --- MIG ------------------------------------------------------------------------------------


def test_mig_on_without_mig_devices_fails(settings, tmp_path):
    nvml = two_gpus(mig_mode=(1, 1), mig_devices=0)
    code, report = doctor_json(settings, nvml, make_host(tmp_path, gpus=2), extra=["--quick"])
    mig = find(report["checks"], "mig")
    assert code == 1 and mig["verdict"] == "fail" and "gpu1" in mig["value"]
    assert "nvidia-smi mig -i 1 -cgi" in mig["hint"]


def test_mig_on_with_mig_devices_warns_and_gres_lets_slurm_discover_them(settings, tmp_path):
    nvml, host = two_gpus(mig_mode=(1, 1), mig_devices=3), make_host(tmp_path, gpus=2)
    code, report = doctor_json(settings, nvml, host, extra=["--quick"])
    gres = doctor(["--format", "gres"], settings, nvml, host).stdout.splitlines()
    labels = doctor(["--format", "labels"], settings, nvml, host).stdout.splitlines()
    assert code == 0 and verdicts(report)["mig"] == "warn"
    assert "gpu1: 3 MIG devices" in find(report["checks"], "mig")["value"]
    assert gres[-1] == "AutoDetect=nvml" and not any("File=" in line for line in gres)
    assert "nvidia.com/mig.capable=true" in labels


def test_mig_change_pending_warns_and_no_mig_support_passes(settings, tmp_path):
    pending = quick_checks(settings, nvml=two_gpus(mig_mode=(0, 1)), host=make_host(tmp_path))
    absent = FakeNvml([FakeGpu(mig_mode=None, ecc_mode=None, remapped_rows=None)])
    plain = quick_checks(settings, nvml=absent, host=make_host(tmp_path))
    assert find(pending, "mig").verdict == "warn" and "reset" in find(pending, "mig").hint
    assert find(plain, "mig").value == "not MIG-capable" and find(plain, "ecc").verdict == "skip"


# --- ECC ------------------------------------------------------------------------------------


def test_uncorrectable_ecc_errors_fail_even_without_require_gpu(settings, tmp_path):
    nvml = two_gpus(ecc_uncorrected=3)
    result = doctor(["--quick", "--format", "status"], settings, nvml, make_host(tmp_path, gpus=2))
    code, report = doctor_json(settings, nvml, make_host(tmp_path, gpus=2), extra=["--quick"])
    ecc = find(report["checks"], "ecc")
    assert result.exit_code == 1 and code == 1
    assert result.stdout.strip() == "not ready: ecc: gpu1: 3 uncorrectable errors"
    assert ecc["required"] and "nvidia-smi -q -i 1 -d ECC" in ecc["hint"]
    assert report["gpus"][1]["ecc"]["uncorrected_volatile"] == 3


def test_corrected_errors_and_pending_row_remaps_only_warn(settings, tmp_path):
    nvml = two_gpus(ecc_corrected=12, remapped_rows=(1, 0, 1, 0))
    checks = quick_checks(settings, nvml=nvml, host=make_host(tmp_path, gpus=2))
    ecc = find(checks, "ecc")
    assert ecc.verdict == "warn" and not ecc.blocking
    assert ecc.value == "gpu1: row remap pending; gpu1: 12 corrected errors"


def test_failed_row_remapping_fails(settings, tmp_path):
    nvml = two_gpus(remapped_rows=(0, 4, 0, 1))
    ecc = find(quick_checks(settings, nvml=nvml, host=make_host(tmp_path, gpus=2)), "ecc")
    assert ecc.blocking and ecc.value == "gpu1: row remapping failed"


def test_hot_throttled_gpu_warns_with_its_readings(settings, tmp_path):
    nvml = two_gpus(temperature=91, sm_clock=1200, throttle_reasons=0x40)
    check = find(
        quick_checks(settings, nvml=nvml, host=make_host(tmp_path)), "temperature and clocks"
    )
    assert check.verdict == "warn"
    assert (
        "gpu1 91 °C, SM 1200/1980 MHz, mem 2619/2619 MHz (hardware thermal slowdown)" in check.value
    )


# --- the kernel library ---------------------------------------------------------------------


def test_library_built_for_another_architecture_fails(tmp_path):
    wrong = write_library(tmp_path / "libgms_kernels.so", [(2, 75), (2, 80)])
    settings = Settings(_env_file=None, kernel_lib=wrong)
    probes = FakeProbes()
    probes.answers["backends"]["cuda"] = {
        "status": "unavailable",
        "detail": "cuda: no kernel image is available for execution on the device",
    }
    code, report = doctor_json(settings, two_gpus(), make_host(tmp_path, gpus=2), probes)
    arch = find(report["checks"], "library architectures")
    assert code == 1 and arch["verdict"] == "fail" and arch["required"]
    assert arch["value"] == "built for sm_75, sm_80 (.nv_fatbin); sm_90 GPUs: NO CODE"
    assert "nvcc that supports sm_90" in arch["hint"]
    assert report["status"].startswith("not ready: library architectures: built for sm_75, sm_80")
    assert verdicts(report)["service backend"] == "pass"  # numba still serves


def test_library_with_older_ptx_runs_through_jit(tmp_path):
    jit = write_library(tmp_path / "lib.so", [(2, 80), (1, 80)])
    settings = Settings(_env_file=None, kernel_lib=jit)
    _, report = doctor_json(settings, two_gpus(), make_host(tmp_path, gpus=2), FakeProbes())
    arch = find(report["checks"], "library architectures")
    assert arch["verdict"] == "pass" and arch["value"].endswith(
        "sm_90 GPUs: JIT from compute_80 PTX"
    )


def test_machine_code_runs_on_later_minor_versions_only():
    code = CodeArchs(sass=(80, 90), ptx=(), source="test")
    assert code.runs_on(86) == "machine code sm_80" and code.runs_on(90) == "machine code sm_90"
    assert code.runs_on(75) is None and code.runs_on(100) is None


def test_architectures_come_from_cuobjdump_when_the_toolkit_has_it(tmp_path):
    listing = {
        "--list-elf": "ELF file    1: lib.1.sm_80.cubin\nELF file    2: lib.2.sm_90a.cubin\n",
        "--list-ptx": "PTX file    1: libgms_kernels.1.sm_90.ptx\n",
    }
    host = make_host(tmp_path, tools={"cuobjdump": lambda command: listing[command[1]]})
    code = read_code_archs(tmp_path / "not-even-elf.so", host)
    assert code == CodeArchs(sass=(80, 90), ptx=(90,), source="cuobjdump")


def test_fatbin_parser_reads_every_container(tmp_path):
    two = fatbin([(2, 75), (1, 90)]) + fatbin([(2, 86), (2, 90)])
    assert fatbin_archs(two) == CodeArchs(sass=(75, 86, 90), ptx=(90,), source=".nv_fatbin")
    with pytest.raises(ValueError, match="not a 64-bit"):
        elf_section(b"MZ not an ELF file at all", ".nv_fatbin")
    with pytest.raises(ValueError, match="no GPU code"):
        fatbin_archs(b"\x00" * 64)


def test_the_packaged_library_has_readable_gpu_code():
    found = find_kernel_library(Settings(_env_file=None)).path
    if found is None:
        pytest.skip("the kernel library is not built here")
    code = fatbin_archs(elf_section(found.read_bytes(), ".nv_fatbin"))
    assert code.sass and code.ptx


@pytest.mark.parametrize(
    ("driver", "runtime", "verdict"),
    [
        (13000, 13000, "pass"),
        (13010, 12080, "pass"),
        (12020, 12040, "warn"),
        (12040, 13000, "fail"),
    ],
)
def test_driver_must_support_the_library_runtime(driver, runtime, verdict):
    check = driver_runtime_check({"runtime": runtime, "driver": driver}, NvmlInventory(True), True)
    assert check.verdict == verdict
    if verdict == "fail":
        assert "580+" in check.hint and check.blocking


def test_a_configured_library_that_is_missing_fails_and_cuda_is_not_tried(tmp_path):
    settings = Settings(_env_file=None, kernel_lib=tmp_path / "nowhere.so")
    _, report = doctor_json(settings, two_gpus(), make_host(tmp_path, gpus=2), FakeProbes())
    lib = find(report["checks"], "kernel library")
    assert lib["verdict"] == "fail" and "does not exist" in lib["value"]
    assert verdicts(report)["pinned h2d"] == "skip" and verdicts(report)["backend cuda"] == "warn"


def test_library_that_does_not_load_fails_with_a_rebuild_hint(settings, tmp_path):
    answer = {"loaded": False, "error": "cuda: lib.so has ABI 0, this package needs 1; rebuild it"}
    probes = FakeProbes(library=answer)
    _, report = doctor_json(settings, two_gpus(), make_host(tmp_path, gpus=2), probes)
    check = find(report["checks"], "library loads")
    assert check["verdict"] == "fail" and "build-kernels" in check["hint"]


# --- container ------------------------------------------------------------------------------


def test_container_without_the_compute_capability_or_device_nodes(settings, tmp_path):
    env = {"NVIDIA_DRIVER_CAPABILITIES": "utility"}
    host = make_host(tmp_path, container=True, env=env, nodes=["nvidiactl", "nvidia0"])
    checks = quick_checks(settings, nvml=two_gpus(), host=host)
    assert find(checks, "container").value == "in a container: docker (/.dockerenv)"
    assert find(checks, "driver capabilities").verdict == "warn"
    assert find(checks, "device nodes").blocking
    assert find(checks, "device nodes").value.startswith("missing nvidia-uvm, nvidia1")
    required = quick_checks(settings, nvml=two_gpus(), host=host, require_gpu=True)
    assert find(required, "driver capabilities").blocking


def test_host_with_docker_but_no_container_toolkit_warns(settings, tmp_path):
    host = make_host(tmp_path, gpus=2, tools={"docker": ""})
    host = Host(host.environ, host.root, host.hostname, lambda n: n if n == "docker" else None)
    check = find(quick_checks(settings, nvml=two_gpus(), host=host), "container toolkit")
    assert check.verdict == "warn" and "nvidia-ctk runtime configure" in check.hint


# --- frameworks and workload ----------------------------------------------------------------


def test_optional_frameworks_only_warn_but_numba_must_see_a_present_gpu():
    numba, torch = FRAMEWORKS[0], FRAMEWORKS[2]
    blind = ProbeResult({"version": "1", "sees_gpu": False, "error": "no driver"})
    assert framework_check(numba, blind, 2, gpu_expected=True).blocking
    assert framework_check(torch, blind, 2, gpu_expected=True).verdict == "warn"
    assert framework_check(numba, blind, 0, gpu_expected=False).verdict == "skip"
    assert framework_check(torch, None, 2, gpu_expected=True).value == "not installed (optional)"
    crashed = framework_check(numba, ProbeResult(None, "crashed with SIGSEGV: x"), 2, True)
    assert crashed.blocking and crashed.value == "probe crashed with SIGSEGV: x"


def test_a_backend_giving_wrong_answers_fails_even_on_a_cpu_only_host(settings, tmp_path):
    probes = FakeProbes()
    probes.answers["backends"]["cpu"] = {"status": "wrong", "detail": "add/float32 differs"}
    nvml = FakeNvml([], init_error="Driver Not Loaded")
    code, report = doctor_json(settings, nvml, make_host(tmp_path, nodes=[]), probes)
    assert code == 1 and find(report["checks"], "backend cpu")["value"].startswith("WRONG ANSWER")


def test_auto_picking_a_backend_that_starts_but_fails_is_not_ready(settings, tmp_path):
    probes = FakeProbes()
    probes.answers["backends"]["cuda"] = {"status": "error", "detail": "BackendFailure: boom"}
    code, report = doctor_json(settings, two_gpus(), make_host(tmp_path, gpus=2), probes)
    assert code == 1 and find(report["checks"], "service backend")["value"] == (
        "auto picks cuda, which starts but then fails (see its row)"
    )


def test_a_gpu_host_whose_gpu_backends_fail_is_not_ready(settings, tmp_path):
    probes = FakeProbes()
    for name in ("cuda", "numba"):
        probes.answers["backends"][name] = {"status": "unavailable", "detail": f"{name}: broken"}
    code, report = doctor_json(settings, two_gpus(), make_host(tmp_path, gpus=2), probes)
    assert code == 1
    assert find(report["checks"], "service backend")["value"] == (
        "auto picks cpu although a GPU is expected"
    )


def test_an_explicit_backend_that_cannot_start_fails(tmp_path, library):
    settings = Settings(_env_file=None, kernel_lib=library, backend="numba")
    probes = FakeProbes()
    probes.answers["backends"]["numba"] = {"status": "unavailable", "detail": "numba: no CUDA"}
    _, report = doctor_json(settings, FakeNvml([]), make_host(tmp_path), probes)
    check = find(report["checks"], "service backend")
    assert (
        check["verdict"] == "fail"
        and check["value"] == "GMS_BACKEND=numba, which cannot start: numba: no CUDA"
    )


def test_a_probe_that_hangs_fails_the_workload_where_a_gpu_is_present(settings, tmp_path):
    probes = FakeProbes(
        backends=ProbeResult(None, "no answer after 300 s (killed): CUDA hangs here")
    )
    code, report = doctor_json(settings, two_gpus(), make_host(tmp_path, gpus=2), probes)
    assert code == 1
    cuda = find(report["checks"], "backend cuda")
    assert cuda["verdict"] == "fail" and cuda["value"].startswith("probe no answer")


def test_a_backend_that_answers_then_crashes_at_exit_is_a_warning_not_a_failure(settings, tmp_path):
    # Seen on two H200s: numba-cuda's exit handlers segfault after correct answers.
    gpus = [f"{H100} (cuda:{i})" for i in range(2)]
    answers = {"numba": backend_ok("numba", gpus)}
    probes = FakeProbes(
        backends=ProbeResult(answers, "crashed at exit with SIGSEGV: Fatal Python error")
    )
    _, report = doctor_json(settings, two_gpus(), make_host(tmp_path, gpus=2), probes)
    numba = find(report["checks"], "backend numba")
    assert numba["verdict"] == "warn"
    assert "crashed at exit with SIGSEGV" in numba["value"]
    assert "cuda backend" in numba["hint"]


def test_slow_copies_and_matmul_warn_against_what_the_device_should_reach():
    devices = read_inventory(FakeNvml([FakeGpu(pcie_max=(4, 16), cuda_cores=None)])).devices
    slow = {"h2d_bytes_per_s": 9e9, "d2h_bytes_per_s": 26e9, "matmul_fp32_flops": 1e13}
    answer = ProbeResult({"devices": [gpu_device(0) | slow]})
    h2d, d2h, matmul = measurement_checks(answer, devices)
    assert h2d.verdict == "warn" and h2d.value == "gpu0 9.0 GB/s (29% of PCIe Gen4 x16, 31.5 GB/s)"
    assert d2h.verdict == "pass"
    # No core count from NVML: 132 SMs x 128 lanes x 2 x 1980 MHz.
    assert matmul.verdict == "warn" and matmul.value == "gpu0 10.0 TFLOP/s (15% of 66.9 FP32 peak)"


def test_probes_run_in_a_subprocess_and_answer_or_time_out(tmp_path):
    missing = run_probe("library", {"path": str(tmp_path / "missing.so")}, 60)
    assert missing.data["loaded"] is False and "cannot load" in missing.data["error"]
    cpu = run_probe("backends", {"settings": {"backend": "cpu"}, "names": ["cpu"]}, 60)
    assert cpu.data["cpu"]["status"] == "ok" and "matmul/float64" in cpu.data["cpu"]["checked"]
    hung = run_probe("backends", {"settings": {}, "names": ["cpu"]}, 0.01)
    assert hung.data is None and hung.error.startswith("no answer after")


# --- names for schedulers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "gres", "label"),
    [
        (H100, "h100", "NVIDIA-H100-80GB-HBM3"),
        ("NVIDIA A100-SXM4-80GB", "a100", "NVIDIA-A100-SXM4-80GB"),
        ("Tesla V100-SXM2-16GB", "v100", "Tesla-V100-SXM2-16GB"),
        ("NVIDIA GeForce RTX 4090", "rtx_4090", "NVIDIA-GeForce-RTX-4090"),
        ("NVIDIA L40S", "l40s", "NVIDIA-L40S"),
    ],
)
def test_model_names_become_gres_types_and_label_values(name, gres, label):
    assert gres_type(name) == gres and label_value(name) == label


def test_families_follow_gpu_feature_discovery():
    assert [gpu_family(c) for c in [(7, 0), (7, 5), (8, 0), (8, 9), (9, 0), (10, 0)]] == [
        "volta",
        "turing",
        "ampere",
        "ada-lovelace",
        "hopper",
        "blackwell",
    ]


def test_diagnose_quick_runs_the_same_checks_as_quick_checks(settings, tmp_path):
    host = make_host(tmp_path, gpus=2)
    report = diagnose(settings, quick=True, nvml=two_gpus(), host=host)
    assert [c.name for c in report.checks] == [
        c.name for c in quick_checks(settings, nvml=two_gpus(), host=host)
    ]
    assert {c.group for c in report.checks} == {"driver", "devices", "container"}
