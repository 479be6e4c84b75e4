"""The package version, importable without pulling Lightning (adapter files record it)."""

__version__ = "0.1.0"
