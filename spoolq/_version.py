"""The version of spoolq: ``spoolq --version``, ``spoolq.__version__`` and
the package metadata (pyproject.toml reads it from here)."""

__version__ = "0.2.0"
