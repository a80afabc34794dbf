"""storage-events: storage that tells its users what changed, the moment it changes."""

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)
