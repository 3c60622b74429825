"""``batchgen export --format openai_batch``: real runs of a tiny model, read back as the
Batch API's output lines and checked with the ``openai`` package's own types."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from openai.types import BatchError
from openai.types.chat import ChatCompletion

import batchgen
from batchgen.cluster.claims import ClaimStore
from batchgen.store import checkpoints
from batchgen.tools import export

ENVELOPE = {"id", "custom_id", "response", "error"}


def job(model, data, out, *extra):
    return [
        f"model.name_or_path={model}",
        f"dataset.path={data}",
        f"output.dir={out}",
        "runner.progress=false",
        "runner.batch_size=4",
        "sampling.max_new_tokens=5",
        *extra,
    ]


@pytest.fixture(scope="module")
def run_dir(tiny_models, tmp_path_factory):
    """A finished run: 7 prompts in 3 shards, 2 samples each; row-3's empty prompt skipped."""
    root = tmp_path_factory.mktemp("export")
    data = root / "prompts.jsonl"
    texts = ["hello there", "one two three", "a", "", "the fox jumps", "why?", "last one"]
    data.write_text(
        "".join(json.dumps({"uid": f"row-{i}", "prompt": t}) + "\n" for i, t in enumerate(texts))
    )
    out = root / "out"
    batchgen.run(
        job(
            tiny_models["chat"],
            data,
            out,
            "dataset=local",
            "dataset.id_column=uid",
            "output.rows_per_shard=3",
            "runner.on_bad_row=skip",
            "sampling.do_sample=true",
            "sampling.num_return_sequences=2",
        )
    )
    return out


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_line(line, model):
    """One output line, checked field by field; the completion with openai's ChatCompletion."""
    assert set(line) == ENVELOPE
    assert line["id"].startswith("batch_req_")
    if line["response"] is None:
        BatchError.model_validate(line["error"])
        return None
    assert line["error"] is None
    response = line["response"]
    assert response["status_code"] == 200 and response["request_id"].startswith("req_")
    completion = ChatCompletion.model_validate(response["body"])
    assert completion.model == model and completion.object == "chat.completion"
    return completion


def test_every_line_is_a_batch_api_output_line(run_dir, tiny_models, tmp_path):
    target = tmp_path / "batch_output.jsonl"
    assert export.main([str(run_dir), "--format", "openai_batch", "-o", str(target)]) == 0
    lines = read_lines(target)
    # Shard order, then row order; a shard's skipped rows after its generated ones.
    order = ["row-0", "row-1", "row-2", "row-4", "row-5", "row-3", "row-6"]
    assert [line["custom_id"] for line in lines] == order
    rows = [r for f in sorted(run_dir.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    for line in lines:
        completion = check_line(line, str(tiny_models["chat"]))
        samples = [r for r in rows if r["id"] == line["custom_id"]]
        if completion is None:
            assert line["custom_id"] == "row-3" and not samples
            assert line["error"]["code"] == "skipped" and "empty" in line["error"]["message"]
            continue
        assert [c.index for c in completion.choices] == [0, 1]
        assert [c.message.content for c in completion.choices] == [s["response"] for s in samples]
        assert [c.finish_reason for c in completion.choices] == [
            s["finish_reason"] for s in samples
        ]
        usage = completion.usage
        assert usage.prompt_tokens == samples[0]["prompt_tokens"]
        assert usage.completion_tokens == sum(s["completion_tokens"] for s in samples)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert len({line["id"] for line in lines}) == len(lines)


def test_exporting_again_gives_the_same_bytes(run_dir, tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for target in (a, b):
        assert export.main([str(run_dir), "--format", "openai_batch", "-o", str(target)]) == 0
    assert a.read_bytes() == b.read_bytes()
    capsys.readouterr()
    assert export.main([str(run_dir), "--format", "openai_batch"]) == 0  # to stdout
    assert capsys.readouterr().out == a.read_text()


def test_reads_the_folder_once_and_each_footer_once(
    run_dir, tmp_path, monkeypatch, folder_reads, footer_parses
):
    def no_claims(*args, **kwargs):
        raise AssertionError("export read the claims: completeness is read_folder's")

    monkeypatch.setattr(ClaimStore, "describe", no_claims)
    monkeypatch.setattr(checkpoints, "finished_batches", no_claims)
    target = tmp_path / "batch_output.jsonl"
    assert export.main([str(run_dir), "--format", "openai_batch", "-o", str(target)]) == 0
    assert len(read_lines(target)) == 7 and folder_reads == [run_dir]
    assert footer_parses == {f"part-{i:05d}.parquet": 1 for i in range(3)}


def test_an_unfinished_run_is_refused_unless_partial(run_dir, tmp_path, capsys):
    copy = tmp_path / "out"
    shutil.copytree(run_dir, copy)
    (copy / "part-00001.parquet").unlink()
    target = tmp_path / "partial.jsonl"
    assert export.main([str(copy), "--format", "openai_batch", "-o", str(target)]) == 1
    assert "2/3 shards done" in capsys.readouterr().err and not target.exists()
    argv = [str(copy), "--format", "openai_batch", "-o", str(target), "--partial"]
    assert export.main(argv) == 0
    assert [line["custom_id"] for line in read_lines(target)] == [
        "row-0",
        "row-1",
        "row-2",
        "row-6",
    ]


def test_a_folder_without_a_run_is_refused(tmp_path, capsys):
    assert export.main([str(tmp_path), "--format", "openai_batch"]) == 2
    assert "run.json" in capsys.readouterr().err


def test_the_batchgen_command_runs_it(run_dir, tmp_path):
    for command in (["-m", "batchgen", "export"], ["-m", "batchgen.tools.export"]):
        done = subprocess.run(
            [sys.executable, *command, str(run_dir), "--format", "openai_batch"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert len(done.stdout.splitlines()) == 7


def test_a_request_file_round_trips(tiny_models, tmp_path, monkeypatch):
    """Batch API requests in, Batch API output out: every custom_id once, with n choices,
    each request's own max_tokens kept."""
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path / "cache"))  # the converted requests
    requests = tmp_path / "requests.jsonl"
    bodies = [
        {"max_tokens": 3},
        {"max_completion_tokens": 2, "temperature": 0.5, "top_p": 0.9},
        {"stop": ["\n"], "seed": 5},
        {"response_format": {"type": "json_object"}},
    ]
    with requests.open("w") as f:
        for i, extra in enumerate(bodies):
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Hi {i}"}]}
            body |= {"n": 2, **extra}
            request = {"custom_id": f"task-{i}", "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**request, "body": body}) + "\n")
    out = tmp_path / "out"
    overrides = ["dataset=openai_batch", "sampling.num_return_sequences=2"]
    batchgen.run(job(tiny_models["chat"], requests, out, *overrides, "sampling.do_sample=true"))
    target = tmp_path / "batch_output.jsonl"
    assert export.main([str(out), "--format", "openai_batch", "-o", str(target)]) == 0
    lines = read_lines(target)
    assert [line["custom_id"] for line in lines] == [f"task-{i}" for i in range(4)]
    completions = [check_line(line, str(tiny_models["chat"])) for line in lines]
    assert all(len(c.choices) == 2 for c in completions)
    assert completions[0].usage.completion_tokens <= 2 * 3
    assert completions[1].usage.completion_tokens <= 2 * 2
