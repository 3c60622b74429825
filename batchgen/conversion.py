"""Finish a config once: the settings as given turned into the settings as they run.

Invariant: what the fingerprint records is what runs, and a config is converted exactly once,
by the job (``batchgen.job.run.finish_config``) or a ``Generator`` call, whichever way it came:
``sampling.temperature=0`` becomes greedy decoding, stop strings get their escapes (``\\n``)
interpreted, a ``sampling.json_schema`` file is read and checked, and ``dataset.template_file``
is read into ``dataset.template``.
"""

from __future__ import annotations

import functools
import re
import string
from dataclasses import replace
from pathlib import Path

from batchgen import paths
from batchgen.config import DatasetConfig, JobConfig, SamplingConfig
from batchgen.errors import ConfigError


def read_json_schema(s: SamplingConfig) -> SamplingConfig:
    """``sampling.json_schema`` as the schema's JSON text, read from its file when it names one.

    Inline JSON (starting with ``{``) is kept; anything else is a path (``pkg:`` and ``~``
    work). The text is checked as a JSON schema, so a typo fails before any model loads.

    Raises:
        ConfigError: the file is missing or unreadable, or the text is not a JSON schema.
    """
    if s.json_schema is None:
        return s
    text, key = s.json_schema, f"sampling.json_schema={s.json_schema[:60]!r}"
    if not text.lstrip().startswith("{"):
        path = Path(paths.resolve(text, "sampling.json_schema")).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{key}: neither inline JSON nor a readable file ({e}).") from e
    return replace(s, json_schema=schema_text(text, key))


# Millions of rows (an OpenAI Batch file, a per-row column) usually share a handful of schemas:
# each is checked once. A refusal raises, and is not cached.
@functools.lru_cache(maxsize=1024)
def schema_text(text: str, key: str) -> str:
    """A JSON schema's compact text (no spaces, key order kept), once checked as a schema.

    Raises:
        ConfigError: naming ``key``: not JSON, or not a valid JSON schema.
    """
    import json

    import jsonschema

    try:
        schema = json.loads(text)
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except ValueError as e:
        raise ConfigError(f"{key}: not JSON ({e}).") from e
    except jsonschema.SchemaError as e:
        raise ConfigError(f"{key}: not a valid JSON schema ({e.message}).") from e
    # Key order is kept: the grammar makes the model write properties in the schema's order
    # (a "reasoning" field before the "answer" one stays so).
    return json.dumps(schema, separators=(",", ":"))


# Escapes a stop string may hold: a shell and Hydra pass a typed `\n` on as two characters.
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}
_ESCAPE_RE = re.compile(r"\\(u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|.?)", re.DOTALL)


def unescape(text: str, key: str) -> str:
    """Interpret the backslash escapes ``\\n \\t \\r \\\\ \\" \\' \\xHH \\uHHHH`` in ``text``.

    Raises:
        ConfigError: any other escape (say ``\\d``): it would be matched as two literal characters,
            which is never what was meant; ``\\\\`` writes a backslash.
    """

    def one(m: re.Match) -> str:
        code = m.group(1)
        if code in _ESCAPES:
            return _ESCAPES[code]
        if len(code) > 1:  # xHH or uHHHH
            return chr(int(code[1:], 16))
        raise ConfigError(
            f"{key}={text!r}: unknown escape {m.group(0)}; use \\n, \\t, \\r, \\xHH or \\uHHHH, "
            "and \\\\ for a backslash itself (README: Quoting)."
        )

    return _ESCAPE_RE.sub(one, text)


def normalize_sampling(s: SamplingConfig) -> SamplingConfig:
    """The settings as they decode: escapes in stop strings interpreted, ``temperature=0`` greedy.

    ``temperature=0`` means greedy decoding, as in every API: ``do_sample=false``, and the
    temperature back at its neutral 1.0 (greedy decoding reads no temperature), so the run's
    fingerprint and output folder are those of the same settings without it.

    Raises:
        ConfigError: a stop string with an unknown escape.
    """
    stop = [
        unescape(x, f"sampling.stop[{i}]") if isinstance(x, str) else x
        for i, x in enumerate(s.stop)
    ]
    s = replace(s, stop=stop)
    return greedy_if_zero(s)


def greedy_if_zero(s: SamplingConfig) -> SamplingConfig:
    """``temperature=0`` as greedy decoding, as in every API: ``do_sample=false`` and the
    temperature back at its neutral value, so it is recorded and fingerprinted as greedy."""
    if s.temperature == 0:
        return replace(s, do_sample=False, temperature=SamplingConfig().temperature)
    return s


def read_template_file(d: DatasetConfig) -> DatasetConfig:
    """Read ``dataset.template_file`` into ``dataset.template`` (the path is kept, for messages).

    One trailing newline (which editors add) is dropped; ``pkg:`` and ``~`` paths work.

    Raises:
        ConfigError: both keys are set, or the file is missing, unreadable, not UTF-8, or not a
            valid template.
    """
    if not d.template_file:
        return d
    name = d.template_file
    if d.template:
        raise ConfigError(
            f"dataset.template_file={name!r} and dataset.template are both set: keep one "
            "(dataset.template=null)."
        )
    path = Path(paths.resolve(name, "dataset.template_file")).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"dataset.template_file={name!r}: no such file.") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"dataset.template_file={name!r}: not UTF-8 text ({e.reason}).") from e
    except OSError as e:
        raise ConfigError(f"dataset.template_file={name!r} cannot be read: {e.strerror}.") from e
    text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    if not text.strip():
        raise ConfigError(f"dataset.template_file={name!r} is empty.")
    try:
        list(string.Formatter().parse(text))
    except ValueError as e:
        raise ConfigError(
            f"dataset.template_file={name!r}: not a valid template ({e}); fields are {{column}}, "
            "and a literal brace is written {{ or }}."
        ) from e
    return replace(d, template=text)


def convert_sampling(s: SamplingConfig) -> SamplingConfig:
    """Sampling settings as given turned into settings as they decode, once: ``normalize_sampling``
    then ``read_json_schema``.

    Raises:
        ConfigError: naming the key, as those two do.
    """
    return read_json_schema(normalize_sampling(s))


def convert(cfg: JobConfig) -> JobConfig:
    """Finish converting a config, once: ``convert_sampling`` and ``read_template_file``.

    Raises:
        ConfigError: naming the key, as those two do.
    """
    return replace(
        cfg, sampling=convert_sampling(cfg.sampling), dataset=read_template_file(cfg.dataset)
    )
