"""On a machine with two or more GPUs: does Ray Serve throughput rise with a second GPU replica?

Starts a local Ray cluster with every GPU, deploys the service with one replica (``num_gpus``
1), loads it through the Serve proxy with ``bench http``, then scales the same application to
two replicas and loads it again. For each step it prints requests/s and latency, and which GPU
(NVML UUID) each replica's process holds memory on, from the replicas' own ``/metrics``.

    PYTHONPATH=src python3 scripts/gpu_ray_check.py [--op matmul] [--size 2048] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import serve

from gpu_matrix_service.bench.http import free_port
from gpu_matrix_service.engines.ray_serve import (
    ReplicaPlan,
    deploy_on_ray,
    replica_gpus,
    wait_for_replicas,
)
from gpu_matrix_service.gpu import GpuMonitor
from gpu_matrix_service.settings import Settings


def gpu_count() -> int:
    monitor = GpuMonitor()
    try:
        return len(monitor.snapshot().gpus)
    finally:
        monitor.close()


def bench(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        command = [
            sys.executable, "-m", "gpu_matrix_service", "bench", "http", "--url", url,
            "--no-floor", "--op", args.op, "--dtype", args.dtype,
            "--duration", str(args.duration), "--clients", str(args.clients), "--json", str(out),
        ]  # fmt: skip
        for size in args.size:
            command += ["--size", str(size)]
        for conc in args.concurrency:
            command += ["--concurrency", str(conc)]
        subprocess.run(command, check=True)
        return json.loads(out.read_text())["results"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", default="matmul")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--size", type=int, action="append")
    parser.add_argument("--concurrency", type=int, action="append")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--cpu-rehearsal", action="store_true", help="CPU replicas, no GPU checks (a dry run)"
    )
    args = parser.parse_args()
    args.size = args.size or [1024, 2048]
    args.concurrency = args.concurrency or [16]
    gpus = gpu_count()
    if gpus < 2 and not args.cpu_rehearsal:
        print(f"needs two GPUs, found {gpus}")
        return 2
    backend, per_replica = ("cpu", 0) if args.cpu_rehearsal else ("auto", 1)
    ray.init(num_gpus=gpus, num_cpus=max(4, args.clients), logging_level="WARNING")
    settings = Settings(backend=backend, port=free_port(), compute_threads=4, _env_file=None)
    steps = []
    try:
        for replicas in (1, 2):
            url = deploy_on_ray(settings, ReplicaPlan(replicas=replicas, num_gpus=per_replica))
            wait_for_replicas(replicas)
            results = bench(url, args)
            by_replica = {} if args.cpu_rehearsal else replica_gpus(url, replicas)
            held = {replica: sorted(uuids) for replica, uuids in by_replica.items()}
            steps.append({"replicas": replicas, "gpus_by_replica": held, "results": results})
            print(f"{replicas} replica(s): GPUs by replica {held}")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"{'op':8} {'n':>5} {'c':>3} {'1 replica':>12} {'2 replicas':>12} {'ratio':>6}")
    one, two = steps[0]["results"], steps[1]["results"]
    for first, second in zip(one, two, strict=True):
        ratio = second["rps"] / first["rps"] if first["rps"] else float("nan")
        print(
            f"{first['op']:8} {first['size']:5d} {first['concurrency']:3d} "
            f"{first['rps']:9.1f}/s {second['rps']:9.1f}/s {ratio:6.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"gpus": gpus, "steps": steps}, indent=2))
    if args.cpu_rehearsal:
        return 0
    two_gpus = {tuple(uuids) for uuids in steps[1]["gpus_by_replica"].values()}
    return 0 if len(two_gpus) == 2 and all(len(u) == 1 for u in two_gpus) else 1


if __name__ == "__main__":
    sys.exit(main())
