"""Read an OpenAI Batch API request file (``/v1/chat/completions`` lines) as a dataset.

Invariant: a request file is converted once per content (its SHA-256) into a cached Arrow
stream file of three flat columns, ``custom_id``, ``messages`` (``[{role, content}]``) and
``sampling`` (JSON text of batchgen ``sampling.*`` overrides), which is then read memory mapped
like any other dataset. The conversion reads the file one line at a time and writes a record
batch every few thousand lines, so memory never grows with the file; the cache file appears
whole under its final name (rename), so concurrent workers never read half of one. Every line
is checked during the conversion: a bad one stops it with the line number and the key.

A request's body is read as the hosted API would: a key it leaves out takes the run's
``sampling.*`` value, whose defaults are OpenAI's (temperature 1, top_p 1, n 1), except that
OpenAI samples by default, so every request samples unless its temperature is 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchgen.conversion import schema_text
from batchgen.errors import BadRequest, ConfigError, DataError
from batchgen.inputs.models import cache_root

# The columns the converted file holds; conf/dataset/openai_batch.yaml names them.
ID_COLUMN, MESSAGES_COLUMN, SAMPLING_COLUMN = "custom_id", "messages", "sampling"
SCHEMA = pa.schema(
    [
        pa.field(ID_COLUMN, pa.string(), nullable=False),
        pa.field(
            MESSAGES_COLUMN,
            pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
            nullable=False,
        ),
        pa.field(SAMPLING_COLUMN, pa.string(), nullable=False),
    ]
)
URL = "/v1/chat/completions"
# Part of the cache key: bump it when the conversion's output changes for the same file.
FORMAT = "1"
# A record batch is written after this many lines or bytes of lines, whichever comes first.
BATCH_LINES, BATCH_BYTES = 4096, 16 << 20
# Body keys read here; "model" and the log-probability keys are read only to be reported.
MAPPED = {
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "response_format",
}
REPORTED = {"model", "logprobs", "top_logprobs"}
READ = MAPPED | REPORTED


def is_request_file(path: Path) -> bool:
    """Whether ``path`` is a Batch API request file: its first line is a JSON object with an
    object ``body`` and a ``custom_id`` or ``url`` (plain prompt files have neither)."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    first = json.loads(raw)
                except ValueError:
                    return False
                return (
                    isinstance(first, dict)
                    and isinstance(first.get("body"), dict)
                    and ("custom_id" in first or "url" in first)
                )
    return False


def _digest(path: Path) -> str:
    h = hashlib.sha256(FORMAT.encode())
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _number(body: dict, key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"body.{key}", f"expected a number from {low} to {high}, got {value!r}")
    return float(value)


def _integer(body: dict, key: str, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BadRequest(f"body.{key}", f"expected an integer >= {low}, got {value!r}")
    return value


def _json_schema(body: dict) -> str | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return '{"type":"object"}'
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadRequest(
                "body.response_format.json_schema.schema", f"expected an object, got {schema!r}"
            )
        try:
            # schema_text checks each distinct schema once (cached).
            return schema_text(json.dumps(schema), "body.response_format.json_schema.schema")
        except ConfigError as e:
            raise BadRequest("body.response_format", str(e)) from e
    raise BadRequest(
        "body.response_format.type",
        f"{kind!r} is not one of 'json_schema', 'json_object', 'text'",
    )


def sampling_overrides(body: dict) -> dict[str, Any]:
    """The batchgen ``sampling.*`` overrides a request body asks for (see the module doc).

    Raises:
        BadRequest: a value of the wrong type or out of range, naming its key.
    """
    out: dict[str, Any] = {}
    tokens = _integer(body, "max_completion_tokens", 1)
    tokens = tokens if tokens is not None else _integer(body, "max_tokens", 1)
    if tokens is not None:
        out["max_new_tokens"] = tokens
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    # Greedy needs neither: leaving them out keeps greedy requests one group of settings.
    out["do_sample"] = temperature != 0.0
    if out["do_sample"] and temperature is not None:
        out["temperature"] = temperature
    if out["do_sample"] and top_p is not None:
        out["top_p"] = top_p
    n = _integer(body, "n", 1)
    if n is not None:
        out["num_return_sequences"] = n
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise BadRequest("body.stop", f"expected a string or a list of strings, got {stop!r}")
    if stop:
        out["stop"] = stop
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise BadRequest("body.seed", f"expected an integer, got {seed!r}")
        out["seed"] = seed
    schema = _json_schema(body)
    if schema is not None:
        out["json_schema"] = schema
    return out


def _content(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: only text reaches a text model
        texts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRequest(f"{key}[{j}]", f"a {kind!r} part; only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise BadRequest(f"{key}[{j}].text", "expected a string")
            texts.append(part["text"])
        return "\n".join(texts)
    raise BadRequest(key, f"expected a string or a list of text parts, got {value!r}")


def messages(body: dict, ignored: Counter) -> list[dict[str, str]]:
    """The conversation of a request body as ``{role, content}`` strings.

    Text parts of a message are joined with newlines; ``developer`` (OpenAI's newer name for
    the system role, unknown to chat templates) becomes ``system``. Other message keys
    (``name``...) are counted in ``ignored``.

    Raises:
        BadRequest: no messages, or a message without a role or text content.
    """
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise BadRequest("body.messages", f"expected a non-empty list, got {value!r}")
    out = []
    for i, m in enumerate(value):
        key = f"body.messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"{key}.role", f"expected an object with a string role, got {m!r}")
        ignored.update(f"messages[].{k}" for k in m if k not in ("role", "content"))
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m.get("content"), f"{key}.content")})
    return out


def convert_line(raw: bytes, ignored: Counter, models: Counter) -> tuple[str, list, str]:
    """One request line as (custom_id, messages, sampling JSON text).

    Args:
        ignored: body keys this conversion does not use, counted across lines.
        models: ``body.model`` values, counted across lines (every request runs on the
            configured model).

    Raises:
        BadRequest: naming the key that is missing or bad.
    """
    try:
        request = json.loads(raw)
    except ValueError as e:
        raise BadRequest("", f"not valid JSON ({e})") from e
    if not isinstance(request, dict):
        raise BadRequest("", f"a JSON {type(request).__name__}, not an object")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BadRequest("custom_id", f"expected a non-empty string, got {custom_id!r}")
    if request.get("method", "POST") != "POST":
        raise BadRequest("method", f"expected 'POST', got {request['method']!r}")
    if request.get("url", URL) != URL:
        raise BadRequest("url", f"expected {URL!r} (chat completions), got {request['url']!r}")
    body = request.get("body")
    if not isinstance(body, dict):
        raise BadRequest("body", f"expected an object, got {body!r}")
    conversation = messages(body, ignored)
    sampling = sampling_overrides(body)
    ignored.update(k for k in body if k not in READ)
    ignored.update(k for k in ("logprobs", "top_logprobs") if body.get(k))
    if body.get("model") is not None:
        models[str(body["model"])] += 1
    return custom_id, conversation, json.dumps(sampling, sort_keys=True)


def _notes(ignored: Counter, models: Counter) -> list[str]:
    notes = []
    if models:
        names = ", ".join(repr(m) for m, _ in models.most_common(3))
        notes.append(
            f"body.model ({names}{', ...' if len(models) > 3 else ''}) is ignored: every "
            "request runs on model.name_or_path."
        )
    if ignored:
        keys = ", ".join(f"{k} ({n})" for k, n in sorted(ignored.items()))
        logprobs = {"logprobs", "top_logprobs"} & set(ignored)
        hint = " (log-probabilities are set for the whole run: output.logprobs)" if logprobs else ""
        notes.append(f"body keys ignored (requests using them): {keys}{hint}.")
    return notes


def _batches(path: Path, ignored: Counter, models: Counter) -> Iterator[pa.RecordBatch]:
    """The converted rows of ``path``, a record batch every few thousand lines.

    Raises:
        DataError: the first bad line, by number and key.
    """
    columns: tuple[list, list, list] = ([], [], [])
    size = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = convert_line(raw, ignored, models)
            except BadRequest as e:
                raise DataError(f"dataset.path={str(path)!r}: line {number}: {e}") from e
            for column, value in zip(columns, row, strict=True):
                column.append(value)
            size += len(raw)
            if len(columns[0]) >= BATCH_LINES or size >= BATCH_BYTES:
                yield pa.record_batch(list(columns), schema=SCHEMA)
                columns, size = ([], [], []), 0
    if columns[0]:
        yield pa.record_batch(list(columns), schema=SCHEMA)


def _notes_file(target: Path) -> Path:
    return target.with_name(f"{target.name}.notes.json")


def _write_text_atomic(path: Path, text: str) -> None:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with open(fd, "w") as f:
            f.write(text)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def convert(path: Path, target: Path) -> list[str]:
    """Write ``path``'s requests to ``target`` (an Arrow stream file), line by line.

    ``target`` appears whole (rename); a concurrent worker converting the same file renames
    identical content, so either may win.

    Returns:
        The notes to show (ignored keys, the ignored model names), also kept beside ``target``
        so that later runs, which read the cached file, show them too.

    Raises:
        DataError: the first bad line, by number and key.
    """
    ignored: Counter = Counter()
    models: Counter = Counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with open(fd, "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
            for batch in _batches(path, ignored, models):
                writer.write_batch(batch)
        notes = _notes(ignored, models)
        # The notes first: whoever finds the converted file finds its notes.
        _write_text_atomic(_notes_file(target), json.dumps(notes))
        os.replace(name, target)
    finally:
        Path(name).unlink(missing_ok=True)
    return notes


def load(path: Path, streaming: bool = False):
    """The requests of ``path`` as a memory-mapped ``datasets.Dataset`` (an
    ``IterableDataset`` with ``streaming``) of ``SCHEMA``'s columns, converting the file
    the first time its content is seen; prints the conversion's notes.

    Raises:
        DataError: a bad line, by number and key (from ``convert``).
    """
    import datasets

    target = cache_root() / "openai_batch" / f"{path.stem}-{_digest(path)}.arrow"
    if target.is_file():
        notes_file = _notes_file(target)
        notes = json.loads(notes_file.read_text()) if notes_file.is_file() else []
    else:
        print(f"batchgen: converting {path.name} (OpenAI Batch API requests) once into {target}")
        notes = convert(path, target)
    for note in notes:
        print(f"batchgen: {path.name}: {note}", file=sys.stderr, flush=True)
    ds = datasets.Dataset.from_file(str(target))
    return ds.to_iterable_dataset() if streaming else ds
