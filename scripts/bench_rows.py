"""Per-row max_new_tokens: batches grouped by setting against one uniform cap, side by side.

Half the prompts ask for ``--short`` new tokens, half for ``--long`` (``ignore_eos``, so every
row generates exactly its budget and the work is the same in every run). Two runs, and the
cost of a third way, on the same model and prompts, after a warm-up:

- ``uniform``: every row at ``--long`` (what a job without per-row settings would do);
- ``grouped``: batchgen's per-row settings, where rows are batched with rows that decode alike;
- mixed batches capped per row: every batch runs to its longest row's budget, so the per-row
  job costs what the uniform run does (its time is the uniform run's).

    python scripts/bench_rows.py                     # CPU default: embedded SmolLM2, 32 prompts
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from batchgen import Generator

TOPICS = ["rivers", "bread", "trains", "owls", "glass", "tides", "maps", "bees"]


def timed(gen: Generator, prompts: list, sampling) -> tuple[float, int]:
    start = time.perf_counter()
    out = gen.chat(prompts, sampling)
    return time.perf_counter() - start, sum(c.completion_tokens for c in out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--long", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    gen = Generator(progress=False, runner={"batch_size": args.batch_size, "engine": "static"})
    prompts = [
        [{"role": "user", "content": f"Write about {TOPICS[i % len(TOPICS)]}, part {i}."}]
        for i in range(args.prompts)
    ]
    budgets = [args.short if i % 2 else args.long for i in range(args.prompts)]
    per_row = [{"max_new_tokens": b, "ignore_eos": True} for b in budgets]
    uniform = {"max_new_tokens": args.long, "ignore_eos": True}
    timed(gen, prompts[:4], {"max_new_tokens": 4})  # warm-up
    uniform_s, uniform_tokens = timed(gen, prompts, uniform)
    grouped_s, grouped_tokens = timed(gen, prompts, per_row)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(
        f"{args.prompts} chat prompts, half at max_new_tokens={args.short}, half at {args.long} "
        f"(ignore_eos), batch {args.batch_size}, static engine; {machine}"
    )
    print("| run | seconds | tokens | tokens/s |")
    print("| --- | ---: | ---: | ---: |")
    print(
        f"| uniform, every row at {args.long} | {uniform_s:.1f} | {uniform_tokens} | "
        f"{uniform_tokens / uniform_s:.1f} |"
    )
    print(
        f"| per-row, grouped batches | {grouped_s:.1f} | {grouped_tokens} | "
        f"{grouped_tokens / grouped_s:.1f} |"
    )
    # Mixed batches capped per row run every batch to its longest row: the uniform run's time
    # for the per-row job's tokens.
    print(
        f"per-row job: {grouped_s:.1f} s grouped vs {uniform_s:.1f} s in mixed batches cut per "
        f"row ({uniform_s / grouped_s:.2f}x); tokens/s per-row/uniform "
        f"{(grouped_tokens / grouped_s) / (uniform_tokens / uniform_s):.2f}"
    )
    print(json.dumps({"uniform_s": uniform_s, "grouped_s": grouped_s, "tokens": grouped_tokens}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
