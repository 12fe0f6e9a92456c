"""edgelink: a low-power VX11 gateway (drop-in for Tentáculo Link v7)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgelink")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
