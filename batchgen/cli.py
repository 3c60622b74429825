"""The thin Hydra entry point: compose the config, convert it once, run the job."""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from batchgen.config import JobConfig
from batchgen.errors import BatchgenError, ConfigError

# An absolute path: `python -m batchgen` would otherwise make Hydra look for a `conf` module.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

ConfigStore.instance().store(name="base_config", node=JobConfig)


def _unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[str]:
    types = typing.get_type_hints(schema)  # resolves the postponed annotations
    unknown = []
    for key in node:
        if key not in types:
            unknown.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(types[key]) and isinstance(node[key], DictConfig):
            unknown += _unknown_keys(node[key], types[key], f"{prefix}{key}.")
    return unknown


def to_job_config(cfg: DictConfig) -> JobConfig:
    """Resolve interpolations and turn the composed config into the typed dataclasses.

    Raises:
        ConfigError: a mandatory value (``???``) was left unset, or a key was added with ``+``
            that the schema does not know (such as ``_target_``): it would be silently dropped.
    """
    unknown = _unknown_keys(cfg, JobConfig)
    if unknown:
        raise ConfigError(
            f"{', '.join(unknown)}: not a batchgen setting (see `python -m batchgen --cfg job`)."
        )
    try:
        job = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise ConfigError(
            f"{e.full_key}: missing mandatory value; set it on the command line, "
            f"e.g. {e.full_key}=..."
        ) from e
    assert isinstance(job, JobConfig), type(job)
    return job


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    """Run one batch generation job; a user error prints one paragraph and exits with 2."""
    from batchgen.runner import Stopped, run

    try:
        run(to_job_config(cfg))
    except Stopped as e:
        print(f"batchgen: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except BatchgenError as e:
        print(f"batchgen: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
