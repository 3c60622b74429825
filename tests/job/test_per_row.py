"""Rows with their own settings in a job, as an OpenAI Batch file mixes them: each row's own
``n`` and ``max_tokens`` are generated, checkpointed, resumed and verified as that row's."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

import batchgen
from batchgen.engine.static import StaticEngine
from batchgen.store import checkpoints, layout
from batchgen.tools import export, finalize


class Crash(Exception):
    """A run dying between two batches."""


def request(custom_id, **body):
    messages = [{"role": "user", "content": f"Say {custom_id}."}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": messages, **body},
    }


def requests_file(path, requests):
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    return path


def job(model, requests, out, *extra):
    return [
        f"model.name_or_path={model}",
        "dataset=openai_batch",
        f"dataset.path={requests}",
        f"output.dir={out}",
        "runner.progress=false",
        "model.dtype=float32",  # bf16 sums depend on the batch shape; fp32's tolerate it here
        *extra,
    ]


def rows(out):
    return [r for f in sorted(out.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def batch_sizes(monkeypatch):
    """The number of rows of each batch the static engine generates."""
    sizes = []
    generate = StaticEngine.generate

    def spy(self, records, seed, sampling):
        sizes.append(len(records))
        return generate(self, records, seed, sampling)

    monkeypatch.setattr(StaticEngine, "generate", spy)
    return sizes


def test_ten_requests_with_ten_token_limits_run_in_one_batch(
    tiny_models, tmp_path, batch_sizes, capsys
):
    """Requests that differ only in ``max_tokens`` (and seed) share a batch, each stopping at
    its own limit with what it gets alone; the banner says the settings are the requests'."""
    limits = {f"q{i}": i + 1 for i in range(10)}
    path = requests_file(
        tmp_path / "requests.jsonl",
        [request(q, max_tokens=n, seed=n) for q, n in limits.items()],
    )
    out, alone = tmp_path / "out", tmp_path / "alone"
    batchgen.run(job(tiny_models["chat"], path, out, "runner.batch_size=16"))
    assert batch_sizes == [10]
    banner = capsys.readouterr().out
    assert "batchgen: sampling settings from each request's body" in banner
    assert "batchgen: greedy" not in banner
    got = rows(out)
    assert sorted(r["id"] for r in got) == sorted(limits)
    for r in got:
        assert r["completion_tokens"] <= limits[r["id"]]
        assert r["finish_reason"] == "stop" or r["completion_tokens"] == limits[r["id"]]
    batch_sizes.clear()
    batchgen.run(job(tiny_models["chat"], path, alone, "runner.batch_size=1"))
    assert batch_sizes == [1] * 10
    assert rows(alone) == got


def test_requests_with_their_own_n_checkpoint_resume_and_verify(tiny_models, tmp_path, monkeypatch):
    """Mixed ``n``: each request gets its own number of samples; a run that dies after two
    batches resumes from checkpoints holding each row's own count, the finished shard passes
    verification on resume and at finalize, the rows are those of an uninterrupted run, and the
    export gives each request its own ``choices``."""
    counts = {"a": 1, "b": 3, "c": 2, "d": 1}
    path = requests_file(
        tmp_path / "requests.jsonl",
        [request("a"), request("b", n=3), request("c", n=2, max_tokens=3), request("d", n=1)],
    )

    def run(out):
        return batchgen.run(
            job(tiny_models["chat"], path, out, "runner.batch_size=1", "sampling.max_new_tokens=4")
        )

    reference = tmp_path / "reference"
    run(reference)
    want = rows(reference)
    assert [(r["id"], r["sample_index"]) for r in want] == [
        (q, k) for q, n in counts.items() for k in range(n)
    ]

    save = checkpoints.save

    def save_two_then_die(out_dir, shard, identity, batch):
        save(out_dir, shard, identity, batch)
        if len(list(layout.checkpoint_dir(out_dir, shard).glob("*.ckpt"))) == 2:
            raise Crash

    out = tmp_path / "out"
    monkeypatch.setattr(checkpoints, "save", save_two_then_die)
    with pytest.raises(Crash):
        run(out)
    monkeypatch.setattr(checkpoints, "save", save)
    loaded = []
    load = checkpoints.load
    monkeypatch.setattr(checkpoints, "load", lambda *a: loaded.append(load(*a)) or loaded[-1])
    run(out)
    (kept,) = loaded
    assert len(kept) == 2
    assert {i: len(s) for i, s in kept.items()} == {i: list(counts.values())[i] for i in kept}
    assert rows(out) == want
    assert run(out).shards_resumed == 1  # verified by each row's own count, not redone
    assert finalize.check(out)[1] == []
    target = tmp_path / "batch_output.jsonl"
    assert export.main([str(out), "--format", "openai_batch", "-o", str(target)]) == 0
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    choices = {x["custom_id"]: x["response"]["body"]["choices"] for x in lines}
    assert {q: [c["index"] for c in cs] for q, cs in choices.items()} == {
        q: list(range(n)) for q, n in counts.items()
    }
