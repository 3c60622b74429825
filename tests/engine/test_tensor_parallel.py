"""Tensor parallel (``model.tp_size``) on the CPU, for real: a group of two processes joined
over gloo, the model split by transformers' own plan. Its output equals one process's, greedy
and sampled, for a tiny Llama (tied embeddings) and a tiny Qwen2 (untied, biased projections);
what it cannot split or combine with is refused before any weights load; a follower that dies
is named, no row is recorded as failed for it, and the folder resumes; Ctrl-C stops the whole
group; two groups run as two data-parallel workers of one command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from job_cli import ENV, command, finish, rows
from tiny import tiny_lm

from batchgen import Generator, run
from batchgen.config import ModelConfig, RunnerConfig
from batchgen.config_checks import validate
from batchgen.engine import tensor_parallel
from batchgen.errors import ConfigError, ModelError, ResumeError
from batchgen.store import layout

# Every process these tests start inherits it: their followers are told apart by it.
MARK = f"BATCHGEN_TEST_PROCESS={os.getpid()}"
os.environ["BATCHGEN_TEST_PROCESS"] = str(os.getpid())


@pytest.fixture(scope="module")
def qwen2(tiny_models, tmp_path_factory) -> Path:
    """A tiny Qwen2 (biased attention projections, untied embeddings), ChatML tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_models["chat"])
    model = tiny_lm(Qwen2ForCausalLM, Qwen2Config, tok, seed=1, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("qwen2") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def responses(out: Path) -> list[tuple]:
    return [(r["id"], r["sample_index"], r["response"], r["finish_reason"]) for r in rows(out)]


def followers_running() -> bool:
    """Whether a follower that this test process started (itself, or through a pool's worker:
    an orphan too) still runs; other processes on the machine may run groups of their own."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes()
            ours = MARK.encode() in (proc / "environ").read_bytes()
        except (OSError, ValueError):
            continue  # not a process, or one that has just ended
        if b"batchgen.engine.tp_follower" in args and ours:
            return True
    return False


@pytest.mark.parametrize("name", ["chat", "qwen2"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_two_processes_generate_what_one_does(
    name, sampled, tiny_models, qwen2, prompts_file, make_job, tmp_path, capfd
):
    model = qwen2 if name == "qwen2" else tiny_models["chat"]
    outs = {}
    for tp in (1, 2):
        cfg = make_job(model, prompts_file, tmp_path / f"tp{tp}", model__dtype="float32")
        cfg.model = replace(cfg.model, tp_size=tp)
        cfg.runner = replace(cfg.runner, devices=tp)
        n = 2 if sampled else 1
        sampling = dict(do_sample=sampled, temperature=1.0, top_p=0.9, num_return_sequences=n)
        cfg.sampling = replace(cfg.sampling, **sampling)
        summary = run(cfg)
        assert summary.complete and summary.totals.rows == 12
        outs[tp] = responses(tmp_path / f"tp{tp}")
    said = capfd.readouterr().out
    assert said.count("tensor parallel over cpu x2, static engine") == 1, said
    assert outs[2] == outs[1] and len(outs[1]) == 12 * n
    assert len({r[2] for r in outs[1]}) > 6  # a model's varied text, not one answer repeated
    # The group is gone: this process left it, and its follower exited.
    assert not torch.distributed.is_initialized() and not followers_running()


def test_two_groups_are_two_workers_of_one_command(
    tiny_models, prompts_file, make_job, tmp_path, capfd
):
    outs = {}
    for devices, tp in ((1, 1), (4, 2)):
        cfg = make_job(tiny_models["chat"], prompts_file, tmp_path / f"d{devices}")
        cfg.model = replace(cfg.model, dtype="float32", tp_size=tp)
        cfg.runner = replace(cfg.runner, devices=devices)
        job = run(cfg)
        outs[devices] = responses(tmp_path / f"d{devices}")
    said = capfd.readouterr().out
    assert "batchgen: 2 workers on the CPU, each a tensor-parallel group of 2 processes" in said
    assert outs[4] == outs[1]
    assert [(w["devices"], w["ended"]) for w in job.workers] == [("cpu x2", "finished")] * 2
    assert not followers_running()


def test_a_model_the_group_cannot_split_is_refused_before_it_loads(tiny_models):
    from transformers import LlamaConfig, T5Config

    odd = LlamaConfig(num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    with pytest.raises(ConfigError, match=r"num_key_value_heads=3 cannot be split in 2 equal"):
        tensor_parallel.check_model(odd, 2)
    tensor_parallel.check_model(odd, 3)
    with pytest.raises(ConfigError, match="no tensor-parallel plan for T5Config"):
        tensor_parallel.check_model(T5Config(), 2)
    # Through the library: refused with its config, before a process starts or weights load.
    with pytest.raises(ConfigError, match="no tensor-parallel plan"):
        Generator(str(tiny_models["t5"]), tp_size=2)
    assert not followers_running()


@pytest.mark.parametrize(
    "model, runner, culprit",
    [
        (ModelConfig(tp_size=0), RunnerConfig(), "model.tp_size: must be 1 or more"),
        (ModelConfig(tp_size=2, device_map="auto"), RunnerConfig(), "model.device_map"),
        (ModelConfig(tp_size=2, quantization="int8"), RunnerConfig(), "model.quantization"),
        (ModelConfig(tp_size=2, adapter="some/lora"), RunnerConfig(), "model.adapter"),
        (ModelConfig(tp_size=2, device="cuda:1"), RunnerConfig(), "model.device=cuda:1"),
        (ModelConfig(tp_size=2), RunnerConfig(engine="vllm"), "runner.engine=vllm"),
        (ModelConfig(tp_size=2), RunnerConfig(engine="continuous"), "runner.engine=continuous"),
        (ModelConfig(tp_size=2), RunnerConfig(compile=True), "runner.compile"),
        (ModelConfig(tp_size=2), RunnerConfig(devices=3), "runner.devices: 3 must be a multiple"),
    ],
)
def test_what_tensor_parallel_cannot_combine_with_is_refused(model, runner, culprit, make_job):
    cfg = make_job(Path("m"), Path("d.jsonl"), Path("out"))
    cfg.model, cfg.runner = model, runner
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        validate(cfg)


def test_resuming_under_another_tp_size_is_refused(tiny_models, prompts_file, make_job, tmp_path):
    cfg = make_job(tiny_models["chat"], prompts_file, tmp_path / "out", model__dtype="float32")
    cfg.dataset.limit = 5
    run(cfg)
    cfg.model = replace(cfg.model, tp_size=2)
    cfg.runner = replace(cfg.runner, devices=2)
    with pytest.raises(ResumeError, match="tp_size"):
        run(cfg)
    assert not followers_running()


def test_the_library_leads_a_group_and_closes_it(tiny_models):
    one = Generator(str(tiny_models["chat"]), dtype="float32", progress=False)
    two = Generator(str(tiny_models["chat"]), dtype="float32", tp_size=2, progress=False)
    prompts = ["hello there", "one two three four", "x"]
    expected = [c.response for c in one.generate(prompts, {"max_new_tokens": 6})]
    assert [c.response for c in two.generate(prompts, {"max_new_tokens": 6})] == expected
    followers = two.session.model.group.followers
    two.close()
    assert [p.returncode for p in followers] == [0]
    assert not torch.distributed.is_initialized()


# Long enough to act on while the group generates: 8 shards of 64 tokens a row.
SETTINGS = [
    "dataset.id_column=uid",
    "model.tp_size=2",
    "model.dtype=float32",
    "sampling.max_new_tokens=64",
    "output.rows_per_shard=2",
    "runner.batch_size=2",
    "runner.progress=false",
]


def cli(model: Path, data: Path, out: Path) -> list[str]:
    return command(model, data, out, *SETTINGS)


def follower_of(proc: subprocess.Popen) -> int:
    """The pid of the follower that ``proc`` (the leader) started, once it has."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        started = children.read_text().split()
        if started:
            return int(started[0])
        time.sleep(0.05)
    raise AssertionError("the leader started no follower")


def wait_for_rows(out: Path, proc: subprocess.Popen) -> None:
    """Until the group has finished some rows (a checkpoint or a shard)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if any(layout.checkpoints_dir(out).glob("*")) or any(out.glob("part-*.parquet")):
            return
        time.sleep(0.02)
    raise AssertionError(f"no rows before the job ended (exit {proc.poll()})")


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tp") / "prompts.jsonl"
    lines = [{"uid": f"u{i}", "prompt": f"tell me {i} " + "more " * (i % 5)} for i in range(16)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_a_dead_follower_is_named_and_the_folder_resumes(tiny_models, long_data, tmp_path):
    out = tmp_path / "out"
    command = cli(tiny_models["chat"], long_data, out)
    proc = start(command)
    victim = follower_of(proc)
    wait_for_rows(out, proc)
    os.kill(victim, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    error = [x for x in stderr.splitlines() if x.startswith("batchgen: error:")]
    assert error == [
        f"batchgen: error: tensor-parallel rank 1 of 2 (cpu, pid {victim}) ended (killed by "
        "SIGKILL); this worker stops, as its model cannot run without it: finished rows are "
        "kept, and the same command resumes"
    ], stderr
    assert "recorded as failed" not in stderr and "Traceback" not in stderr
    done = finish(command)
    assert done.returncode == 0, done.stderr
    assert "0 failed (8/8 shards complete)" in done.stdout
    reference = tmp_path / "reference"
    again = finish(cli(tiny_models["chat"], long_data, reference))
    assert again.returncode == 0, again.stderr
    assert responses(out) == responses(reference)


def test_ctrl_c_stops_the_whole_group(tiny_models, long_data, tmp_path):
    out = tmp_path / "out"
    proc = start(cli(tiny_models["chat"], long_data, out))
    follower = follower_of(proc)
    wait_for_rows(out, proc)
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the leader
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "batchgen: stopped by SIGINT" in stderr and "Traceback" not in stderr
    deadline = time.monotonic() + 10
    while Path(f"/proc/{follower}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{follower}").exists()


def test_a_follower_that_dies_before_the_group_forms_is_named(tmp_path):
    # Last in this file: the leader's own attempt to join stays blocked in its thread.
    from batchgen.engine.tp_leader import Group, _free_port

    spec = tensor_parallel.Spec(2, ("cpu", "cpu"), 1)
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], stdin=subprocess.PIPE)
    group = Group(spec, [dead], None)
    started = time.monotonic()
    with pytest.raises(ModelError) as refused:
        group._join(_free_port())
    assert str(refused.value) == (
        f"model.tp_size=2: tensor-parallel rank 1 of 2 (cpu, pid {dead.pid}) ended (exit 3) "
        "before the group formed"
    )
    assert time.monotonic() - started < 30 and group.ended
