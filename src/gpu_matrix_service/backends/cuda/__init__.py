"""The CUDA C backend: ``kernels.cu`` built by ``build.py`` into ``libgms_kernels.so``, loaded
through ctypes by ``binding.py``, with memory pools in ``pools.py`` and the
:class:`~gpu_matrix_service.backends.base.Backend` itself in ``backend.py``.

Importing this package loads nothing; ``CudaBackend(settings)`` does, and probes the GPUs.
"""
