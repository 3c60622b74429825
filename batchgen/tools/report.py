"""A one-page HTML report on an output folder, and the same headline numbers as a text table.

``batchgen report OUTPUT_DIR [--out FILE]`` reads the folder once (``folder.read_folder``:
``run.json``, the worker records merged, each shard's footer: totals, skipped and failed rows,
timing), then the done shards' data on those footers (token counts and finish reasons); it
writes ``OUTPUT_DIR/_batchgen/report.html`` unless told otherwise. Missing pieces (no timing, no
``run.json``, an unreadable shard) show as such rather than failing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from html import escape
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batchgen.store import folder, layout
from batchgen.store.summary import add_totals, padding_waste, read_errors
from batchgen.store.writer import Footer
from batchgen.tools import plots

PHASES = ("load", "tokenize", "generate", "write")
COLUMNS = ["sample_index", "prompt_tokens", "completion_tokens", "finish_reason"]


def _by_count(counter: Counter) -> dict[str, int]:
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def _columns(footer: Footer) -> pa.Table | None:
    """The columns the report counts, or None for a shard that cannot be read."""
    try:
        with footer.open() as parquet:
            return parquet.read(columns=COLUMNS)
    except Exception:  # whatever is wrong with it, the report shows the rest
        return None


def _add_value_counts(counter: Counter, column) -> None:
    for item in pc.value_counts(column).to_pylist():
        counter[item["values"]] += item["counts"]


def _hist(lengths: Counter) -> dict[str, list[int]]:
    edges, counts = plots.histogram_bins(lengths)
    return {"edges": edges, "counts": counts}


def build_report(out_dir: Path) -> tuple[dict[str, Any], str]:
    """Collect the numbers of an output folder and render the HTML page.

    Args:
        out_dir: a batchgen output folder.

    Returns:
        ``(numbers, html)``. ``numbers`` holds: ``output_dir``, ``model``, ``status``,
        ``workers`` (worker records), ``shards_done``, ``shards_total`` (None when unknown) and
        ``shards_unreadable`` (file names: not this run's shards, or unreadable);
        ``rows_done`` (input rows with outputs), ``samples``, ``rows_skipped``, ``rows_failed``
        and ``padding_waste`` (from the shard footers' ``shard.totals``); ``prompt_tokens``
        (once per row) and ``completion_tokens`` (over all samples); ``generate_seconds`` and
        ``tokens_per_second`` over the shards whose footer has ``shard.timing`` (None when
        none has); ``phases`` (summed over the workers) and ``wall_seconds`` (the longest
        worker's) from the worker records' summaries (None when absent); ``finish_reasons``
        and ``errors`` (the footers' skipped and failed rows, per reason) as
        ``{name: count}``, most frequent first; ``prompt_hist`` and
        ``completion_hist`` as ``{"edges", "counts"}`` (see ``plots.histogram_bins``);
        ``throughput``: one ``{"shard", "seconds", "tokens_per_second"}`` per timed shard, in
        order of finishing, ``seconds`` from when the first timed shard started to its end.
    """
    state = folder.read_folder(out_dir)
    model = (state.run.get("config") or {}).get("model", {}).get("name_or_path")
    prompt_lengths, completion_lengths, reasons = Counter(), Counter(), Counter()
    timed, unreadable, done = [], [], {}
    for index, footer in state.footers.items():
        table = _columns(footer) if index in state.done else None
        if table is None:
            unreadable.append(footer.path.name)
            continue
        done[index] = footer
        model = model or (footer.meta.get("config") or {}).get("model", {}).get("name_or_path")
        first = table.filter(pc.equal(table["sample_index"], 0))
        _add_value_counts(prompt_lengths, first["prompt_tokens"])
        _add_value_counts(completion_lengths, table["completion_tokens"])
        _add_value_counts(reasons, table["finish_reason"])
        timing = footer.shard.get("timing") or {}
        if timing.get("generate_seconds") and timing.get("finished_at") is not None:
            tokens = pc.sum(table["completion_tokens"]).as_py() or 0
            timed.append((timing["finished_at"], timing["generate_seconds"], tokens, index))
    timed.sort()
    start = min((end - secs for end, secs, _, _ in timed), default=0.0)
    gen_seconds = sum(secs for _, secs, _, _ in timed) if timed else None
    totals = add_totals(done)
    numbers = {
        "output_dir": str(out_dir),
        "model": model,
        "status": state.status,
        "workers": len(state.records),
        "shards_done": len(done),
        "shards_total": state.shards_total,
        "shards_unreadable": unreadable,
        "rows_done": sum(prompt_lengths.values()),
        "samples": sum(completion_lengths.values()),
        "rows_skipped": totals.skipped,
        "rows_failed": totals.failed,
        "prompt_tokens": sum(k * n for k, n in prompt_lengths.items()),
        "completion_tokens": sum(k * n for k, n in completion_lengths.items()),
        "generate_seconds": gen_seconds,
        "tokens_per_second": sum(t for _, _, t, _ in timed) / gen_seconds if timed else None,
        "padding_waste": padding_waste(totals) if done else None,
        "phases": state.phases,
        "wall_seconds": state.wall_seconds,
        "finish_reasons": _by_count(reasons),
        "errors": _by_count(Counter(e["reason"] for e in read_errors(done))),
        "prompt_hist": _hist(prompt_lengths),
        "completion_hist": _hist(completion_lengths),
        "throughput": [
            {"shard": i, "seconds": end - start, "tokens_per_second": tokens / secs}
            for end, secs, tokens, i in timed
        ],
    }
    return numbers, _html(numbers)


def _seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 1:
        return f"{s:.2f}".rstrip("0").rstrip(".") + " s"
    return f"{s:,.1f} s" if s < 120 else f"{s / 60:,.1f} min"


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in d.items()) or "none"


def headline(n: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline numbers as (label, value) text pairs, shared by the table and the page."""
    total = n["shards_total"] if n["shards_total"] is not None else "?"
    shards = f"{n['shards_done']}/{total} shards done"
    if n["shards_unreadable"]:
        shards += f", unreadable: {', '.join(n['shards_unreadable'])}"
    tps = n["tokens_per_second"]
    phases = n["phases"] or {}
    wall = ", ".join(f"{p} {_seconds(phases[p])}" for p in PHASES if p in phases)
    if wall and n["workers"] > 1:
        wall += f" (summed over {n['workers']} workers)"
    waste = n["padding_waste"]
    return [
        ("model", n["model"] or "unknown"),
        ("status", f"{n['status'] or 'unknown'} ({shards})"),
        ("rows done", f"{n['rows_done']:,} ({n['samples']:,} samples)"),
        ("rows skipped", f"{n['rows_skipped']:,}"),
        ("rows failed", f"{n['rows_failed']:,}"),
        ("tokens in", f"{n['prompt_tokens']:,}"),
        ("tokens out", f"{n['completion_tokens']:,}"),
        (
            "tokens/s",
            "n/a (no shard timing)"
            if tps is None
            else f"{tps:,.1f} (over {_seconds(n['generate_seconds'])} generating)",
        ),
        ("padding waste", "n/a" if waste is None else f"{waste:.1%} padded over real tokens"),
        ("wall time", f"{wall or 'phases n/a'}; total {_seconds(n['wall_seconds'])}"),
        ("finish reasons", _counts(n["finish_reasons"])),
        ("errors", _counts(n["errors"])),
    ]


def format_table(numbers: dict[str, Any]) -> str:
    """The headline numbers as an aligned plain-text table."""
    rows = headline(numbers)
    width = max(len(label) for label, _ in rows)
    lines = [f"batchgen report: {numbers['output_dir']}"]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; color: #1f2933; margin: 24px auto;
       max-width: 1140px; padding: 0 16px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 2px; }
.sub { color: #616e7c; margin: 0 0 18px; word-break: break-all; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.card { border: 1px solid #e4e7eb; border-radius: 8px; padding: 12px 14px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #e4e7eb;
         vertical-align: top; }
th { width: 150px; color: #616e7c; font-weight: 500; }
svg { width: 100%; height: auto; display: block; }
"""


def _throughput_svg(points: list[dict[str, Any]]) -> str:
    # Minutes read better on a long run, seconds on a short one.
    scale, unit = (60, "minutes") if points and points[-1]["seconds"] >= 120 else (1, "seconds")
    return plots.points_svg(
        [p["seconds"] / scale for p in points],
        [p["tokens_per_second"] for p in points],
        "Throughput per shard, by time finished",
        f"{unit} since start",
        "tokens/s",
    )


def _html(n: dict[str, Any]) -> str:
    table = "\n".join(
        f"<tr><th>{escape(label)}</th><td>{escape(value)}</td></tr>" for label, value in headline(n)
    )
    charts = [
        plots.histogram_svg(
            n["prompt_hist"]["edges"],
            n["prompt_hist"]["counts"],
            "Prompt length (one per row)",
            "prompt tokens",
        ),
        plots.histogram_svg(
            n["completion_hist"]["edges"],
            n["completion_hist"]["counts"],
            "Completion length (one per sample)",
            "completion tokens",
        ),
        plots.bars_svg(n["finish_reasons"], "Finish reasons"),
        _throughput_svg(n["throughput"]),
    ]
    cards = "\n".join(f'<div class="card">{svg}</div>' for svg in charts)
    made = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>batchgen report: {escape(n["model"] or n["output_dir"])}</title>
<style>{STYLE}</style></head>
<body>
<h1>batchgen report</h1>
<p class="sub">{escape(n["output_dir"])} &middot; generated {escape(made)}</p>
<div class="grid">
<div class="card" style="grid-column: 1 / -1"><table>
{table}
</table></div>
{cards}
</div>
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    """Command line: write the HTML report and print the table; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="batchgen report", description="Report on a batchgen output folder."
    )
    parser.add_argument("output_dir", type=Path, help="the run's output.dir")
    parser.add_argument(
        "--out", type=Path, help="HTML file to write (OUTPUT_DIR/_batchgen/report.html)"
    )
    args = parser.parse_args(argv)
    if not args.output_dir.is_dir():
        print(f"batchgen report: {args.output_dir} is not a folder", file=sys.stderr)
        return 2
    numbers, html = build_report(args.output_dir)
    out = args.out or layout.report_file(args.output_dir)
    try:
        out.write_text(html)
    except OSError as e:
        print(f"batchgen report: cannot write {out}: {e.strerror}; use --out", file=sys.stderr)
        return 1
    print(format_table(numbers))
    print(f"\nreport written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
