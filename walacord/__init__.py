"""walacord: supervisor for a Walacor-backed financial integrity service."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("walacord")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
