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
