"""The project's benchmarks, run from the repository root as modules: `python -m benchmarks.step_throughput ...`.

A package so that benchmarks import each other and the PyTorch reference nets (`benchmarks.torch_nets`) by name,
and tests import them the same way (pytest puts the repository root on `sys.path`, see pyproject.toml).
"""
