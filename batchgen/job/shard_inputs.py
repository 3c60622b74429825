"""A shard's prompt records, built when the shard is reached: read, render, tokenize, police.

Invariant: a worker renders and tokenizes only the shards it generates, and renders (without
tokenizing) only the finished shards it would skip, to check their digest. The digest of a shard
is the hash of its rows' indices, ids and rendered prompts before any truncation: it is stored
in the shard's footer, and a resume that renders different rows for a finished shard refuses to
mix them (``changed_rows_error``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from batchgen.config import RunnerConfig
from batchgen.errors import ResumeError
from batchgen.inputs import policies, prompts
from batchgen.inputs.dataset import Rows, Table
from batchgen.inputs.prompts import PromptRecord, Skipped
from batchgen.job.session import Plan
from batchgen.store.shards import Shard


@dataclass
class ShardWork:
    """What the shard loop generates for one shard."""

    shard: Shard
    records: list[PromptRecord]
    skipped: list[Skipped]
    digest: str


def shard_digest(
    start: int, ids: list[str], texts: list[str | None], settings: list | None = None
) -> str:
    """Hash of consecutive rows' indices, ids and rendered prompts (None for a bad row), and
    their own sampling settings when the job reads them from a column."""
    h = hashlib.sha256()
    for i, (row_id, text) in enumerate(zip(ids, texts, strict=True)):
        row = [start + i, row_id, text] + ([settings[i]] if settings is not None else [])
        h.update(json.dumps(row, ensure_ascii=False, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class ShardInputs:
    """Builds records from rows with a plan's prompt settings and the row policies: a job's
    shards, or a ``Generator`` call's prompts.

    Args:
        table: the dataset (None when the caller passes each shard's rows: a stream, or a
            ``Generator`` call's rows in memory).
        plan: how prompts are rendered (``dataset``, ``chat``), their room and the sampling
            that ``dataset.sampling_column`` overrides per row.
        runner: ``on_bad_row`` and ``on_long_prompt``.
        tokenizer: the model's tokenizer.
    """

    def __init__(self, table: Table | None, plan: Plan, runner: RunnerConfig, tokenizer):
        self.table = table
        self.cfg = plan.dataset
        self.runner = runner
        self.tokenizer = tokenizer
        self.chat = plan.chat
        self.room = plan.room
        self.sampling = plan.sampling

    def _rows(self, shard: Shard, rows: Rows | None) -> Rows:
        return rows if rows is not None else self.table.rows(shard.start, shard.stop)

    def _settings(self, rows: Rows) -> list | None:
        column = self.cfg.sampling_column
        return list(rows.columns[column]) if column else None

    def digest(self, shard: Shard, rows: Rows | None = None) -> str:
        """The shard's digest, from rendering alone."""
        rows = self._rows(shard, rows)
        ids, texts, _ = prompts.render_texts(rows, self.cfg, self.tokenizer, self.chat)
        return shard_digest(rows.start, ids, texts, self._settings(rows))

    def build(self, shard: Shard, rows: Rows | None = None) -> ShardWork:
        """Render and tokenize the shard's rows, then apply the bad-row and long-prompt policies.

        Raises:
            DataError: a bad row or a long prompt under the ``error`` policies.
        """
        rows = self._rows(shard, rows)
        rendered = prompts.render_texts(rows, self.cfg, self.tokenizer, self.chat)
        records, bad = prompts.build_records(
            rows, self.cfg, self.tokenizer, self.chat, rendered, self.sampling
        )
        bad = policies.apply_bad_row_policy(bad, self.runner.on_bad_row)
        records, too_long = policies.apply_length_policy(
            records,
            self.room,
            self.runner.on_long_prompt,
            self.tokenizer,
            self.sampling.max_new_tokens,
        )
        skipped = sorted(bad + too_long, key=lambda s: s.index)
        digest = shard_digest(rows.start, *rendered[:2], self._settings(rows))
        return ShardWork(shard, records, skipped, digest)

    def changed_rows_error(self, path: Path, shard: Shard, rows: Rows | None = None) -> ResumeError:
        """The refusal for a finished shard whose input rows changed, naming the first one."""
        rows = self._rows(shard, rows)
        ids, texts, _ = prompts.render_texts(rows, self.cfg, self.tokenizer, self.chat)
        table = pq.read_table(path, columns=["id", "prompt"]).to_pydict()
        written = dict(zip(table["id"], table["prompt"], strict=True))
        where = "its rows changed"
        for i, (row_id, text) in enumerate(zip(ids, texts, strict=True)):
            old = written.get(row_id)
            if text is not None and old is not None and not text.endswith(old):
                where = f"row {rows.start + i} (id {row_id!r}) changed"
                break
        return ResumeError(
            f"{path.name} was generated from other input rows than dataset.path holds now: "
            f"{where}. Resuming would mix outputs of two datasets. Move {path.name} aside to "
            f"generate it again from the new rows, or use another output.dir."
        )
