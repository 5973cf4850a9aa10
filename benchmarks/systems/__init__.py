"""Systems benchmarks of crossfed (issue 7): every figure is a ratio against a baseline measured
in the same run, plus the absolute. Entry point: ``python benchmarks/systems/run_systems.py``."""
