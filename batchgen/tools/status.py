"""``batchgen status OUTPUT_DIR``: how far a run is, from its output folder alone.

Reads the folder through ``batchgen.store.folder.read_folder`` (``_batchgen/run.json``, the
worker records, the footers of the published shards), then the claim files and the finished
batches of shards in progress, and nothing else (no config, no model, no scheduler),
so it works from a login node while workers run. Exit status: 0 when every shard is done, 1 while
some are not, 2 when the folder is not a batchgen output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from batchgen.cluster.claims import ClaimStore
from batchgen.cluster.lock import is_live
from batchgen.config import DEFAULT_LEASE_SECONDS
from batchgen.errors import NotAnOutputDir
from batchgen.store import checkpoints, folder, layout

EXIT_COMPLETE, EXIT_INCOMPLETE, EXIT_NOT_OUTPUT = 0, 1, 2


def _throughput(done: list[dict], state: folder.FolderState, workers: int) -> dict[str, Any]:
    """Rows/s and tokens/s: from the times of two or more finished shards or batches; else from
    the generation time finished shards record, times the ``workers`` running side by side;
    else from the worker records of finished runs."""
    timed = sorted(done, key=lambda s: s["mtime"])
    span = timed[-1]["mtime"] - timed[0]["mtime"] if len(timed) > 1 else 0.0
    if span > 0:
        # The first shard's work happened before the first mtime: it is outside the span.
        later = timed[1:]
        return {
            "rows_per_second": sum(s["rows"] for s in later) / span,
            "completion_tokens_per_second": sum(s["completion_tokens"] for s in later) / span,
            "source": "shard and batch times",
        }
    seconds = sum(s.get("generate_seconds") or 0.0 for s in done)
    if seconds > 0:
        side_by_side = max(workers, 1)
        return {
            "rows_per_second": side_by_side * sum(s["rows"] for s in done) / seconds,
            "completion_tokens_per_second": side_by_side
            * sum(s["completion_tokens"] for s in done)
            / seconds,
            "source": "finished shards' generation time",
        }
    if state.throughput is not None:
        return {**asdict(state.throughput), "source": "worker records"}
    return {"rows_per_second": None, "completion_tokens_per_second": None, "source": None}


def _run_status(state: folder.FolderState, clock: Callable[[], float]) -> str | None:
    """The workers' merged status, but "stopped" for a "running" run that no worker holds any more.

    Every live worker holds a lock whose mtime its heartbeat touches every third of the lease;
    a worker killed (or a second Ctrl-C) leaves ``running`` behind with no heartbeat.
    """
    status = state.status
    if status != "running":
        return status
    runner = (state.run.get("config") or {}).get("runner") or {}
    lease = runner.get("lease_seconds") or DEFAULT_LEASE_SECONDS
    locks = layout.locks_dir(state.out_dir).glob("*.lock")
    if any(is_live(lock, lease, clock()) for lock in locks):
        return status
    return "stopped (no live worker: rerun the same command to resume)"


def collect(
    out_dir: Path,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Gather the state of the run in ``out_dir``: the folder (``folder.read_folder``), its
    claims and the finished batches of shards in progress.

    Args:
        out_dir: the run's output folder.
        lease_seconds: lease assumed for unreadable claim files (judged by their mtime).
        clock: seconds since the epoch.

    Returns:
        A JSON-serialisable report: ``complete``, ``shards`` (``total``, ``done``, ``claimed``,
        ``expired``, ``pending``), ``rows`` (``total``, ``done``, ``remaining``), ``totals``
        (summed shard totals), ``workers`` (per claim owner: live and expired shard indices),
        ``foreign`` (shard files of another fingerprint or unreadable), ``throughput``,
        ``eta_seconds`` and ``records`` (per worker record: ``rank``, ``world_size``,
        ``status``, ``host``, ``device``, ``engine``).

    Raises:
        NotAnOutputDir: no folder, no usable ``run.json``, or rows or shards unknown.
    """
    out_dir = Path(out_dir)
    state = folder.read_folder(out_dir)
    state.require_plan()
    total = state.shards_total
    done = [
        {
            "index": index,
            "rows": folder.covered_rows(footer),
            "completion_tokens": footer.shard["totals"]["completion_tokens"],
            "mtime": state.mtimes[index],
            "generate_seconds": (footer.shard.get("timing") or {}).get("generate_seconds"),
        }
        for index, footer in state.done.items()
    ]
    workers: dict[str, dict[str, Any]] = {}
    claimed = expired = 0
    for c in ClaimStore.describe(out_dir, lease_seconds, clock):
        if c["index"] in state.done or c["index"] >= total or c["released"]:
            continue
        key = c["owner"] or "(unreadable claim)"
        w = workers.setdefault(
            key,
            {**{k: c[k] for k in ("owner", "host", "pid", "rank")}, "shards": [], "expired": []},
        )
        w["expired" if c["expired"] else "shards"].append(c["index"])
        expired += c["expired"]
        claimed += not c["expired"]
    rows_done = state.rows_done
    batches = checkpoints.finished_batches(out_dir, state.samples_per_row)  # shards in progress
    remaining = state.rows_total - rows_done - sum(b["rows"] for b in batches)
    speed = _throughput(done + batches, state, len(workers))
    rate = speed["rows_per_second"]
    return {
        "output_dir": str(out_dir),
        "fingerprint": state.run["fingerprint"],
        "run_status": _run_status(state, clock),
        "complete": state.complete,
        "shards": {
            "total": total,
            "done": len(done),
            "claimed": claimed,
            "expired": expired,
            "pending": total - len(done) - claimed - expired,
        },
        "rows": {"total": state.rows_total, "done": rows_done, "remaining": remaining},
        "rows_per_shard": state.rows_per_shard,
        "totals": state.totals.to_dict(),
        "workers": sorted(workers.values(), key=lambda w: (w["rank"] is None, w["rank"] or 0)),
        "foreign": state.foreign,
        "throughput": speed,
        "eta_seconds": remaining / rate if rate else (0.0 if remaining == 0 else None),
        "records": _records(state),
    }


def _records(state: folder.FolderState) -> list[dict[str, Any]]:
    """Each worker record; those of another world size than the latest record's are of an
    earlier attempt (``earlier``): restarted with other workers, they describe no live one."""
    latest = max(state.records, key=lambda r: r.updated_at or 0.0, default=None)
    return [
        {
            "rank": r.rank,
            "world_size": r.world_size,
            "status": r.status,
            "host": r.host,
            "device": r.device,
            "engine": r.engine,
            "earlier": latest is not None and r.world_size != latest.world_size,
        }
        for r in state.records
    ]


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def format_status(report: dict[str, Any]) -> str:
    """The report of ``collect`` as aligned lines for the terminal."""
    sh, rows, t, speed = report["shards"], report["rows"], report["totals"], report["throughput"]
    lines = [
        f"batchgen status  {report['output_dir']}",
        f"  run         {report['run_status']}, fingerprint {report['fingerprint']}",
        f"  shards      {sh['done']}/{sh['total']} done, {sh['claimed']} claimed, "
        f"{sh['expired']} expired claims, {sh['pending']} pending",
    ]
    current = [r for r in report["records"] if not r["earlier"]]
    if current:
        statuses = Counter(r["status"] for r in current)
        earlier = len(report["records"]) - len(current)
        lines.append(
            f"  records     {len(current)} worker record(s): "
            + ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
            + (f" ({earlier} more of an earlier attempt with other workers)" if earlier else "")
        )
    for i, w in enumerate(report["workers"]):
        live = f"{len(w['shards'])} claimed {w['shards']}" if w["shards"] else "0 claimed"
        gone = f", EXPIRED {w['expired']} (to be redone)" if w["expired"] else ""
        label = "workers" if i == 0 else ""
        lines.append(f"  {label:<11} {w['owner'] or '(unreadable claim)'}  {live}{gone}")
    lines += [
        f"  rows        {rows['done']:,}/{rows['total']:,} done ({t['skipped']:,} skipped), "
        f"{t['samples']:,} samples",
        f"  tokens      {t['prompt_tokens']:,} prompt, {t['completion_tokens']:,} completion",
    ]
    if speed["source"]:
        lines.append(
            f"  throughput  {speed['completion_tokens_per_second']:,.1f} tokens/s, "
            f"{speed['rows_per_second']:,.2f} rows/s (from {speed['source']})"
        )
    if report["complete"]:
        lines.append("  complete    every shard is done")
    else:
        eta = report["eta_seconds"]
        left = sh["total"] - sh["done"]
        when = _duration(eta) if eta is not None else "unknown (no throughput yet)"
        lines.append(f"  eta         {when} for {left} shards ({rows['remaining']:,} rows)")
    if report["foreign"]:
        lines.append(
            f"  foreign     {len(report['foreign'])} shard files of another run or unreadable"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the status of a run; returns the exit status (0 complete, 1 not yet, 2 no run)."""
    parser = argparse.ArgumentParser(
        prog="batchgen status",
        description="Progress of a batchgen run, read from its output folder alone.",
    )
    parser.add_argument("output_dir", type=Path, help="the run's output.dir")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--lease",
        type=float,
        default=DEFAULT_LEASE_SECONDS,
        help="seconds after which an unreadable claim file counts as expired "
        f"(default {DEFAULT_LEASE_SECONDS:g}, as runner.lease_seconds)",
    )
    args = parser.parse_args(argv)
    try:
        report = collect(args.output_dir, args.lease)
    except NotAnOutputDir as e:
        print(f"batchgen status: error: {e}", file=sys.stderr)
        return EXIT_NOT_OUTPUT
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return EXIT_COMPLETE if report["complete"] else EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
