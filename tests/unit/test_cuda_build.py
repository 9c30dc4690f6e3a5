"""Building the CUDA C library with this machine's nvcc (no GPU needed), and finding it."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from gpu_matrix_service.backends.base import BackendUnavailable
from gpu_matrix_service.backends.cuda import binding, build
from gpu_matrix_service.errors import BackendFailure, DeviceOutOfMemory
from gpu_matrix_service.settings import Settings

needs_nvcc = pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc is not installed")

CUDA_13_LIST = "compute_75 compute_80 compute_86 compute_87 compute_88 compute_89 compute_90 "
CUDA_13_LIST += "compute_100 compute_110 compute_103 compute_120 compute_121"
CUDA_12_LIST = "compute_50 compute_52 compute_53 compute_60 compute_61 compute_62 compute_70 "
CUDA_12_LIST += "compute_72 compute_75 compute_80 compute_86 compute_87 compute_89 compute_90"


def test_archs_are_sm75_to_sm90_under_cuda_13():
    assert build.select_archs(CUDA_13_LIST.split()) == [75, 80, 86, 87, 88, 89, 90]


def test_archs_include_sm70_under_cuda_12():
    assert build.select_archs(CUDA_12_LIST.split()) == [70, 72, 75, 80, 86, 87, 89, 90]


def test_newest_arch_also_gets_ptx_for_later_gpus():
    flags = build.gencode_flags([75, 80, 90])
    assert flags == [
        "-gencode",
        "arch=compute_75,code=sm_75",
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-gencode",
        "arch=compute_90,code=[sm_90,compute_90]",
    ]


@needs_nvcc
def test_installed_nvcc_covers_turing_to_hopper():
    archs = build.supported_archs(build.find_nvcc())
    assert archs[0] <= 75 and archs[-1] == 90


@needs_nvcc
def test_built_library_exports_the_binding_symbols_and_nothing_of_cudart(tmp_path):
    path = build.build_kernels(output_dir=tmp_path, archs=["sm_90"])
    assert path == tmp_path / "libgms_kernels.so"
    library = binding.KernelLibrary(path)  # checks every symbol and the ABI version
    assert library.path == path
    if shutil.which("nm"):
        listing = subprocess.run(
            ["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True
        ).stdout
        exported = {line.split()[-1] for line in listing.splitlines() if " T " in line}
        assert exported == set(binding.EXPORTED_SYMBOLS)


@needs_nvcc
def test_library_reports_a_missing_gpu_as_an_error_not_a_crash(tmp_path):
    library = binding.KernelLibrary(build.build_kernels(output_dir=tmp_path, archs=["90"]))
    try:
        outcome = str(library.device_count())
    except BackendFailure as exc:  # a machine without a driver or GPU, as in CI
        outcome = exc.detail
    assert outcome.isdigit() or "cudaGetDeviceCount" in outcome


@needs_nvcc
def test_a_launched_jobs_cuda_error_becomes_a_typed_error(tmp_path):
    library = binding.KernelLibrary(build.build_kernels(output_dir=tmp_path, archs=["90"]))
    assert isinstance(library.launch_error(2), DeviceOutOfMemory)  # cudaErrorMemoryAllocation
    illegal = library.launch_error(700)  # cudaErrorIllegalAddress
    assert isinstance(illegal, BackendFailure)
    assert "illegal memory access" in illegal.detail


@needs_nvcc
@pytest.mark.parametrize("entry", ["gms_elementwise_zero_copy", "gms_elementwise_launch"])
def test_small_elementwise_entry_points_refuse_bad_arguments_before_touching_cuda(tmp_path, entry):
    library = binding.KernelLibrary(build.build_kernels(output_dir=tmp_path, archs=["90"]))
    last = ctypes.c_uint64(1) if entry == "gms_elementwise_launch" else (ctypes.c_double * 4)()
    no_handle = (None, 0, 0, None, None, None, 4)  # add, float32, 4 elements
    bad_op = (1, 7, 0, None, None, None, 4)
    too_many = (1, 0, 0, None, None, None, 1 << 62)  # n * 4 would wrap around
    for args in (no_handle, bad_op, too_many):
        with pytest.raises(BackendFailure, match=f"{entry}: bad arguments"):
            library._call(entry, *args, last)


def test_bad_arch_is_refused():
    with pytest.raises(build.BuildError, match="not a GPU architecture"):
        build.build_kernels(output_dir=Path("/nonexistent"), nvcc="nvcc", archs=["hopper"])


def test_configured_library_that_does_not_exist_is_unavailable():
    with pytest.raises(BackendUnavailable, match="not found"):
        binding.locate_library(Path("/nonexistent/libgms_kernels.so"))


def test_backend_without_its_library_is_unavailable():
    from gpu_matrix_service.backends.cuda.backend import CudaBackend

    settings = Settings(_env_file=None, kernel_lib=Path("/nonexistent/libgms_kernels.so"))
    with pytest.raises(BackendUnavailable, match="not found"):
        CudaBackend(settings)
