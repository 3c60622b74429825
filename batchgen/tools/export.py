"""``batchgen export OUTPUT_DIR --format openai_batch [-o FILE]``: a run as another tool's file.

``openai_batch`` writes what OpenAI's Batch API returns for ``/v1/chat/completions`` requests:
one JSON line per input row, its ``custom_id`` being the row's id, with one choice per sample,
or an ``error`` for a row that was skipped or failed. So work submitted to the hosted API and
work generated here are read back by the same code.

Invariant: the export is a pure function of the published shards and ``run.json``, read once
(``folder.read_folder``, which also says whether the run is complete). Lines come
in shard order, then row order (a shard's skipped and failed rows, whose positions its footer
does not keep, after its generated rows); ids are hashes of the run's fingerprint and the row
id, and ``created`` is the time the shard was finished, so exporting twice gives the same bytes.
Shards are read a record batch at a time, so memory does not grow with the run. Exit status: 0
written, 1 the run is not finished (and no ``--partial``), 2 not an output folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from batchgen.errors import NotAnOutputDir, Unfinished
from batchgen.store import folder
from batchgen.store.summary import read_errors
from batchgen.store.writer import Footer

EXIT_WRITTEN, EXIT_INCOMPLETE, EXIT_NOT_OUTPUT = 0, 1, 2
FORMATS = ("openai_batch",)
COLUMNS = ["id", "sample_index", "response", "finish_reason", "prompt_tokens", "completion_tokens"]
# Optional columns exported when a run wrote them.
OPTIONAL = ["reasoning"]
BATCH_ROWS = 1024


def _hash(fingerprint: str, custom_id: str, kind: str, length: int) -> str:
    text = f"{kind}\0{fingerprint}\0{custom_id}".encode()
    return hashlib.sha256(text).hexdigest()[:length]


def _envelope(fingerprint: str, custom_id: str) -> dict[str, Any]:
    return {"id": f"batch_req_{_hash(fingerprint, custom_id, 'line', 32)}", "custom_id": custom_id}


def completion_line(
    run: dict[str, Any], custom_id: str, samples: list[dict[str, Any]], created: int
) -> dict[str, Any]:
    """The output line of a generated row: ``samples`` are its shard rows, in sample order."""
    fingerprint = run["fingerprint"]
    completion = sum(s["completion_tokens"] for s in samples)
    prompt = samples[0]["prompt_tokens"]  # the prompt is the same for every sample
    body = {
        "id": f"chatcmpl-{_hash(fingerprint, custom_id, 'completion', 29)}",
        "object": "chat.completion",
        "created": created,
        "model": run["config"]["model"]["name_or_path"],
        "system_fingerprint": f"fp_{fingerprint}",
        "choices": [
            {
                "index": s["sample_index"],
                "message": _message(s),
                "logprobs": None,
                "finish_reason": s["finish_reason"],
            }
            for s in samples
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    request_id = f"req_{_hash(fingerprint, custom_id, 'request', 32)}"
    response = {"status_code": 200, "request_id": request_id, "body": body}
    return {**_envelope(fingerprint, custom_id), "response": response, "error": None}


def _message(sample: dict[str, Any]) -> dict[str, Any]:
    message = {"role": "assistant", "content": sample["response"], "refusal": None}
    if sample.get("reasoning") is not None:  # output.reasoning split it off, as vLLM names it
        message["reasoning_content"] = sample["reasoning"]
    return message


def error_line(run: dict[str, Any], custom_id: str, kind: str, reason: str) -> dict[str, Any]:
    """The output line of a row that was skipped or failed (``kind``), saying why."""
    error = {"code": kind, "message": reason}
    return {**_envelope(run["fingerprint"], custom_id), "response": None, "error": error}


def _created(footer: Footer, mtime: float) -> int:
    # The finishing time recorded in the footer travels with the file (a copy changes mtime).
    finished = (footer.shard.get("timing") or {}).get("finished_at")
    return int(finished if finished is not None else mtime)


def _shard_lines(
    run: dict[str, Any], index: int, footer: Footer, mtime: float
) -> Iterator[dict[str, Any]]:
    created = _created(footer, mtime)
    current: str | None = None
    samples: list[dict[str, Any]] = []
    parquet = footer.open()
    columns = COLUMNS + [c for c in OPTIONAL if c in parquet.schema_arrow.names]
    for batch in parquet.iter_batches(BATCH_ROWS, columns=columns):
        for row in batch.to_pylist():
            # A row's samples are consecutive (row order, then sample order).
            if row["id"] != current and samples:
                yield completion_line(run, current, samples, created)
                samples = []
            current = row["id"]
            samples.append(row)
    if samples:
        yield completion_line(run, current, samples, created)
    for error in read_errors({index: footer}):
        yield error_line(run, error["id"], error["kind"], error["reason"])


def openai_batch_lines(state: folder.FolderState) -> Iterator[dict[str, Any]]:
    """Every output line of the run's published shards, in shard order, then row order.

    Shards that are not done ones of the run (``FolderState.done``: another fingerprint, a
    footer that cannot be read) are left out with a note on stderr.
    """
    run = state.require_run()
    for index, footer in state.footers.items():
        if index not in state.done:
            print(
                f"batchgen export: leaving out {footer.path.name}: not of this run or damaged",
                file=sys.stderr,
            )
            continue
        yield from _shard_lines(run, index, footer, state.mtimes[index])


def _write(lines: Iterator[dict[str, Any]], out: TextIO) -> int:
    count = 0
    for line in lines:
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
        count += 1
    return count


def export(out_dir: Path, target: Path | None, partial: bool = False) -> int:
    """Write the run in ``out_dir`` as a Batch API output file to ``target`` (None: stdout).

    ``target`` appears whole (a temp file renamed), so a stopped export leaves no half file.

    Returns:
        The number of lines written.

    Raises:
        NotAnOutputDir: no usable ``run.json``; without ``partial``, also a run whose row
            count is unknown (a stream no worker has read to its end).
        Unfinished: the run is not finished and ``partial`` is false; says how far it is.
    """
    state = folder.read_folder(out_dir)
    state.require_run()
    if not partial:
        state.require_plan()
        if not state.complete:
            raise Unfinished(
                f"{out_dir} is not finished ({len(state.done)}/{state.shards_total} shards "
                "done): rerun the job to finish it, or pass --partial to export what is done."
            )
    lines = openai_batch_lines(state)
    if target is None:
        return _write(lines, sys.stdout)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with open(fd, "w", encoding="utf-8") as f:
            count = _write(lines, f)
        os.replace(name, target)
    finally:
        Path(name).unlink(missing_ok=True)
    return count


def main(argv: list[str] | None = None) -> int:
    """Export a run; returns the exit status (0 written, 1 not finished, 2 no run)."""
    parser = argparse.ArgumentParser(
        prog="batchgen export",
        description="Write a batchgen run as another tool's file (OpenAI Batch API output).",
    )
    parser.add_argument("output_dir", type=Path, help="the run's output.dir")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the file format")
    parser.add_argument("-o", "--output", type=Path, help="the file to write (default: stdout)")
    parser.add_argument(
        "--partial", action="store_true", help="export the finished shards of an unfinished run"
    )
    args = parser.parse_args(argv)
    try:
        count = export(args.output_dir, args.output, args.partial)
    except NotAnOutputDir as e:
        print(f"batchgen export: error: {e}", file=sys.stderr)
        return EXIT_NOT_OUTPUT
    except Unfinished as e:
        print(f"batchgen export: error: {e}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except BrokenPipeError:  # `... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_WRITTEN
    if args.output is not None:
        print(f"batchgen export: wrote {count:,} lines to {args.output}", file=sys.stderr)
    return EXIT_WRITTEN


if __name__ == "__main__":
    sys.exit(main())
