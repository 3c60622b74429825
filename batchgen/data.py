"""Load dataset rows through Hugging Face ``datasets`` and check the columns the config names."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchgen import paths
from batchgen.config import DatasetConfig
from batchgen.errors import DataError

# Local file suffix -> datasets builder.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Rows:
    """The rows a job reads: only the columns it needs, in dataset order."""

    columns: dict[str, list[Any]]
    # Arrow types of the kept input columns, so an empty shard still has the full schema.
    kept_types: dict[str, pa.DataType]
    source: str

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


def template_fields(template: str) -> list[str]:
    """Names of the ``{column}`` fields in a prompt template."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def needed_columns(cfg: DatasetConfig) -> list[str]:
    """Every input column the config refers to, in a stable order without repeats."""
    cols: list[str] = []
    if cfg.messages_column:
        cols.append(cfg.messages_column)
    elif cfg.template:
        cols.extend(template_fields(cfg.template))
    elif cfg.prompt_column:
        cols.append(cfg.prompt_column)
    if cfg.id_column:
        cols.append(cfg.id_column)
    cols.extend(cfg.keep_columns)
    return list(dict.fromkeys(cols))


def _load(cfg: DatasetConfig, location: str):
    import datasets

    datasets.disable_progress_bars()
    path = Path(location)
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
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir():
            return datasets.load_dataset(str(path), name=cfg.name, split=cfg.split)
        if location.startswith((".", "/", "~")) or path.suffix.lower() in BUILDERS:
            raise DataError(f"dataset.path={location!r}: no such file or folder.")
        return datasets.load_dataset(location, name=cfg.name, split=cfg.split)
    except DataError:
        raise
    except ValueError as e:
        if "corresponds to no data" in str(e):
            raise DataError(f"dataset.path={location!r} (split {cfg.split!r}) has no rows.") from e
        if "split" in str(e).lower():
            raise DataError(f"dataset.split={cfg.split!r} of {location!r}: {e}") from e
        raise DataError(f"dataset.path={location!r} could not be loaded: {e}") from e
    except Exception as e:  # datasets raises many types for a missing hub dataset or bad file
        raise DataError(
            f"dataset.path={location!r} could not be loaded ({type(e).__name__}: {e}). "
            "Check the name, or that the hub is reachable (HF_DATASETS_OFFLINE)."
        ) from e


def load_rows(cfg: DatasetConfig) -> Rows:
    """Load the configured dataset and keep the columns the job needs.

    Raises:
        DataError: the path does not exist, the dataset is empty, or a named column is missing.
    """
    location = paths.resolve(cfg.path, "dataset.path")
    ds = _load(cfg, location)
    if isinstance(ds, dict):  # a folder without the requested split name
        raise DataError(f"dataset.split={cfg.split!r}: not found in {location!r}.")
    if len(ds) == 0:
        raise DataError(f"dataset.path={location!r} (split {cfg.split!r}) has no rows.")
    wanted = needed_columns(cfg)
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        keys = _keys_naming(cfg, missing)
        raise DataError(
            f"{', '.join(keys)}: column(s) {missing} not in {location!r}; "
            f"available columns: {ds.column_names}."
        )
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    ds = ds.select_columns(wanted)
    kept = {c: ds.features.arrow_schema.field(c).type for c in cfg.keep_columns}
    return Rows(columns=ds.to_dict(), kept_types=kept, source=location)


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
