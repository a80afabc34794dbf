"""storage-events: storage that tells its users what changed, the moment it changes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("storage-events")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
