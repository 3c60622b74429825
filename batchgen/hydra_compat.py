"""What batchgen needs from Hydra, hydra-submitit-launcher and submitit that they do not offer
publicly, in one place, each use checked against the versions it was verified with.

Invariant: no other batchgen module touches these internals (tests/test_hydra_compat.py reads
the package's source), and every function here first checks that each package it leans on is
installed in a version of ``VERIFIED`` (the pins of pyproject.toml). Any other version ends the
command with one line, ``batchgen: error: PACKAGE VERSION is installed, ...``, before the
internal is touched: neither a traceback nor a launcher that quietly does something else.

The internals, and why no public API does the work:

- ``hydra._internal.utils.get_args_parser`` (``args_parser``): Hydra's own command-line parser,
  so that ``batchgen.cli`` reads ``-m`` and the overrides exactly as Hydra will. Hydra has no
  public one.
- ``Plugins.instance().class_name_to_class`` (``register_launcher``): Hydra instantiates a
  launcher only by a ``hydra_plugins.*`` name in this table. The public ``Plugins.register``
  files a class under its real module (``batchgen.launcher.*``), which Hydra then refuses. The
  documented way, a ``hydra_plugins/batchgen_launcher`` package in the wheel, is found by a
  scan that cannot see into setuptools' default editable install (``pip install -e``, as the
  Makefile installs; Hydra issue 2359), and that scan would import batchgen into every Hydra
  application of the environment.
- ``submitit.Job._results_timeout_s`` (``set_result_wait``): how long ``job.exception()`` waits
  for the result file of a task that ended without one. submitit waits 15 s (slow shared file
  systems); a local task writes its result before its process ends.
- hydra-submitit-launcher's submission (``submit``): a copy of the part of 1.2.0's
  ``BaseSubmititLauncher.launch`` before it waits (how its ``params`` become submitit's executor
  parameters, and the arguments its ``__call__`` takes in each task). Its ``launch`` itself is
  no use: it raises on the first task that did not complete.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
from pathlib import Path
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion

# The versions each internal above was verified with: pyproject.toml's pins (a test compares).
VERIFIED = {
    "hydra-core": ">=1.3.2,<1.4",
    "hydra-submitit-launcher": "==1.2.0",
    "submitit": "==1.5.4",
}


def installed_version(dist: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check(dist: str) -> None:
    """Refuse an installed ``dist`` whose version is not in ``VERIFIED``.

    Args:
        dist: a distribution named in ``VERIFIED`` (``hydra-core``, ...).

    Raises:
        SystemExit: one line naming the package, the version found and the verified one. Not
            an ``Exception``: inside Hydra's launch or the command line it ends the command
            without a traceback.
    """
    version, wanted = installed_version(dist), VERIFIED[dist]
    try:
        if version is not None and SpecifierSet(wanted).contains(version, prereleases=True):
            return
    except InvalidVersion:
        pass
    found = f"{dist} {version} is installed" if version else f"{dist} is not installed"
    raise SystemExit(
        f"batchgen: error: {found}, but batchgen relies on internals of {dist}{wanted} "
        f"(batchgen/hydra_compat.py) and was verified with those only; "
        f"pip install '{dist}{wanted}'."
    )


# Each distribution's version is fixed for the process: a passed check need not be repeated
# (once per task of a sweep). A failed one is not cached, it ends the command.
require = functools.cache(check)


def args_parser() -> argparse.ArgumentParser:
    """Hydra's command-line parser (``--help``, ``-m``, ``--cfg``, ..., then overrides).

    Raises:
        SystemExit: hydra-core is of an unverified version (see ``check``).
    """
    require("hydra-core")
    from hydra._internal.utils import get_args_parser

    return get_args_parser()


def register_launcher(name: str, cls: type) -> None:
    """Let Hydra instantiate ``cls`` as ``name``, a ``hydra_plugins.*`` name (idempotent).

    Every package of ``VERIFIED`` is checked here, not only hydra-core: the launcher registered
    goes on to ``submit`` and ``set_result_wait``, and a sweep refused now leaves no folder.

    Raises:
        SystemExit: a package is of an unverified version (see ``check``).
    """
    for dist in VERIFIED:
        require(dist)
    from hydra.core.plugins import Plugins

    Plugins.instance().class_name_to_class[name] = cls


def set_result_wait(job: Any, seconds: float) -> None:
    """Make ``job.exception()`` wait at most ``seconds`` for the result file of a task that
    ended without one (submitit: 15 s).

    Raises:
        SystemExit: submitit is of an unverified version (see ``check``).
    """
    require("submitit")
    job._results_timeout_s = seconds


def submit(
    launcher: Any, cluster: str, job_overrides: list[list[str]], initial_job_idx: int
) -> list[Any]:
    """Submit one task per override list as hydra-submitit-launcher 1.2.0 does; wait for none.

    Args:
        launcher: a set-up launcher of hydra-submitit-launcher (its ``params`` and ``config``);
            each task calls it, unpickled, with the job's overrides.
        cluster: submitit's executor, ``slurm`` or ``local``.
        job_overrides: one override list per task.
        initial_job_idx: Hydra's number of the first task.

    Returns:
        One ``submitit.Job`` per override list, in order.

    Raises:
        SystemExit: hydra-submitit-launcher or submitit is of an unverified version.
        submitit.core.utils.FailedJobError: the scheduler refused the job array.
        OSError: the scheduler's command (``sbatch``) cannot be run.
    """
    require("hydra-submitit-launcher")
    require("submitit")
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import filter_overrides
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import log
    from omegaconf import OmegaConf

    params = launcher.params
    init_keys = {"max_num_timeout", "submitit_folder"}
    init_params = {"folder": params["submitit_folder"]}
    if "max_num_timeout" in params:
        init_params[f"{cluster}_max_num_timeout"] = params["max_num_timeout"]
    executor = submitit.AutoExecutor(cluster=cluster, **init_params)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{k if k in base else f"{cluster}_{k}": v for k, v in params.items() if k not in init_keys}
    )
    config = launcher.config
    sweep_dir = Path(str(config.hydra.sweep.dir))
    log.info(f"Submitit '{cluster}' sweep output dir : {sweep_dir}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:
        sweep_dir.chmod(int(str(config.hydra.sweep.mode), 8))
    state = Singleton.get_state()
    args = []
    for idx, overrides in enumerate(job_overrides, initial_job_idx):
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        # BaseSubmititLauncher.__call__(sweep_overrides, job_dir_key, job_num, job_id, state)
        args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", state))
    return executor.map_array(launcher, *zip(*args, strict=True))
