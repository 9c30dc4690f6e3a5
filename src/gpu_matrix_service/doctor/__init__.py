"""``gpu-matrix-service doctor``: does the GPU stack work here, and if not, what is wrong?

Checks the driver, the devices, the container setup, the toolkit and kernel library, the GPU
frameworks and a real workload, each with a verdict (pass, warn, fail, skip), the measured
value and a fix hint. :func:`quick_checks` is the cheap subset for readiness probes.
"""

from gpu_matrix_service.doctor.checks import Check, Host, Verdict
from gpu_matrix_service.doctor.diagnosis import DoctorReport, diagnose, quick_checks

__all__ = ["Check", "DoctorReport", "Host", "Verdict", "diagnose", "quick_checks"]
