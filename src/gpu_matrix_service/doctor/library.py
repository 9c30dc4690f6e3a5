"""Checks on the CUDA toolkit and the service's kernel library (``libgms_kernels.so``).

Is nvcc there (and not newer than the driver), is the library built, is it built for the
architecture of each visible GPU (machine code, or PTX the driver can JIT-compile), does it
load, and does the driver support the CUDA runtime it was built with. The architectures come
from ``cuobjdump --list-elf/--list-ptx`` when the toolkit has it, else from the library's own
``.nv_fatbin`` section, parsed here (:func:`fatbin_archs`).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpu_matrix_service.doctor.checks import Check, Host, problem
from gpu_matrix_service.doctor.nvml_queries import DeviceFacts, NvmlInventory
from gpu_matrix_service.doctor.probe_runner import ProbeRunner
from gpu_matrix_service.gpu import cuda_text
from gpu_matrix_service.settings import Settings

FATBIN_MAGIC = 0xBA55ED50
FATBIN_PTX, FATBIN_ELF = 1, 2
LIBRARY_PROBE_TIMEOUT_S = 60.0
# The oldest driver branch of each CUDA major version (CUDA's minor version compatibility).
MIN_DRIVER_BRANCH = {11: "450.80.02", 12: "525.60.13", 13: "580"}
REBUILD_HINT = "rebuild it here: `gpu-matrix-service build-kernels` (needs nvcc)"


@dataclass(frozen=True)
class LibraryLocation:
    """Where the kernel library is (``path``; None when absent) and how that was decided."""

    path: Path | None
    detail: str
    configured: bool = False


@dataclass(frozen=True)
class CodeArchs:
    """The GPU code in a library: machine code (SASS) per ``sm_XY`` and PTX per
    ``compute_XY``, as numbers (90 for sm_90); ``source`` says how they were read."""

    sass: tuple[int, ...]
    ptx: tuple[int, ...]
    source: str

    def describe(self) -> str:
        """``sm_75, sm_80 + PTX compute_80``."""
        sass = ", ".join(f"sm_{a}" for a in self.sass) or "no machine code"
        ptx = " + PTX " + ", ".join(f"compute_{a}" for a in self.ptx) if self.ptx else ""
        return sass + ptx

    def runs_on(self, arch: int) -> str | None:
        """How code for a GPU of architecture ``arch`` (90 for 9.0) loads, or None if it cannot.

        Machine code for sm_XY runs on capability X.Z with Z >= Y; PTX for compute_XY is
        JIT-compiled by the driver for any capability >= X.Y.
        """
        native = [a for a in self.sass if a // 10 == arch // 10 and a <= arch]
        if native:
            return f"machine code sm_{max(native)}"
        jit = [a for a in self.ptx if a <= arch]
        return f"JIT from compute_{max(jit)} PTX" if jit else None


def find_kernel_library(settings: Settings) -> LibraryLocation:
    """The library the cuda backend would load, without building it (the backend itself
    builds a missing one at start-up when nvcc is there)."""
    try:
        from gpu_matrix_service.backends.cuda import binding, build
    except ImportError as exc:
        return LibraryLocation(None, f"the cuda backend cannot be imported: {exc}")
    if settings.kernel_lib is not None:
        if settings.kernel_lib.is_file():
            return LibraryLocation(settings.kernel_lib, "GMS_KERNEL_LIB", True)
        return LibraryLocation(None, f"GMS_KERNEL_LIB={settings.kernel_lib} does not exist", True)
    candidates = [
        binding.PACKAGE_DIR / binding.LIBRARY_NAME,
        binding.user_cache_dir() / build.source_digest() / binding.LIBRARY_NAME,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return LibraryLocation(candidate, "packaged" if candidate == candidates[0] else "cache")
    return LibraryLocation(None, "not built (looked in " + ", ".join(map(str, candidates)) + ")")


def toolkit_checks(
    inventory: NvmlInventory,
    visible: Sequence[int],
    lib: LibraryLocation,
    host: Host,
    probe: ProbeRunner,
    gpu_expected: bool,
) -> list[Check]:
    """nvcc, then the kernel library: present, built for these GPUs, loads, driver new enough."""
    devices = [d for d in inventory.devices if d.index in visible]
    checks = [nvcc_check(inventory, lib, host), library_present_check(lib, host, gpu_expected)]
    if lib.path is None:
        return checks
    checks.append(library_arch_check(lib.path, devices, host, gpu_expected))
    answer = probe("library", {"path": str(lib.path)}, LIBRARY_PROBE_TIMEOUT_S)
    data = answer.data or {}
    checks.append(library_load_check(data, answer.error, gpu_expected))
    checks.append(driver_runtime_check(data, inventory, gpu_expected))
    return checks


def nvcc_check(inventory: NvmlInventory, lib: LibraryLocation, host: Host) -> Check:
    """nvcc's version; newer than the driver's CUDA means what it builds will not run here."""
    nvcc = host.find_tool("nvcc")
    if nvcc is None:
        if lib.path is None:
            return Check(
                "nvcc",
                "toolkit",
                "warn",
                "not found, and the kernel library is not built",
                "install the CUDA toolkit (nvcc) to build it, or use the service image, which "
                "ships it built",
            )
        return Check("nvcc", "toolkit", "skip", "not installed (not needed: the library is built)")
    out = host.run([nvcc, "--version"], 30.0)
    match = re.search(r"release (\d+)\.(\d+), V([\d.]+)", out.output) if out else None
    if match is None:
        return Check(
            "nvcc", "toolkit", "warn", f"{nvcc} gives no version", "reinstall the CUDA toolkit"
        )
    version = (int(match.group(1)), int(match.group(2)))
    value = f"{match.group(3)} ({nvcc})"
    data = {"path": nvcc, "version": match.group(3)}
    driver = inventory.cuda_driver_version
    if driver is not None and version[0] > driver // 1000:
        return Check(
            "nvcc",
            "toolkit",
            "warn",
            f"{value}, newer than the driver's CUDA {cuda_text(driver)}",
            f"what this nvcc builds needs a CUDA {version[0]} driver (branch "
            f"{MIN_DRIVER_BRANCH.get(version[0], 'newer')}+): upgrade the driver or build "
            "with an older toolkit",
            data=data,
        )
    return Check("nvcc", "toolkit", "pass", value, data=data)


def library_present_check(lib: LibraryLocation, host: Host, gpu_expected: bool) -> Check:
    """The kernel library exists (GMS_KERNEL_LIB, the package, or the build cache)."""
    if lib.path is not None:
        size = lib.path.stat().st_size / 2**20
        value = f"{lib.path} ({size:.1f} MiB, {lib.detail})"
        return Check("kernel library", "toolkit", "pass", value, data={"path": str(lib.path)})
    if lib.configured:
        return Check(
            "kernel library",
            "toolkit",
            problem(gpu_expected),
            lib.detail,
            "point GMS_KERNEL_LIB at a built libgms_kernels.so, or unset it for the packaged one",
            gpu_expected,
        )
    if not gpu_expected:
        return Check("kernel library", "toolkit", "skip", f"{lib.detail}; no GPU to use it")
    builds = host.find_tool("nvcc") is not None
    return Check(
        "kernel library",
        "toolkit",
        "warn",
        lib.detail + ("; the service builds it at start (about a minute)" if builds else ""),
        "build it ahead of time: `gpu-matrix-service build-kernels`; until then the numba "
        "backend serves",
    )


def library_arch_check(
    path: Path, devices: Sequence[DeviceFacts], host: Host, gpu_expected: bool
) -> Check:
    """The library holds machine code or JIT-able PTX for each visible GPU's architecture."""
    try:
        code = read_code_archs(path, host)
    except (OSError, ValueError) as exc:
        return Check(
            "library architectures", "toolkit", "warn", f"cannot read: {exc}", REBUILD_HINT
        )
    data = {"sass": list(code.sass), "ptx": list(code.ptx), "source": code.source}
    built = f"built for {code.describe()} ({code.source})"
    if not devices:
        return Check(
            "library architectures", "toolkit", "skip", f"{built}; no GPU to compare", data=data
        )
    verdicts, missing = [], []
    for arch in sorted({d.arch for d in devices if d.arch is not None}):
        how = code.runs_on(arch)
        verdicts.append(f"sm_{arch} GPUs: {how or 'NO CODE'}")
        if how is None:
            missing.append(arch)
    value = f"{built}; " + "; ".join(verdicts)
    if missing:
        wanted = ",".join(f"sm_{a}" for a in missing)
        return Check(
            "library architectures",
            "toolkit",
            problem(gpu_expected),
            value,
            f"the library cannot run on {wanted} (CUDA would say 'no kernel image is available'): "
            f"rebuild it with an nvcc that supports {wanted} (`gpu-matrix-service build-kernels` "
            "builds for every architecture nvcc knows, plus PTX for newer GPUs)",
            gpu_expected,
            data,
        )
    return Check("library architectures", "toolkit", "pass", value, data=data)


def library_load_check(data: dict, error: str | None, gpu_expected: bool) -> Check:
    """The library loads (dlopen, symbols, ABI) and CUDA answers through it."""
    if error is not None:
        return Check(
            "library loads",
            "toolkit",
            problem(gpu_expected),
            f"load probe {error}",
            "the CUDA driver or the library is broken: run the probe by hand "
            "(python -m gpu_matrix_service.doctor.probes library '{\"path\": ...}')",
            gpu_expected,
        )
    if not data.get("loaded"):
        return Check(
            "library loads",
            "toolkit",
            problem(gpu_expected),
            str(data.get("error")),
            REBUILD_HINT,
            gpu_expected,
        )
    runtime = data.get("runtime")
    shown = f"ABI {data.get('abi')}" + (f", CUDA runtime {cuda_text(runtime)}" if runtime else "")
    if "cuda_error" in data:
        if gpu_expected:
            return Check(
                "library loads",
                "toolkit",
                "fail",
                f"loads ({shown}) but CUDA fails: {data['cuda_error']}",
                "the driver does not serve this process: see the driver and device checks",
                True,
                data,
            )
        return Check(
            "library loads", "toolkit", "pass", f"loads ({shown}); no CUDA device", data=data
        )
    count = len(data.get("devices", []))
    return Check(
        "library loads", "toolkit", "pass", f"loads ({shown}), sees {count} GPU(s)", data=data
    )


def driver_runtime_check(data: dict, inventory: NvmlInventory, gpu_expected: bool) -> Check:
    """The driver supports the CUDA runtime the library was built with."""
    runtime = data.get("runtime")
    driver = data.get("driver") or inventory.cuda_driver_version
    if not runtime or not driver:
        return Check("driver vs runtime", "toolkit", "skip", "no CUDA driver or runtime version")
    value = f"driver CUDA {cuda_text(driver)}, library runtime CUDA {cuda_text(runtime)}"
    info = {"driver": driver, "runtime": runtime}
    if driver >= runtime:
        return Check("driver vs runtime", "toolkit", "pass", value, data=info)
    if driver // 1000 == runtime // 1000:
        return Check(
            "driver vs runtime",
            "toolkit",
            "warn",
            value + " (minor version compatibility)",
            "it runs, but PTX from the newer toolkit cannot be JIT-compiled by this driver; "
            "upgrade the driver when you can",
            data=info,
        )
    major = runtime // 1000
    return Check(
        "driver vs runtime",
        "toolkit",
        problem(gpu_expected),
        value,
        f"upgrade the driver to a CUDA {major} branch ({MIN_DRIVER_BRANCH.get(major, 'newer')}+), "
        f"or rebuild the library with a CUDA {driver // 1000} nvcc",
        gpu_expected,
        info,
    )


def read_code_archs(path: Path, host: Host) -> CodeArchs:
    """The architectures in ``path``: cuobjdump's listing when available, else the fatbin."""
    cuobjdump = host.find_tool("cuobjdump")
    if cuobjdump is not None:
        elf = host.run([cuobjdump, "--list-elf", str(path)], 30.0)
        ptx = host.run([cuobjdump, "--list-ptx", str(path)], 30.0)
        if elf and ptx and elf.returncode == 0 and ptx.returncode == 0:
            return CodeArchs(_listed(elf.output), _listed(ptx.output), "cuobjdump")
    return fatbin_archs(elf_section(path.read_bytes(), ".nv_fatbin"))


def _listed(output: str) -> tuple[int, ...]:
    # "ELF file    1: libgms_kernels.1.sm_80.cubin", "PTX file    1: ....sm_90.ptx"
    return tuple(sorted({int(m) for m in re.findall(r"\.sm_(\d+)a?\.", output)}))


def elf_section(data: bytes, name: str) -> bytes:
    """The bytes of section ``name`` of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * entsize) for i in range(count)]
    names_offset = headers[names_index][4]
    for name_at, _, _, _, offset, size in headers:
        start = names_offset + name_at
        if data[start : data.index(b"\0", start)].decode(errors="replace") == name:
            return data[offset : offset + size]
    raise ValueError(f"no {name} section: the library holds no GPU code")


def fatbin_archs(blob: bytes) -> CodeArchs:
    """The architectures in a ``.nv_fatbin`` section: containers of entries, each a 16-byte
    header (magic, version, header size, payload size), then per entry its kind (1 PTX,
    2 ELF), header size, padded payload size and, at byte 28, the ``sm_XY`` number."""
    sass, ptx = set(), set()
    position = 0
    while position + 16 <= len(blob):
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", blob, position)
        if magic != FATBIN_MAGIC:
            position += 8  # containers are 8-byte aligned; skip padding between them
            continue
        entry, end = position + header_size, position + header_size + fat_size
        while entry + 32 <= min(end, len(blob)):
            kind, _, entry_size, payload = struct.unpack_from("<HHIQ", blob, entry)
            (arch,) = struct.unpack_from("<I", blob, entry + 28)
            if kind == FATBIN_PTX:
                ptx.add(arch)
            elif kind == FATBIN_ELF:
                sass.add(arch)
            if entry_size == 0:
                break
            entry += entry_size + payload
        position = end
    if not sass and not ptx:
        raise ValueError("the .nv_fatbin section holds no GPU code")
    return CodeArchs(tuple(sorted(sass)), tuple(sorted(ptx)), ".nv_fatbin")
