"""Benchmark datasets built from sources other than the built-in synthetic shapes."""
