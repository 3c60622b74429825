"""Which columns a dataset config reads: its prompt sources and their precedence.

Invariant: the prompt sources are tried in one order, here and nowhere else: a row's messages
(``dataset.messages_column``), else its plain prompt, ``dataset.template`` filled from its
fields or ``dataset.prompt_column``. Without messages the plain source is every row's; with
messages, a row whose messages are null uses its plain prompt where the data holds every column
of the plain source (``falls_back``), so one file may mix chat rows and prompt rows; otherwise
every row's prompt is its messages.
"""

from __future__ import annotations

import string
from collections.abc import Collection

from batchgen.config import DatasetConfig


def template_fields(template: str) -> list[str]:
    """Names of the ``{column}`` fields in a prompt template."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def plain_fields(cfg: DatasetConfig) -> list[str]:
    """The columns of the plain prompt source: the template's fields, else the prompt column."""
    if cfg.template:
        return template_fields(cfg.template)
    return [cfg.prompt_column] if cfg.prompt_column else []


def falls_back(cfg: DatasetConfig, columns: Collection[str]) -> bool:
    """Whether a row whose messages are null uses its plain prompt: ``dataset.messages_column``
    is set and ``columns`` (the data's) hold every column of the plain source."""
    fields = plain_fields(cfg)
    return bool(cfg.messages_column and fields) and all(f in columns for f in fields)


def needed_columns(cfg: DatasetConfig) -> list[str]:
    """Every input column the config requires, in a stable order without repeats (the plain
    source's columns beside a messages column are optional: ``falls_back``)."""
    cols: list[str] = []
    if cfg.messages_column:
        cols.append(cfg.messages_column)
    else:
        cols.extend(plain_fields(cfg))
    if cfg.id_column:
        cols.append(cfg.id_column)
    for column in (cfg.chat_template_kwargs_column, cfg.sampling_column):
        if column:
            cols.append(column)
    cols.extend(cfg.keep_columns)
    return list(dict.fromkeys(cols))
