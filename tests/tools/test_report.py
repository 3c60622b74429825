"""The HTML report and its text table, on a hand-built output folder with known numbers."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import time
import zlib

import numpy as np
import pytest

from batchgen.store import layout
from batchgen.store.records import write_worker_file
from batchgen.store.summary import WorkerSummary
from batchgen.store.writer import output_schema, write_json_atomic, write_shard
from batchgen.tools.plots import histogram_bins, nice_step
from batchgen.tools.report import build_report, format_table, main

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHROMIUM = "/usr/bin/chromium"
# What apt-get says when another apt/dpkg run holds a lock it needs (LC_ALL=C).
APT_LOCKED = re.compile("Could not get lock|Unable to (acquire|lock)")

# Per shard: rows of (id, prompt tokens, [(completion tokens, finish reason) per sample]).
SHARDS = [
    [("r0", 5, [(8, "stop"), (16, "length")]), ("r1", 12, [(3, "stop"), (16, "length")])],
    [("r2", 12, [(7, "stop"), (9, "stop")]), ("r3", 30, [(16, "length"), (16, "length")])],
    [("r4", 41, [(1, "stop"), (2, "stop")])],
]
# The third shard's totals lack `failed` and `padded_tokens`: written before they existed.
TOTALS = [
    {"skipped": 1, "failed": 0, "prompt_tokens": 17, "padded_tokens": 6},
    {"skipped": 0, "failed": 1, "prompt_tokens": 42, "padded_tokens": 6},
    {"skipped": 2, "prompt_tokens": 41},
]
ERRORS = [
    {"skipped": [{"id": "r9", "reason": "empty prompt"}]},
    {"failed": [{"id": "r10", "reason": "generation failed: boom"}]},
    {
        "skipped": [
            {"id": "r11", "reason": "over context limit"},
            {"id": "r12", "reason": "empty prompt"},
        ]
    },
]
# Rank 0 of 2 published shards 0 and 2, rank 1 shard 1; each recorded its own phases.
PUBLISHER = [0, 1, 0]
SUMMARIES = [
    {
        "shards_total": 3,
        "phases": {"load": 1.0, "tokenize": 0.25, "generate": 5.0, "write": 0.25},
        "wall_seconds": 7.0,
    },
    {
        "shards_total": 3,
        "phases": {"load": 0.5, "generate": 4.0, "write": 0.25},
        "wall_seconds": 11.5,
    },
]
# The third shard has no timing: the report must cope with shards written before it existed.
TIMING = [
    {"finished_at": 1000.0, "generate_seconds": 4.0},
    {"finished_at": 1010.0, "generate_seconds": 5.0},
    None,
]


@pytest.fixture
def out_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for index, rows in enumerate(SHARDS):
        worker = {"rank": PUBLISHER[index], "world_size": 2}
        shard = {"index": index, "totals": TOTALS[index], **ERRORS[index], "worker": worker}
        if TIMING[index]:
            shard["timing"] = TIMING[index]
        records = [
            {
                "id": rid,
                "sample_index": k,
                "prompt": f"prompt {rid}",
                "response": f"response {rid}/{k}",
                "finish_reason": reason,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
            }
            for rid, prompt, samples in rows
            for k, (completion, reason) in enumerate(samples)
        ]
        schema = output_schema({}, {"fingerprint": "fp", "shard": shard})
        assert write_shard(out, f"part-{index:05d}.parquet", records, schema)
    write_json_atomic(
        layout.run_file(out), {"fingerprint": "fp", "config": {"model": {"name_or_path": MODEL}}}
    )
    # Rank 1 stopped before rank 0 published the last shard; rank 0 saw the run complete.
    for rank, status in ((0, "complete"), (1, "incomplete")):
        summary = WorkerSummary.from_dict(SUMMARIES[rank])
        write_worker_file(out, {"fingerprint": "fp"}, rank, 2, status, summary)
    return out


def test_numbers_are_exact(out_dir):
    numbers, _ = build_report(out_dir)
    throughput = numbers.pop("throughput")
    assert numbers == {
        "output_dir": str(out_dir),
        "model": MODEL,
        "status": "complete",
        "workers": 2,
        "shards_done": 3,
        "shards_total": 3,
        "shards_unreadable": [],
        "rows_done": 5,
        "samples": 10,
        "rows_skipped": 3,
        "rows_failed": 1,
        "prompt_tokens": 5 + 12 + 12 + 30 + 41,
        "completion_tokens": 8 + 16 + 3 + 16 + 7 + 9 + 16 + 16 + 1 + 2,
        "generate_seconds": 9.0,
        "tokens_per_second": (43 + 48) / 9.0,
        "padding_waste": 0.12,
        "phases": {"load": 1.5, "tokenize": 0.25, "generate": 9.0, "write": 0.5},
        "wall_seconds": 11.5,
        "finish_reasons": {"stop": 6, "length": 4},
        "errors": {"empty prompt": 2, "generation failed: boom": 1, "over context limit": 1},
        # Width 2 covers 5..41 in at most 20 bins: 4-5, 6-7, ..., 40-41.
        "prompt_hist": {
            "edges": list(range(4, 44, 2)),
            "counts": [1, 0, 0, 0, 2] + [0] * 8 + [1] + [0] * 4 + [1],
        },
        "completion_hist": {
            "edges": list(range(1, 18)),
            "counts": [1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 4],
        },
    }
    # The second shard started at 1005, the first at 996: time counts from 996.
    assert throughput == [
        {"shard": 0, "seconds": 4.0, "tokens_per_second": 43 / 4.0},
        {"shard": 1, "seconds": 14.0, "tokens_per_second": 48 / 5.0},
    ]


def test_reads_the_folder_once_and_each_footer_once(out_dir, folder_reads, footer_parses):
    numbers, _ = build_report(out_dir)
    assert numbers["shards_done"] == 3 and numbers["rows_done"] == 5
    assert folder_reads == [out_dir]
    # The data is read on the footers read_folder parsed: none is parsed a second time.
    assert footer_parses == {f"part-{i:05d}.parquet": 1 for i in range(3)}


def test_text_table(out_dir):
    numbers, _ = build_report(out_dir)
    assert format_table(numbers).splitlines() == [
        f"batchgen report: {out_dir}",
        f"  model           {MODEL}",
        "  status          complete (3/3 shards done)",
        "  rows done       5 (10 samples)",
        "  rows skipped    3",
        "  rows failed     1",
        "  tokens in       100",
        "  tokens out      94",
        "  tokens/s        10.1 (over 9.0 s generating)",
        "  padding waste   12.0% padded over real tokens",
        "  wall time       load 1.5 s, tokenize 0.25 s, generate 9.0 s, write 0.5 s (summed over 2 "
        "workers); total 11.5 s",
        "  finish reasons  stop 6, length 4",
        "  errors          empty prompt 2, generation failed: boom 1, over context limit 1",
    ]


def test_html_is_self_contained_with_a_plot_each(out_dir):
    _, html = build_report(out_dir)
    assert html.count("<svg ") == 4
    for title in ("Prompt length", "Completion length", "Finish reasons", "Throughput"):
        assert title in html
    for value in (MODEL, "10.1 (over 9.0 s generating)", "12.0% padded", "stop 6, length 4"):
        assert value in html
    assert "<title>stop: 6</title>" in html and "<title>length: 4</title>" in html
    assert "<title>16: 4</title>" in html  # the completion-length bar of 16 tokens
    assert "6 (60.0%)" in html
    assert ">seconds since start</text>" in html
    # Nothing to fetch: no scripts, no external stylesheets, images or fonts.
    assert "<script" not in html and "src=" not in html and "<link" not in html
    assert "url(" not in html


def test_missing_pieces_are_reported_not_fatal(out_dir):
    (out_dir / "_batchgen" / "run.json").unlink()
    shutil.rmtree(layout.workers_dir(out_dir))
    (out_dir / "part-00001.parquet").write_bytes(b"PAR1 cut short")
    numbers, html = build_report(out_dir)
    assert numbers["model"] is None and numbers["workers"] == 0
    assert numbers["shards_done"] == 2 and numbers["shards_unreadable"] == ["part-00001.parquet"]
    assert numbers["rows_done"] == 3 and numbers["completion_tokens"] == 46
    assert numbers["tokens_per_second"] == 43 / 4.0
    # Errors and counts come from the readable shards' own footers.
    assert numbers["errors"] == {"empty prompt": 2, "over context limit": 1}
    assert numbers["rows_skipped"] == 3 and numbers["rows_failed"] == 0
    table = format_table(numbers)
    assert "status          unknown (2/? shards done, unreadable: part-00001.parquet)" in table
    assert "padding waste   10.3% padded over real tokens" in table  # 6 of 17 + 41
    assert "wall time       phases n/a; total n/a" in table
    for shard in ("part-00000.parquet", "part-00002.parquet"):
        (out_dir / shard).unlink()
    numbers, html = build_report(out_dir)
    assert numbers["tokens_per_second"] is None and numbers["throughput"] == []
    assert "tokens/s        n/a (no shard timing)" in format_table(numbers)
    assert html.count("<svg ") == 4 and html.count(">no data</text>") == 3
    assert "no timing recorded in the shards" in html


def test_cli_writes_the_page_and_prints_the_table(out_dir, tmp_path, capsys):
    assert main([str(out_dir)]) == 0
    assert (out_dir / "_batchgen" / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert not (out_dir / "_batchgen" / "report.html").name.endswith(".parquet")
    target = tmp_path / "elsewhere.html"
    assert main([str(out_dir), "--out", str(target)]) == 0
    printed = capsys.readouterr().out
    assert "  tokens/s        10.1 (over 9.0 s generating)" in printed
    assert f"report written to {target}" in printed
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_bins_and_steps():
    assert histogram_bins({}) == ([], [])
    assert histogram_bins({7: 3}) == ([7, 8], [3])
    assert histogram_bins({0: 1, 1000: 1}) == (list(range(0, 1200, 100)), [1] + [0] * 9 + [1])
    assert [nice_step(s, 5) for s in (1, 7, 12, 99, 0.3)] == [0.2, 2, 5, 20, 0.1]


def read_png(path) -> np.ndarray:
    """Decode an 8-bit, non-interlaced RGB(A) PNG into an (h, w, channels) array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    assert depth == 8 and color in (2, 6) and interlace == 0
    bpp = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, w * bpp + 1)
    out = np.zeros((h, w * bpp), np.uint8)
    prior = np.zeros(w * bpp, np.uint8)
    for y in range(h):
        kind, line = raw[y, 0], raw[y, 1:]
        if kind == 0:
            row = line.copy()
        elif kind == 1:  # Sub: a running sum per channel
            row = np.cumsum(line.reshape(w, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:  # Up
            row = line + prior
        else:  # Average or Paeth: each byte depends on the one to its left
            row, up = bytearray(line.tobytes()), prior.tobytes()
            for x in range(len(row)):
                a = row[x - bpp] if x >= bpp else 0
                b = up[x]
                if kind == 3:
                    row[x] = (row[x] + (a + b) // 2) & 255
                    continue
                c = up[x - bpp] if x >= bpp else 0
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                row[x] = (row[x] + pred) & 255
            row = np.frombuffer(bytes(row), np.uint8)
        out[y] = prior = row
    return out.reshape(h, w, bpp)[:, :, :3]


def _apt_get(*args: str, wait: float = 600) -> subprocess.CompletedProcess:
    """apt-get that waits for another apt/dpkg run instead of failing at once: up to ``wait`` s in
    all, for dpkg's frontend lock through DPkg::Lock::Timeout (apt >= 1.9) and, for the locks that
    option does not cover (``update``'s /var/lib/apt/lists/lock), by retrying every 10 s."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    deadline = time.monotonic() + wait
    while True:
        left = max(1, int(deadline - time.monotonic()))
        done = subprocess.run(
            ["apt-get", "-o", f"DPkg::Lock::Timeout={left}", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=left + 1800,
        )
        locked = APT_LOCKED.search(done.stdout + done.stderr)
        if done.returncode == 0 or not locked or time.monotonic() >= deadline:
            return done
        time.sleep(10)


def _apt_failed(what: str, done: subprocess.CompletedProcess, unavailable) -> None:
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
    if APT_LOCKED.search(tail):  # a lock still held after the wait: a failure, not "cannot"
        pytest.fail(f"{what}: another apt/dpkg run still held its lock after 600 s:\n{tail}")
    unavailable(f"{CHROMIUM} is absent and {what} failed (exit {done.returncode}):\n{tail}")


@pytest.fixture(scope="session")
def chromium(unavailable) -> str:
    """Debian's chromium, installed with apt-get where it is absent and we are root (CI: a fresh
    machine, as root). Measured on Debian 12: 25 packages, 115 MB fetched, 398 MB on disk, 11 s."""
    if shutil.which(CHROMIUM):
        return CHROMIUM
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        unavailable(f"{CHROMIUM} is absent; installing Debian's chromium needs root and apt-get")
    policy = subprocess.run(
        ["apt-cache", "policy", "chromium"],
        env={**os.environ, "LC_ALL": "C"},
        capture_output=True,
        text=True,
    )
    # Empty package lists (a fresh image): update first; stale ones (the install cannot fetch):
    # update and try again.
    updated = "Candidate:" not in policy.stdout or "Candidate: (none)" in policy.stdout
    if updated and (done := _apt_get("update", "-q")).returncode != 0:
        _apt_failed("apt-get update", done, unavailable)
    install = ("install", "-y", "-q", "--no-install-recommends", "chromium")
    done = _apt_get(*install)
    if done.returncode != 0 and not updated:
        if (update := _apt_get("update", "-q")).returncode != 0:
            _apt_failed("apt-get update", update, unavailable)
        done = _apt_get(*install)
    if done.returncode != 0:
        _apt_failed("apt-get install chromium", done, unavailable)
    if shutil.which(CHROMIUM) is None:
        unavailable(f"apt-get installed chromium, yet {CHROMIUM} is absent")
    return CHROMIUM


def test_page_renders_in_headless_chromium(out_dir, tmp_path, chromium):
    assert main([str(out_dir)]) == 0
    png = tmp_path / "report.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={png}",
            "--window-size=1200,1600",
            (out_dir / "_batchgen" / "report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    image = read_png(png)
    assert image.shape == (1600, 1200, 3)
    pixels = image.reshape(-1, 3)
    # Text, rules and four charts: a blank or error page has far fewer inked pixels and colours.
    assert (pixels.min(axis=1) < 200).mean() > 0.01
    assert len(np.unique(pixels, axis=0)) > 100
    # The bars are drawn in their exact fill colours: blue histograms, green stop, orange length.
    for rgb, least in (((0x3B, 0x6E, 0xA8), 5000), ((0x2F, 0x85, 0x5A), 2000)):
        assert (pixels == rgb).all(axis=1).sum() > least, rgb
    assert (pixels == (0xDD, 0x6B, 0x20)).all(axis=1).sum() > 1000
