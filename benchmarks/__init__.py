"""Benchmarks and GPU checks, outside the package: `python -m benchmarks.<name>` from the repository root."""
