"""Benchmarks: ``python -m benchmarks.run`` (both), ``python -m benchmarks.densenet``,
``python -m benchmarks.delugenet``. See docs/benchmarks.md for the protocol and the latest numbers."""
