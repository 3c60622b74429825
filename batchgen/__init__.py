"""batchgen: batch offline LLM generation into resumable Parquet shards.

The Python API (``batchgen.api``) loads on first use, so ``import batchgen`` stays light for the
tools that need no torch (``batchgen status``). Importing it puts the log filters of
``batchgen.noise`` in place, before any library they quiet is imported.
"""

from batchgen import noise
from batchgen.version import __version__

noise.install()

__all__ = ["Completion", "Generator", "JobConfig", "__version__", "compose", "run"]

_API = {"Completion", "Generator", "compose", "run"}


def __getattr__(name: str):
    if name in _API:
        from batchgen import api

        return getattr(api, name)
    if name == "JobConfig":
        from batchgen.config import JobConfig

        return JobConfig
    raise AttributeError(f"module 'batchgen' has no attribute {name!r}")
