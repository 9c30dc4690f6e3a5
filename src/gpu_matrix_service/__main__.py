"""``python -m gpu_matrix_service`` is the same as the ``gpu-matrix-service`` command."""

from gpu_matrix_service.cli import main

main()
