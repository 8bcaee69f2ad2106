"""Benchmarks run by `annstream bench NAME`: one module per benchmark (see annstream.cli.bench)."""

__all__: list[str] = []
