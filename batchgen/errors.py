"""Errors a user can act on: each names the culprit (key, column, file) in one paragraph, and
how such a paragraph is read back from a finished process's stderr (``last_message``)."""

from __future__ import annotations

from typing import Any

# What Slurm's own tools write to a task's stderr once its process has ended ("srun: error: node:
# task 0: Exited with exit code 2"): the end of batchgen's last message, not part of it.
_SLURM_TOOLS = ("srun:", "slurmstepd:")


class BatchgenError(Exception):
    """Base class: the entry point prints the message alone and exits with ``exit_code``."""

    # A setting, path, column, row or folder to fix: the command line's usage-error status.
    exit_code = 2


class ConfigError(BatchgenError):
    """A setting is out of range or inconsistent with another."""


class DataError(BatchgenError):
    """The dataset is missing, empty, or lacks a column the config names."""


class ModelError(BatchgenError):
    """The model or tokenizer cannot be found or used as configured."""


class ResumeError(BatchgenError):
    """The output folder holds a run that this one must not be mixed with."""


class NotAnOutputDir(BatchgenError):
    """The folder lacks a readable ``run.json`` that says how many shards the run has."""


class Stopped(BatchgenError):
    """The run stopped on a signal after leaving its folder clean; exit with ``exit_code``."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class WorkerDied(BatchgenError):
    """A worker that this command started died (``runner.devices``); the message names it.

    Attributes:
        summary: the job's closing summary, printed before this was raised (a
            ``WorkerSummary``): the other workers may have finished the output all the same.
    """

    exit_code = 1  # no setting is wrong: a process failed

    def __init__(self, message: str, summary: Any = None):
        super().__init__(message)
        self.summary = summary


class Interrupted(Exception):
    """A stop was requested (signal, Ctrl-C); the runner turns it into ``Stopped`` once the
    folder is clean. Not a ``BatchgenError``: it never reaches the user.

    An engine stopped inside a batch raises it with the rows the batch had finished
    (``partial``: (record, samples) pairs), so they are kept like any finished batch's.
    """

    def __init__(self, partial: list | None = None):
        super().__init__("interrupted")
        self.partial = partial or []


class BadRequest(Exception):
    """A bad value in one line of an OpenAI Batch request file: ``key`` names it
    (``body.temperature``; empty: the line itself). The reader turns it into a ``DataError``
    naming the file and line."""

    def __init__(self, key: str, why: str):
        super().__init__(f"{key}: {why}" if key else why)


class Unfinished(Exception):
    """``batchgen export``: the run has shards still to generate, and no ``--partial`` was
    asked for (the command prints it and exits 1)."""


def last_message(stderr: str) -> str:
    """batchgen's last message in a process's stderr: its last line that starts with
    ``batchgen:`` and the lines after it, up to a blank line, a line of Slurm's tools, or the end.

    A job prints its final word (``batchgen: error: ...``, or why it stopped) last, as one
    paragraph, and exits; a refused resume's paragraph lists what differs on the lines below.

    Returns:
        The message, each line stripped of trailing space; empty when there is none.
    """
    lines = [x.rstrip() for x in stderr.splitlines()]
    starts = [i for i, x in enumerate(lines) if x.lstrip().startswith("batchgen:")]
    if not starts:
        return ""
    message = [lines[starts[-1]].strip()]
    for x in lines[starts[-1] + 1 :]:
        if not x.strip() or x.startswith(_SLURM_TOOLS):
            break
        message.append(x)
    return "\n".join(message)
