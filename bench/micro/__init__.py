"""Micro-benchmarks of edgelink's hot pure pieces (pytest-benchmark); see bench/README.md."""
