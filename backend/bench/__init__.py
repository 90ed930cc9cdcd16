"""The performance benchmark: `uv run python -m bench.run` (see bench/README.md)."""
