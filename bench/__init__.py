"""Benchmark scripts, run from the repository root as modules: `python -m bench.<name> --help`. Their
results go to bench/results/; `python -m bench.report` writes docs/benchmarks/ from them (see reporting/)."""
