"""vLLM beside batchgen's static engine, side by side in one run, in both dtypes.

For each dtype, three methods run the same work, each in a fresh process of the vLLM
environment (``make vllm-env``): the same chat prompts rendered and tokenized once by batchgen,
greedy, exactly ``--max-new-tokens`` each (``ignore_eos``):

- ``batchgen static``: ``Generator(runner={"engine": "static"})`` (batch size auto), in the
  project's own environment (``.venv``: its transformers, no vLLM, no preloaded OpenMP);
- ``batchgen + vllm``: ``Generator(runner={"engine": "vllm"})``: batchgen's records, seeds and
  decoding around vLLM;
- ``vllm direct``: ``vllm.LLM.generate`` on the same token ids, one call, vLLM built with the
  same settings as batchgen builds it (``vllm_engine.llm_options``, in this process).

Reported: generation tokens/s (the generate call alone), start-up to the engine being ready,
and the ratios that matter: batchgen+vLLM against vLLM direct (its overhead), and the static
engine against vLLM. It runs in the vLLM environment: ``make bench`` runs it after
``scripts/bench.py`` where ``.venv-vllm`` exists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ("batchgen static", "batchgen + vllm", "vllm direct")
RESULT = "bench-result: "  # the line a method's process reports on (vLLM prints its own too)
DTYPES = ("float32", "bfloat16")


def measure(method: str, dtype: str, prompts: int, new_tokens: int) -> dict:
    """One method in this process: start-up, then one timed generation over every prompt."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench import make_prompts

    from batchgen import Generator

    texts = make_prompts(prompts)
    chats = [[{"role": "user", "content": t}] for t in texts]
    sampling = {"max_new_tokens": new_tokens, "ignore_eos": True}
    started = time.perf_counter()
    if method == "vllm direct":
        from batchgen.composition import compose_job
        from batchgen.config import RunnerConfig
        from batchgen.engine import vllm_engine
        from batchgen.inputs import models

        vllm = vllm_engine.import_vllm()  # in this process, as batchgen runs it
        from vllm.inputs import TokensPrompt

        settings = compose_job([]).model  # the embedded model, as batchgen converts it
        source = models.convert_gguf(models.resolve_source(settings))
        config, tok = models.load_config_and_tokenizer(source, settings)
        context = models.context_length(config, tok, settings)  # batchgen's max_model_len
        ids = [
            tok(
                tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False,
            )["input_ids"]
            for c in chats
        ]
        started = time.perf_counter()
        options = vllm_engine.llm_options(source.location, dtype, "cpu", context, RunnerConfig())
        llm = vllm.LLM(**options)  # the same engine settings as batchgen's
        ready = time.perf_counter() - started
        # Token ids out, as batchgen asks for them: vLLM's own detokenizing would be its cost.
        params = vllm.SamplingParams(
            temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False
        )
        prompts_in = [TokensPrompt(prompt_token_ids=p) for p in ids]
        llm.generate(prompts_in[:2], vllm.SamplingParams(max_tokens=2), use_tqdm=False)  # warm
        began = time.perf_counter()
        outs = llm.generate(prompts_in, params, use_tqdm=False)
        seconds = time.perf_counter() - began
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return {"ready_seconds": ready, "seconds": seconds, "tokens": tokens}
    engine = "vllm" if method == "batchgen + vllm" else "static"
    gen = Generator(progress=False, dtype=dtype, runner={"engine": engine})
    gen.chat(chats[:2], {"max_new_tokens": 2})  # warm-up, and vLLM's start-up
    ready = time.perf_counter() - started
    began = time.perf_counter()
    out = gen.chat(chats, sampling)
    seconds = time.perf_counter() - began
    tokens = sum(c.completion_tokens for c in out)
    return {"ready_seconds": ready, "seconds": seconds, "tokens": tokens}


def run_all(args) -> list[dict]:
    """Every (dtype, method) in a process of its own, in turn."""
    results = []
    for dtype in DTYPES:
        for method in args.methods:
            python, env = sys.executable, dict(os.environ)
            if method == "batchgen static":
                python = str(REPO / ".venv" / "bin" / "python")
                env.pop("LD_PRELOAD", None)
            cmd = [python, __file__, "--one", method, "--dtype", dtype]
            cmd += ["--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"{method} ({dtype}) failed:\n{done.stderr[-3000:]}")
            line = next(x for x in done.stdout.splitlines() if x.startswith(RESULT))
            result = json.loads(line.removeprefix(RESULT))
            result.update(method=method, dtype=dtype)
            result["tokens_per_second"] = result["tokens"] / result["seconds"]
            print(
                f"  {dtype:<9} {method:<16} {result['tokens']:>6} tok "
                f"{result['seconds']:7.1f} s {result['tokens_per_second']:8.1f} tok/s "
                f"(ready in {result['ready_seconds']:.1f} s)",
                flush=True,
            )
            results.append(result)
    return results


def table(results: list[dict]) -> str:
    """The markdown table with the ratios, per dtype."""
    by = {(r["dtype"], r["method"]): r for r in results}
    lines = [
        "| dtype | method | generation tok/s | ready after | vs vllm direct |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for dtype in DTYPES:
        direct = by[(dtype, "vllm direct")]["tokens_per_second"]
        for method in METHODS:
            if (dtype, method) not in by:
                continue
            r = by[(dtype, method)]
            lines.append(
                f"| {dtype} | {method} | {r['tokens_per_second']:.1f} | "
                f"{r['ready_seconds']:.1f} s | {r['tokens_per_second'] / direct:.2f}x |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=DTYPES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(RESULT + json.dumps(measure(args.one, args.dtype, args.prompts, args.max_new_tokens)))
        return 0
    print(f"vllm bench: {args.prompts} prompts x {args.max_new_tokens} new tokens", flush=True)
    print(table(run_all(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
