"""Errors a user can act on: each names the culprit (key, column, file) in one paragraph."""


class BatchgenError(Exception):
    """Base class: the entry point prints the message alone and exits non-zero."""


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
