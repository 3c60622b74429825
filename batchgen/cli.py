"""The thin Hydra entry point: parse the command line, compose the config, run the job.

Invariant: every mistake on the command line (an override Hydra cannot parse, a key the schema
does not know, a bad value) ends as one line ``batchgen: error: KEY...`` and exit status 2
before the model loads; Ctrl-C never ends in a traceback. Composition is ``batchgen.composition``'s;
the job receives plain dataclasses (``batchgen.api.run``).
"""

from __future__ import annotations

import difflib
import importlib
import signal
import sys

import hydra
from omegaconf import DictConfig

from batchgen import paths
from batchgen.composition import check_overrides, hydra_registered, to_job_config
from batchgen.errors import BatchgenError, ConfigError

INTERRUPTED = (
    "batchgen: interrupted at once (Ctrl-C); finished shards are intact; "
    "rerun the same command to resume."
)
# ``batchgen TOOL OUTPUT_DIR``: commands over an output folder (batchgen/tools/), not Hydra jobs.
TOOLS = ("status", "report", "finalize", "export")


def _exit(code: int) -> None:
    """Exit with ``code``, a Ctrl-C from now on ignored: a second one that lands while the
    interpreter shuts down (torch's exit hooks) would print a traceback, and the job has stopped
    already."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


def _job(cfg: DictConfig) -> None:
    """Run one batch generation job; a user error prints one paragraph and exits with 2 (1
    when a worker that ``runner.devices`` started died).

    A ``-m`` sweep's task runs this in a process of its own, where the presets' resolvers are
    registered again before the config is resolved.
    """
    from batchgen.api import run
    from batchgen.errors import Stopped

    try:
        with hydra_registered():
            job = to_job_config(cfg)
        run(job)
    except Stopped as e:
        print(f"batchgen: {e}", file=sys.stderr, flush=True)
        _exit(e.exit_code)
    except BatchgenError as e:
        print(f"batchgen: error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


def _not_a_command(word: str) -> str:
    """The error for a first argument that is neither a command nor an override."""
    close = difflib.get_close_matches(word, TOOLS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "."
    return (
        f"{word!r} is not a batchgen command (they are {', '.join(TOOLS)}: batchgen COMMAND "
        f"OUTPUT_DIR; a job takes KEY=VALUE overrides, see batchgen --help){hint}"
    )


_hydra_main = hydra.main(version_base="1.3", config_path=paths.CONFIG_DIR, config_name="config")(
    _job
)


def main() -> None:
    """``batchgen [--version] [--help] [KEY=VALUE ...]``: check, then hand to Hydra;
    ``batchgen status|report|finalize|export OUTPUT_DIR``: the tool of that name; any other
    first word is refused in one line, naming the closest command."""
    from batchgen.hydra_compat import args_parser

    argv = sys.argv[1:]
    if argv and argv[0] in TOOLS:
        tool = importlib.import_module(f"batchgen.tools.{argv[0]}")
        sys.exit(tool.main(argv[1:]))
    if argv and "=" not in argv[0] and not argv[0].startswith(("-", "~")):
        print(f"batchgen: error: {_not_a_command(argv[0])}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        if "--version" in argv:
            from batchgen.version import __version__

            print(f"batchgen {__version__}")
            return
        args = args_parser().parse_args(argv)  # a bad flag: argparse's usage, exit 2
        try:
            check_overrides(args.overrides, not (args.config_dir or args.config_path))
        except ConfigError as e:
            print(f"batchgen: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        if args.multirun or "hydra.mode=MULTIRUN" in args.overrides:
            import batchgen.launcher  # noqa: F401  registers the output-judging launchers
        with hydra_registered():
            _hydra_main()
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr, flush=True)
        _exit(130)
