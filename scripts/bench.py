"""Throughput benchmark: batchgen's engines against transformers' pipeline, side by side in one run.

Every method runs on the same model, prompts and token budget, after a warm-up, and is reported
as output tokens/s, padding waste, peak memory and the ratio to the baseline (the textbook
``pipeline("text-generation")`` called one prompt at a time).

    python scripts/bench.py                      # CPU default: embedded SmolLM2, 64 chat prompts
    python scripts/bench.py --fixed-length       # exactly N new tokens per prompt
    python scripts/bench.py --gpu                # GPU: Qwen2.5-0.5B architecture, random bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

from batchgen import Generator
from batchgen.config import ModelConfig, RunnerConfig
from batchgen.inputs import models
from batchgen.store.manifest import versions

REPO = Path(__file__).resolve().parent.parent
# Context sentences, drawn in a different order for each prompt: long prompts differ from their
# first words on, so the only prefix all prompts share is the chat template's header.
CONTEXT = [
    "The committee reviewed the quarterly figures and asked for a short written answer by Friday.",
    "Supplier contracts in three regions were renegotiated after the shipping costs doubled.",
    "Customer feedback from the spring survey mentioned slow delivery and unclear invoices.",
    "A pilot project in the northern warehouse cut picking errors by a fifth over six weeks.",
    "The finance team flagged two duplicate payments and a missing credit note in March.",
    "Hiring for the support desk stalled while the new training programme was being written.",
    "Energy prices fell in the second half, but the heating contract still runs until next year.",
    "Two competitors launched cheaper subscription plans aimed at small independent shops.",
    "The board wants a plan for the website outage that cost a full day of online orders.",
    "Returns rose after the packaging change, mostly for fragile items shipped abroad.",
    "An audit found that laptops in the sales office had not received security updates.",
    "The marketing budget moved from printed catalogues to short videos and search ads.",
    "Staff asked for clearer rules on remote work after the office lease was shortened.",
    "A key customer in the food sector asked for carbon figures for every delivery route.",
    "The legacy stock system will be switched off once the inventory data has been migrated.",
    "Several suppliers now require payment within fifteen days instead of the usual thirty.",
]


def make_prompts(n: int) -> list[str]:
    """``n`` chat prompts from a few words to several hundred tokens, deterministic."""
    sample = [
        json.loads(line)["prompt"]
        for line in (REPO / "batchgen/conf/dataset/sample_prompts.jsonl").read_text().splitlines()
    ]
    prompts = []
    for i in range(n):
        # 0 to 30 context sentences (~18 tokens each), drawn anew per prompt, then a question.
        context = random.Random(i).choices(CONTEXT, k=2 * ((i * 7) % 16))
        prompts.append(" ".join([*context, sample[i % len(sample)]]))
    return prompts


def peak_rss_reset() -> None:
    """Reset the process's peak resident memory (Linux), so each method's peak is its own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> float:
    """Peak GPU memory when on CUDA, else the peak resident set size, in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load(args):
    """Model, tokenizer, prompt texts and each prompt's token count under the chat template."""
    if args.gpu:
        from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

        src = models.convert_gguf(
            models.resolve_source(ModelConfig(gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
        )
        tok = AutoTokenizer.from_pretrained(src.location)
        # Qwen2.5-0.5B-Instruct's architecture with random weights (no hub on these machines).
        config = Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().eval()
    else:
        default = Generator(progress=False)  # the command line's default model
        model, tok = default.model, default.tokenizer
    tok.padding_side = "left"
    texts = make_prompts(args.prompts)
    lengths = [
        len(tok.apply_chat_template(chat(t), add_generation_prompt=True)["input_ids"])
        for t in texts
    ]
    return model, tok, texts, lengths


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def run_pipeline(model, tok, texts, args, batch_size):
    """transformers.pipeline over chat messages; returns (outputs, prompt pads, cache pads)."""
    from transformers import pipeline

    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    chats = [chat(t) for t in texts]
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "return_full_text": False}
    if args.fixed_length:
        kwargs["min_new_tokens"] = args.max_new_tokens
    if batch_size == 1:
        outs = [pipe(c, **kwargs)[0]["generated_text"] for c in chats]
    else:
        outs = [o[0]["generated_text"] for o in pipe(chats, batch_size=batch_size, **kwargs)]
    lengths = [
        len(tok.apply_chat_template(c, add_generation_prompt=True)["input_ids"]) for c in chats
    ]
    pads = sum(
        max(chunk) * len(chunk) - sum(chunk)
        for chunk in (lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size))
    )
    # The pipeline prefills the padded batch: its cache holds exactly the pads it computed.
    return [o if isinstance(o, str) else o[-1]["content"] for o in outs], pads, pads


def run_batchgen(model, tok, texts, args, engine_name, batch_size, budget, schema=None):
    """batchgen's Python API with one engine, under ``schema`` (JSON schema text) when given;
    returns (outputs, prompt pads, cache pads)."""
    runner = RunnerConfig(
        batch_size=batch_size,
        max_batch_tokens=budget,
        engine=engine_name,
        prefill_tokens=args.prefill_tokens,
    )
    gen = Generator(model, tokenizer=tok, runner=runner, progress=False)
    sampling = {"max_new_tokens": args.max_new_tokens, "ignore_eos": args.fixed_length}
    if schema is not None:
        sampling["json_schema"] = schema
    outputs = [c.response for c in gen.chat([chat(t) for t in texts], sampling)]
    if batch_size == "auto":  # what the tuner chose, and why
        print(f"    tuned: {json.dumps(gen.stats['tuning'])}", flush=True)
    return outputs, gen.stats["padded_tokens"], gen.stats["cache_pad_slots"]


def measure(name, fn, warm, tok, prompt_tokens) -> dict:
    """Warm up on a few prompts, then time the full run."""
    warm()
    sync()
    peak_rss_reset()
    start = time.perf_counter()
    outputs, pads, cache_pads = fn()
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outputs)
    result = {
        "method": name,
        "seconds": seconds,
        "output_tokens": tokens,
        "tokens_per_second": tokens / seconds,
        "padding_waste": pads / prompt_tokens,
        "cache_padding": cache_pads / prompt_tokens,
        "peak_memory_mb": peak_memory_mb(),
        "outputs": outputs,
    }
    print(
        f"  {name:<34} {tokens:>7} tok {seconds:8.1f} s {tokens / seconds:9.1f} tok/s "
        f"pad {pads / prompt_tokens:6.1%} cache pad {result['cache_padding']:6.1%}",
        flush=True,
    )
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="Qwen2.5-0.5B architecture on CUDA")
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--fixed-length", action="store_true")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--prefill-tokens", type=int, default=RunnerConfig.prefill_tokens)
    parser.add_argument("--skip-baseline", action="store_true", help="omit the one-at-a-time run")
    parser.add_argument(
        "--json-schema",
        type=Path,
        help="also run each static method under this JSON schema (constrained decoding), "
        "next to the same method without it",
    )
    parser.add_argument("--json", type=Path, default=REPO / "docs/benchmarks.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device")
    args.prompts = args.prompts or (1024 if args.gpu else 64)
    args.max_new_tokens = args.max_new_tokens or (256 if args.gpu else 64)
    args.batch_sizes = args.batch_sizes or ([32, 64, 128, 256, 512] if args.gpu else [16, 32, 64])
    args.fixed_length = args.fixed_length or args.gpu  # a random model would rarely stop anyway

    model, tok, texts, lengths = load(args)
    prompt_tokens = sum(lengths)
    print(
        f"workload: {len(texts)} prompts, {prompt_tokens} prompt tokens "
        f"({min(lengths)}-{max(lengths)} "
        f"each), max_new_tokens={args.max_new_tokens}, fixed_length={args.fixed_length}"
    )
    few_texts = texts[:4]
    schema = args.json_schema.read_text() if args.json_schema else None
    warm_args = argparse.Namespace(**{**vars(args), "max_new_tokens": 4})
    methods = []
    if not args.skip_baseline:
        methods.append(
            (
                "pipeline, one prompt at a time",
                lambda: run_pipeline(model, tok, texts, args, 1),
                lambda: run_pipeline(model, tok, few_texts, warm_args, 1),
            )
        )
    methods.append(
        (
            "pipeline(batch_size=16)",
            lambda: run_pipeline(model, tok, texts, args, 16),
            lambda: run_pipeline(model, tok, few_texts, warm_args, 16),
        )
    )
    for b in args.batch_sizes:
        methods.append(
            (
                f"batchgen static, batch {b}",
                lambda b=b: run_batchgen(model, tok, texts, args, "static", b, None),
                lambda b=b: run_batchgen(model, tok, few_texts, warm_args, "static", b, None),
            )
        )
        if schema is not None:
            methods.append(
                (
                    f"batchgen static, batch {b}, json_schema",
                    lambda b=b: run_batchgen(model, tok, texts, args, "static", b, None, schema),
                    # The warm-up also builds the grammar library's view of the vocabulary
                    # (once per tokenizer), so the timed run measures decoding alone.
                    lambda b=b: run_batchgen(
                        model, tok, few_texts, warm_args, "static", b, None, schema
                    ),
                )
            )
    # Self-tuned: runner.batch_size=auto and runner.engine=auto, as a job runs by default.
    methods.append(
        (
            "batchgen auto",
            lambda: run_batchgen(model, tok, texts, args, "auto", "auto", None),
            lambda: run_batchgen(model, tok, few_texts, warm_args, "auto", "auto", None),
        )
    )
    methods.append(
        (
            "batchgen continuous",
            lambda: run_batchgen(model, tok, texts, args, "continuous", 1, None),
            lambda: run_batchgen(model, tok, few_texts, warm_args, "continuous", 1, None),
        )
    )
    results = [measure(name, fn, warm, tok, prompt_tokens) for name, fn, warm in methods]
    report(args, results, len(texts))
    return 0


def report(args, results, prompts: int) -> None:
    """Print the table and write JSON plus markdown with the machine and versions."""
    base = results[0]["tokens_per_second"]
    reference = results[0]["outputs"]
    same = [sum(a == b for a, b in zip(r["outputs"], reference, strict=True)) for r in results]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    machine = f"{device or platform.machine()}, {torch.get_num_threads()} threads"
    header = (
        f"{prompts} prompts, max_new_tokens={args.max_new_tokens}, "
        f"{'fixed length' if args.fixed_length else 'stop at EOS'}; {machine}"
    )
    lines = [
        f"### {'GPU' if args.gpu else 'CPU'}: {header}",
        "",
        f"Versions: {json.dumps(versions())}",
        "",
        "| method | output tok/s | x baseline | prompt padding | KV-cache padding | peak MiB "
        "| same as first |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r, eq in zip(results, same, strict=True):
        lines.append(
            f"| {r['method']} | {r['tokens_per_second']:.1f} | "
            f"{r['tokens_per_second'] / base:.2f} | {r['padding_waste']:.1%} | "
            f"{r['cache_padding']:.1%} | "
            f"{r['peak_memory_mb']:.0f} | {eq}/{len(reference)} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": machine,
        "versions": versions(),
        "results": [{k: v for k, v in r.items() if k != "outputs"} for r in results],
    }
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    old = args.markdown.read_text() if args.markdown.exists() else "# Benchmarks\n"
    args.markdown.write_text(old.rstrip() + "\n\n" + table + "\n")


if __name__ == "__main__":
    sys.exit(main())
