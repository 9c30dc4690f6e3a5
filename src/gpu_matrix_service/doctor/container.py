"""Checks on the container side of the GPU stack: are we in a container, are the NVIDIA device
nodes there, is the NVIDIA Container Toolkit installed (seen from the host), and does
NVIDIA_DRIVER_CAPABILITIES let the runtime mount the CUDA driver library.
"""

from __future__ import annotations

import re

from gpu_matrix_service.doctor.checks import Check, Host, problem
from gpu_matrix_service.doctor.nvml_queries import NvmlInventory

# Words in /proc/1/cgroup that name a container manager (cgroup v1; v2 shows only "0::/").
CGROUP_MARKERS = ("docker", "kubepods", "containerd", "libpod", "lxc", "crio")
CONTAINER_ENGINES = ("docker", "podman", "containerd", "nerdctl")

PASS_GPUS_HINT = (
    "start the container with the GPUs: `docker run --gpus all`, Compose `gpus: all` (or "
    "deploy.resources.reservations.devices), Kubernetes `resources.limits: nvidia.com/gpu: 1`"
)


def detect_container(host: Host) -> str | None:
    """What says we run in a container (``docker (/.dockerenv)``...), or None on a host."""
    if host.path("/.dockerenv").exists():
        return "docker (/.dockerenv)"
    if host.path("/run/.containerenv").exists():
        return "podman (/run/.containerenv)"
    if "KUBERNETES_SERVICE_HOST" in host.environ:
        return "kubernetes pod (KUBERNETES_SERVICE_HOST)"
    if host.environ.get("container"):
        return f"{host.environ['container']} ($container)"
    try:
        cgroup = host.path("/proc/1/cgroup").read_text(errors="replace")
    except OSError:
        return None
    found = next((m for m in CGROUP_MARKERS if m in cgroup), None)
    return f"{found} (/proc/1/cgroup)" if found else None


def container_checks(inventory: NvmlInventory, host: Host, require_gpu: bool) -> list[Check]:
    """Container detection, device nodes, container toolkit, driver capabilities."""
    where = detect_container(host)
    return [
        Check(
            "container",
            "container",
            "pass",
            f"in a container: {where}" if where else "not in a container",
            data={"container": where},
        ),
        device_nodes_check(inventory, host, where is not None, require_gpu),
        toolkit_check(host, where is not None),
        capabilities_check(host, where is not None, require_gpu),
    ]


def device_nodes_check(
    inventory: NvmlInventory, host: Host, in_container: bool, require_gpu: bool
) -> Check:
    """``/dev/nvidiactl``, ``/dev/nvidia-uvm`` and one ``/dev/nvidiaN`` per GPU NVML lists."""
    dev = host.path("/dev")
    present = sorted(p.name for p in dev.glob("nvidia*")) if dev.is_dir() else []
    data = {"present": present}
    shown = ", ".join(present) or "none"
    gpus = inventory.devices
    if not gpus:
        if present and not inventory.loaded:
            return Check(
                "device nodes",
                "container",
                "warn",
                f"{shown}, but NVML does not load",
                "the device nodes are there but the driver libraries are not: use the NVIDIA "
                "runtime (`--gpus`) rather than bare `--device` flags",
                data=data,
            )
        if not in_container:  # the driver check already says there is no GPU here
            return Check("device nodes", "container", "skip", shown, data=data)
        verdict = problem(require_gpu)
        return Check("device nodes", "container", verdict, shown, PASS_GPUS_HINT, require_gpu, data)
    wanted = ["nvidiactl", "nvidia-uvm", *(d.device_file.removeprefix("/dev/") for d in gpus)]
    missing = [name for name in wanted if name not in present]
    if not missing:
        return Check("device nodes", "container", "pass", shown, data=data)
    value = f"missing {', '.join(missing)} (have {shown})"
    if in_container:
        # Nothing inside the container can create them: CUDA will fail until the runtime does.
        hint = "the runtime did not pass every node in: " + PASS_GPUS_HINT
        return Check("device nodes", "container", "fail", value, hint, True, data)
    # On a host the setuid nvidia-modprobe creates missing nodes at the first CUDA call.
    hint = (
        "nvidia-modprobe normally creates them at the first CUDA call; if CUDA then fails: "
        "`sudo nvidia-modprobe -u -c=0` (and -c=N per GPU)"
    )
    return Check("device nodes", "container", "warn", value, hint, data=data)


def toolkit_check(host: Host, in_container: bool) -> Check:
    """The NVIDIA Container Toolkit on the host: nvidia-ctk, the runtime, Docker's config."""
    if in_container:
        return Check(
            "container toolkit", "container", "skip", "not visible from inside a container"
        )
    found = []
    ctk = host.which("nvidia-ctk")
    if ctk:
        out = host.run([ctk, "--version"], 10.0)
        match = re.search(r"version\s+([\w.\-]+)", out.output) if out else None
        found.append(f"nvidia-ctk {match.group(1) if match else '(version unknown)'}")
    if host.which("nvidia-container-runtime"):
        found.append("nvidia-container-runtime")
    for config in ("/etc/docker/daemon.json", "/etc/containerd/config.toml"):
        try:
            if "nvidia" in host.path(config).read_text(errors="replace"):
                found.append(f"nvidia runtime in {config}")
        except OSError:
            continue
    engines = [e for e in CONTAINER_ENGINES if host.which(e)]
    if found:
        return Check(
            "container toolkit", "container", "pass", ", ".join(found), data={"found": found}
        )
    if engines:
        return Check(
            "container toolkit",
            "container",
            "warn",
            f"{', '.join(engines)} installed, NVIDIA Container Toolkit not found",
            "containers cannot get GPUs without it: install nvidia-container-toolkit, then "
            "`sudo nvidia-ctk runtime configure --runtime=docker` and restart the engine",
        )
    return Check(
        "container toolkit",
        "container",
        "skip",
        "no container engine here (the toolkit is only needed to run the image)",
    )


def capabilities_check(host: Host, in_container: bool, require_gpu: bool) -> Check:
    """NVIDIA_DRIVER_CAPABILITIES must include ``compute`` (or ``all``): without it the
    runtime mounts no libcuda."""
    value = host.environ.get("NVIDIA_DRIVER_CAPABILITIES")
    data = {"nvidia_driver_capabilities": value}
    if not in_container:
        shown = "unset" if value is None else repr(value)
        return Check(
            "driver capabilities", "container", "skip", f"{shown} (outside a container)", data=data
        )
    if value is None:
        return Check(
            "driver capabilities",
            "container",
            "pass",
            "NVIDIA_DRIVER_CAPABILITIES unset (runtime default: compute,utility)",
            data=data,
        )
    capabilities = {c.strip() for c in value.split(",")}
    if capabilities & {"compute", "all"}:
        return Check(
            "driver capabilities",
            "container",
            "pass",
            f"NVIDIA_DRIVER_CAPABILITIES={value}",
            data=data,
        )
    return Check(
        "driver capabilities",
        "container",
        problem(require_gpu),
        f"NVIDIA_DRIVER_CAPABILITIES={value} lacks compute",
        "the runtime then mounts no libcuda.so: set NVIDIA_DRIVER_CAPABILITIES=compute,utility "
        "(ENV in the Dockerfile, or environment: in Compose)",
        require_gpu,
        data,
    )
