"""Benchmarks behind ``gpu-matrix-service bench``: ``compute`` measures the compute phase of
each backend against the machine's measured ceilings."""
