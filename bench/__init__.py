"""Benchmarks for edgelink: ``python -m bench`` runs the comparison against the FastAPI reference peer.

``bench.reference`` is the peer itself; the other modules are the harness (see bench/README.md).
"""


class BenchError(RuntimeError):
    """A measurement could not be taken; the message says what went wrong."""
