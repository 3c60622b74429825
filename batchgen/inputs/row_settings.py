"""Per-row settings: a row's chat-template arguments and its sampling overrides.

Invariant: a row's value (a mapping, or its JSON text) is checked against the job's keys and
ranges when the row is rendered; a bad one makes the row a bad row whose reason names the column
and the key, handled by ``runner.on_bad_row`` like a bad prompt (a ``Generator`` checks its
``sampling=[...]`` first, naming ``sampling[i]``). What a row sets replaces the job's setting for
that row alone, its number of samples included; what it leaves out is the job's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from batchgen.config import DatasetConfig, SamplingConfig
from batchgen.config_checks import check_sampling
from batchgen.conversion import greedy_if_zero, schema_text
from batchgen.errors import ConfigError
from batchgen.inputs.dataset import Rows

# The JSON types each sampling setting takes (a row's values come from data, not a schema).
_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "list[str]": (list,)}
# A row names a value: the model's default (null) is the job's choice, not a row's.
_TYPES.update({f"{name} | None": types for name, types in _TYPES.items()})
_TYPES["str | None"] = (str, type(None))
SAMPLING_TYPES = {f.name: _TYPES[f.type] for f in dataclasses.fields(SamplingConfig)}
SAMPLING_KEYS = frozenset(SAMPLING_TYPES)
# Beyond the sampling settings, a row may set the seed of its samples.
ROW_ONLY_KEYS = frozenset({"seed"})


@dataclasses.dataclass(frozen=True)
class RowSampling:
    """A row's own settings: the sampling it decodes with, and its seed (None: the job's)."""

    sampling: SamplingConfig
    seed: int | None = None


def parse_mapping(value: Any, where: str) -> dict[str, Any]:
    """A row's mapping from a dict, its JSON text, or null (an empty mapping).

    Args:
        where: how errors name the value's place (``column 'kwargs'``, ``sampling[3]``).

    Raises:
        ValueError: naming ``where``: not a mapping, or JSON text that is not one.
    """
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {str(value)[:60]!r}")
    return dict(value)


def row_sampling(job: SamplingConfig, value: Any, where: str) -> RowSampling | None:
    """The sampling of a row whose settings are ``value``; None when it sets nothing.

    A JSON schema may be given as a mapping or as text. A row may ask for its own number of
    samples (``num_return_sequences``, an OpenAI request's ``n``): its output rows, checkpoints
    and verification follow its own count.

    Args:
        where: how errors name the value's place: ``column 'sampling'`` in a job,
            ``sampling[3]`` in a ``Generator`` call.

    Raises:
        ValueError: naming ``where`` and the key: unknown key, bad value, bad schema.
    """
    overrides = parse_mapping(value, where)
    if not overrides:
        return None
    unknown = sorted(set(overrides) - SAMPLING_KEYS - ROW_ONLY_KEYS)
    if unknown:
        raise ValueError(
            f"{where}: {', '.join(unknown)} not a sampling setting (the settings are "
            f"{', '.join(sorted(SAMPLING_KEYS | ROW_ONLY_KEYS))})"
        )
    seed = overrides.pop("seed", None)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"{where}: seed must be an integer, got {seed!r}")
    if isinstance(overrides.get("stop"), str):
        overrides["stop"] = [overrides["stop"]]
    schema = overrides.get("json_schema")
    if isinstance(schema, Mapping):
        overrides["json_schema"] = json.dumps(schema)
    for key, v in overrides.items():
        wrong_bool = isinstance(v, bool) and bool not in SAMPLING_TYPES[key]
        if wrong_bool or not isinstance(v, SAMPLING_TYPES[key]):
            expected = "/".join(t.__name__ for t in SAMPLING_TYPES[key])
            raise ValueError(f"{where}: {key} must be {expected}, got {v!r}")
    sampling = dataclasses.replace(job, **overrides)
    sampling = greedy_if_zero(sampling)
    try:
        if sampling.json_schema is not None:
            key = f"{where} json_schema"
            sampling = dataclasses.replace(
                sampling, json_schema=schema_text(sampling.json_schema, key)
            )
        check_sampling(sampling, where)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return RowSampling(sampling, seed)


def template_kwargs(rows: Rows, cfg: DatasetConfig, problems: list[str]) -> list[dict]:
    """Each row's chat-template arguments: the job's, then its column's (a bad one is noted in
    ``problems``)."""
    column = cfg.chat_template_kwargs_column
    if not column:
        return [cfg.chat_template_kwargs] * len(problems)
    found = []
    for i, value in enumerate(rows.columns[column]):
        try:
            found.append({**cfg.chat_template_kwargs, **parse_mapping(value, f"column {column!r}")})
        except ValueError as e:
            problems[i] = problems[i] or f"dataset.chat_template_kwargs_column {e}"
            found.append({})
    return found


def row_samplings(
    rows: Rows,
    cfg: DatasetConfig,
    sampling: SamplingConfig | None,
    texts: list[str | None],
    problems: list[str],
) -> list[RowSampling | None]:
    """Each row's ``RowSampling`` (None: the job's); a row with bad overrides turns bad."""
    column = cfg.sampling_column
    if not column or sampling is None:
        return [None] * len(texts)
    found = []
    for i, value in enumerate(rows.columns[column]):
        try:
            found.append(
                row_sampling(sampling, value, f"column {column!r}")
                if texts[i] is not None
                else None
            )
        except ValueError as e:
            problems[i], texts[i] = f"dataset.sampling_column {e}", None
            found.append(None)
    return found
