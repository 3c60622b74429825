"""Open a dataset through Hugging Face ``datasets`` and read it a shard of rows at a time.

Rows stay in Arrow (a memory-mapped cache file) until their shard is generated: opening a
dataset reads no rows into Python, so start-up and memory follow the shard, not the dataset.
``dataset.streaming=true`` reads a dataset too large for the disk as a stream instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchgen import paths
from batchgen.config import DatasetConfig
from batchgen.errors import DataError
from batchgen.inputs import hub, jsonl, openai_batch
from batchgen.inputs.sources import falls_back, needed_columns, plain_fields, template_fields

# Local file suffix -> datasets builder.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Rows:
    """Consecutive rows of the dataset in Python: only the columns the job needs."""

    columns: dict[str, list[Any]]
    # Arrow types of the kept input columns, so an empty shard still has the full schema.
    kept_types: dict[str, pa.DataType]
    start: int = 0  # dataset index of the first row

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


@dataclass
class Table:
    """The dataset's needed columns as a memory-mapped Arrow table (a ``datasets.Dataset``)."""

    dataset: Any
    kept_types: dict[str, pa.DataType]
    location: str

    def __len__(self) -> int:
        return self.dataset.num_rows

    def scan(self, name: str, block_rows: int) -> Iterator[tuple[int, pa.Array]]:
        """(first row index, values) per block of about ``block_rows`` rows of one column.

        Reads the dataset's cache files with plain reads rather than through its memory map,
        so a pass over every row leaves no pages of the file resident in this process.
        """
        files = [f["filename"] for f in self.dataset.cache_files]
        if not files:  # an in-memory dataset
            column = self.dataset.data.column(name)
            for offset in range(0, len(column), block_rows):
                yield offset, column.slice(offset, block_rows).combine_chunks()
            return
        offset, pending, size = 0, [], 0
        for batch in _batches(files):
            take = min(batch.num_rows, len(self) - offset - size)
            pending.append(batch.column(name).slice(0, take))
            size += take
            if size >= block_rows or offset + size == len(self):
                yield offset, pa.concat_arrays(pending)
                offset, pending, size = offset + size, [], 0
            if offset == len(self):
                return

    def rows(self, start: int, stop: int) -> Rows:
        """Rows ``[start, stop)`` in Python."""
        return Rows(self.dataset[start:stop], self.kept_types, start)

    def lines(self, rows: list[int]) -> dict[int, int] | None:
        """The line of each of ``rows`` in a jsonl file (its non-blank lines); None for
        another kind of source."""
        path = Path(self.location)
        if path.suffix.lower() != ".jsonl" or not path.is_file():
            return None
        return jsonl.line_numbers(path, rows)


@dataclass
class Stream:
    """A streamed dataset: the needed columns, read in order, never all at once."""

    dataset: Any  # a datasets.IterableDataset
    kept_types: dict[str, pa.DataType]
    location: str
    limit: int | None

    def blocks(self, rows_per_shard: int) -> Iterator[tuple[int, pa.Table]]:
        """(first row index, Arrow rows) per block of ``rows_per_shard`` rows, in order; the
        last block may be shorter. Rows stay in Arrow until ``rows`` converts a block."""
        start = 0
        for batch in self.dataset.with_format("arrow").iter(batch_size=rows_per_shard):
            if self.limit is not None:
                batch = batch.slice(0, max(0, self.limit - start))
            if batch.num_rows == 0:
                return
            yield start, batch
            start += batch.num_rows

    def rows(self, start: int, block: pa.Table) -> Rows:
        """One block of ``blocks`` in Python."""
        return Rows(block.to_pydict(), self.kept_types, start)


def _batches(files: list[str]) -> Iterator[pa.RecordBatch]:
    for name in files:
        with pa.OSFile(name) as f:
            yield from pa.ipc.open_stream(f)


def is_local(location: str) -> bool:
    """Whether ``dataset.path`` names a local file or folder (``pkg:`` included) rather than a
    hub dataset: it exists here, or is spelled as a path (absolute, relative with ``./``, ``~``,
    or with a data file's suffix), as a moved file's recorded spelling still is."""
    if location.startswith((paths.PKG_PREFIX, "/", ".", "~")):
        return True
    return Path(location).suffix.lower() in BUILDERS or Path(location).exists()


def _load_jsonl(path: Path, skip_bad_lines: bool):
    """A local jsonl file through ``datasets``' json reader; where that fails on blank or
    malformed lines, through a clean copy (``inputs.jsonl``).

    Raises:
        DataError: malformed lines and not ``skip_bad_lines``, naming the file and lines.
    """
    import datasets

    try:
        return datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception:
        found = jsonl.scan(path)
        if not (found.blank or found.bad):
            raise  # not a line's fault: the caller names the cause
        if found.bad and not skip_bad_lines:
            raise DataError(
                f"dataset.path={str(path)!r}: {jsonl.bad_lines_message(found)}. Fix the "
                "line, or set runner.on_bad_row=skip to record each as a bad row."
            ) from None
    copy = jsonl.clean_copy(path, found)
    return datasets.load_dataset("json", data_files=str(copy), split="train")


def _load(cfg: DatasetConfig, location: str, skip_bad_lines: bool = False):
    import datasets

    datasets.disable_progress_bars()
    # A file it cannot parse is logged by datasets as well as raised; our error says it once.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    path = Path(location)
    stream = {"streaming": True} if cfg.streaming else {}
    try:
        if path.is_file():
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"dataset.path={location!r}: unsupported file type {path.suffix!r}; "
                    f"use one of {sorted(BUILDERS)} or a folder of them."
                )
            if path.stat().st_size == 0:
                raise DataError(f"dataset.path={location!r} is an empty file: it has no rows.")
            if builder == "json" and openai_batch.is_request_file(path):
                return openai_batch.load(path, streaming=cfg.streaming)
            if path.suffix.lower() == ".jsonl" and not cfg.streaming:
                return _load_jsonl(path, skip_bad_lines)
            return datasets.load_dataset(builder, data_files=str(path), split="train", **stream)
        if path.is_dir():
            return datasets.load_dataset(str(path), name=cfg.name, split=cfg.split, **stream)
        if location.startswith((".", "/", "~")) or path.suffix.lower() in BUILDERS:
            raise DataError(f"dataset.path={location!r}: no such file or folder.")
        hub.check_dataset(location)
        return datasets.load_dataset(location, name=cfg.name, split=cfg.split, **stream)
    except DataError:
        raise
    except ValueError as e:
        if "corresponds to no data" in str(e):
            raise DataError(f"dataset.path={location!r} (split {cfg.split!r}) has no rows.") from e
        if "split" in str(e).lower():
            raise DataError(f"dataset.split={cfg.split!r} of {location!r}: {e}") from e
        raise DataError(f"dataset.path={location!r} could not be loaded: {e}") from e
    except Exception as e:  # datasets raises many types for a missing hub dataset or bad file
        if path.exists():
            raise DataError(f"dataset.path={location!r}: {_local_problem(path, e)}") from e
        raise DataError(
            f"dataset.path={location!r} could not be loaded ({type(e).__name__}: {e}). "
            "Check the name, or that the hub is reachable (HF_DATASETS_OFFLINE)."
        ) from e


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def _local_problem(path: Path, error: Exception) -> str:
    """Why a local file or folder failed to load, naming the file and line where one is bad."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.suffix.lower() == ".jsonl":
            found = jsonl.scan(f)
            if found.bad:
                return f"{f.name}: {jsonl.bad_lines_message(found)}"
            if found.blank and f != path:
                return (
                    f"{f.name}: line {found.first_blank} is blank, which a folder's files may "
                    "not have; remove it, or name the file itself in dataset.path"
                )
    cause = _root_cause(error)
    return f"cannot be read ({type(cause).__name__}: {str(cause).strip()[:300]})"


def open_dataset(cfg: DatasetConfig, skip_bad_lines: bool = False) -> Table | Stream:
    """Open the configured dataset, check the columns it names, keep only those.

    Reads no rows: a ``Table`` stays memory mapped, a ``Stream`` is read when iterated. Blank
    lines of a jsonl file are no rows; its malformed lines are bad rows with
    ``skip_bad_lines`` (``runner.on_bad_row=skip``, see ``inputs.jsonl``), else refused.

    Raises:
        DataError: the path does not exist, the dataset is empty, a named column is missing,
            or a jsonl line is malformed (naming the file and line).
    """
    location = paths.resolve(cfg.path, "dataset.path")
    ds = _load(cfg, location, skip_bad_lines)
    if isinstance(ds, dict):  # a folder without the requested split name
        raise DataError(f"dataset.split={cfg.split!r}: not found in {location!r}.")
    columns = list(ds.column_names or ds.features or [])
    wanted = needed_columns(cfg)
    missing = [c for c in wanted if c not in columns]
    if missing:
        keys = _keys_naming(cfg, missing)
        raise DataError(
            f"{', '.join(keys)}: column(s) {missing} not in {location!r}; "
            f"available columns: {columns}."
        )
    # A row without messages uses its plain prompt where the data has that source's columns;
    # a malformed jsonl line's row carries what is wrong with it (inputs.jsonl).
    optional = plain_fields(cfg) if falls_back(cfg, columns) else []
    optional += [c for c in (jsonl.PROBLEM_COLUMN,) if c in columns]
    ds = ds.select_columns(list(dict.fromkeys(wanted + optional)))
    if cfg.streaming:
        return Stream(ds, _arrow_types(ds.features, cfg.keep_columns), location, cfg.limit)
    if len(ds) == 0:
        raise DataError(f"dataset.path={location!r} (split {cfg.split!r}) has no rows.")
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))  # contiguous: a slice, no copy
    # The conversion to Arrow leaves buffers in the memory pool that nothing uses any more.
    pa.default_memory_pool().release_unused()
    return Table(ds, _arrow_types(ds.features, cfg.keep_columns), location)


def _arrow_types(features, names: list[str]) -> dict[str, pa.DataType]:
    schema = features.arrow_schema
    return {c: schema.field(c).type for c in names}


def _keys_naming(cfg: DatasetConfig, missing: list[str]) -> list[str]:
    keys = []
    for key in ("messages_column", "prompt_column", "id_column"):
        if getattr(cfg, key) in missing:
            keys.append(f"dataset.{key}")
    if cfg.template and set(template_fields(cfg.template)) & set(missing):
        keys.append("dataset.template")
    if set(cfg.keep_columns) & set(missing):
        keys.append("dataset.keep_columns")
    return keys or ["dataset"]
