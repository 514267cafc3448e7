"""CourseZoo: train, export and serve the PyTorch course models."""

from importlib import metadata


def version() -> str:
    """The installed package's version (``coursezoo --version``, ServerMetadata); "0+unknown" when run from a
    checkout that was never installed."""
    try:
        return metadata.version("coursezoo")
    except metadata.PackageNotFoundError:
        return "0+unknown"
