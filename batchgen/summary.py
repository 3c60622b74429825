"""What a run has produced, read back from its shards: totals, ``errors.jsonl`` and ``run.json``
(both under ``_batchgen/``).

Everything here is derived from the published shards' own metadata, so any worker can rewrite
it at any time and a resumed or multi-worker run never counts a row twice.
"""

from __future__ import annotations

import json
from pathlib import Path

from batchgen import layout
from batchgen.progress import Totals
from batchgen.writer import finished_shards, shard_metadata, write_json_atomic, write_text_atomic


def read_shards(out_dir: Path) -> dict[int, dict]:
    """Shard index -> the ``shard`` part of its footer metadata, for every readable shard."""
    shards = {}
    for index, path in finished_shards(out_dir).items():
        try:
            shards[index] = shard_metadata(path)["shard"]
        except (OSError, ValueError, KeyError):
            continue  # a damaged file is verify's business; it contributes nothing here
    return shards


def add_totals(shards: dict[int, dict]) -> Totals:
    """The totals of the given shards (as returned by ``read_shards``), added up."""
    totals = Totals()
    for meta in shards.values():
        totals.add(Totals(**meta["totals"]))
    return totals


def write_errors(out_dir: Path, shards: dict[int, dict]) -> int:
    """Rewrite ``errors.jsonl``: one line per skipped or failed row, in row order."""
    lines = []
    for index in sorted(shards):
        for kind in ("skipped", "failed"):
            for row in shards[index].get(kind, []):
                lines.append({**row, "kind": kind, "shard": index})
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    write_text_atomic(layout.errors_file(out_dir), text)
    return len(lines)


def summarize(
    out_dir: Path,
    shards_total: int | None,
    rows_total: int | None,
    resumed: int,
    this_run: Totals,
    phases: dict[str, float],
    wall: float,
) -> dict:
    """The run summary: totals over every finished shard plus this process's own numbers.

    ``shards_total`` and ``rows_total`` are None for a stream not yet read to its end.
    """
    shards = read_shards(out_dir)
    totals = add_totals(shards)
    write_errors(out_dir, shards)
    generate = phases.get("generate", 0.0)
    return {
        "output_dir": str(out_dir),
        "shards_total": shards_total,
        "rows_total": rows_total,
        "shards_done": len(shards),
        "shards_resumed": resumed,
        "totals": totals.to_dict(),
        "padding_waste": totals.padded_tokens / max(totals.prompt_tokens, 1),
        "this_run": {
            **this_run.to_dict(),
            "generate_seconds": generate,
            "tokens_per_second": this_run.completion_tokens / generate if generate else 0.0,
        },
        "phases": phases,
        "wall_seconds": wall,
    }


def write_run_file(out_dir: Path, meta: dict, status: str, summary: dict | None = None) -> None:
    """Write ``run.json`` atomically: identity, config, versions, status and summary."""
    payload = {**meta, "status": status}
    if summary is not None:
        payload["summary"] = summary
    write_json_atomic(layout.run_file(out_dir), payload)
