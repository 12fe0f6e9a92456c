"""edgelink: a low-power VX11 gateway (drop-in for Tentáculo Link v7)."""

# The one place the version is written: pyproject.toml reads it from here (dynamic version),
# so the gateway does not pay for importlib.metadata (about 30 ms of start-up) to learn it.
__version__ = "0.1.0"
