"""Benchmarks run by `annstream bench NAME`: each module prints one JSON object with a baseline
measured in the same run (these machines are noisy, so figures are ratios)."""

__all__: list[str] = []
