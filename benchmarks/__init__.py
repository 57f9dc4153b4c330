"""Benchmarks of qbnorm against its physical limit and the official dense algorithm.

Run `python -m benchmarks [--tiny|--quick|--full] [--only NAME,...]` from the repository root; see
benchmarks/__main__.py and docs/performance.md.
"""
