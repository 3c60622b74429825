"""The package version: one place, read by the package, the run record and the wheel."""

__version__ = "0.1.0"
