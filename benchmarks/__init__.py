"""fastkd benchmark suite (pytest-benchmark tests plus ``benchmarks/run.py``); not installed."""
