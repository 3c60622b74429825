"""Where the static engine's time goes on the CPU: torch's profiler over one generation.

The embedded model decodes the benchmark's chat prompts (``scripts/bench.py``) once as a warm-up,
times the prefill alone (one new token), then generates once under ``torch.profiler``. The table
groups the operators' own CPU time by what they do (matrix products, attention, norms and
activations, sampling and logits processors, copies and cache updates) and what the operators
leave of the wall time (Python, ``generate``'s loop, the host's own work between kernels).

    python scripts/profile_cpu.py --dtype bfloat16 --prompts 32 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import make_prompts  # noqa: E402

from batchgen import Generator  # noqa: E402

# Operator name fragments -> the group they are counted in, first match wins.
GROUPS = (
    ("matrix products", ("addmm", "::mm", "matmul", "linear", "bmm", "_mkldnn")),
    ("attention", ("scaled_dot_product", "attention", "softmax")),
    ("norms, activations", ("rms", "pow", "rsqrt", "mean", "silu", "mul", "add", "neg", "cat")),
    ("sampling, processors", ("topk", "sort", "argmax", "log_softmax", "gather", "where", "full")),
    ("copies, cache", ("copy_", "index", "slice", "to", "contiguous", "empty", "zeros", "clone")),
)


def group(name: str) -> str:
    for label, fragments in GROUPS:
        if any(f in name for f in fragments):
            return label
    return "other operators"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--attn", default="auto", help="model.attn_implementation")
    args = parser.parse_args(argv)
    gen = Generator(
        progress=False,
        dtype=args.dtype,
        attn_implementation=args.attn,
        runner={"batch_size": args.batch_size},
    )
    chats = [[{"role": "user", "content": t}] for t in make_prompts(args.prompts)]
    sampling = {"max_new_tokens": args.max_new_tokens, "ignore_eos": True}
    gen.chat(chats, sampling)  # warm-up
    started = time.perf_counter()
    gen.chat(chats, {**sampling, "max_new_tokens": 1})  # the prefill, and one token
    prefill = time.perf_counter() - started
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        out = gen.chat(chats, sampling)
        wall = time.perf_counter() - started
    tokens = sum(c.completion_tokens for c in out)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            totals[group(event.key)] += event.self_cpu_time_total / 1e6
    ops = sum(totals.values())
    print(
        f"{args.dtype}, attention {args.attn}, {args.prompts} prompts x "
        f"{args.max_new_tokens} tokens, threads {torch.get_num_threads()}: "
        f"{tokens / wall:.1f} tok/s, wall {wall:.1f} s"
    )
    print("| where | seconds | share of wall |\n| --- | ---: | ---: |")
    for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {seconds:.2f} | {seconds / wall:.0%} |")
    rest = max(wall - ops, 0.0)
    print(f"| outside operators (Python, generate's loop) | {rest:.2f} | {rest / wall:.0%} |")
    print(
        f"| of the wall: prefill and the first token (timed apart) | {prefill:.2f} | "
        f"{prefill / wall:.0%} |"
    )
    print()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
