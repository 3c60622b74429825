"""Batch checkpoints: a stop keeps finished batches; the resume reuses them exactly."""

from __future__ import annotations

import json
import os
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from batchgen import run
from batchgen.cluster import checkpoints
from batchgen.engine.static import Engine, Sample
from batchgen.errors import Stopped
from batchgen.store import layout

IDENTITY = {"fingerprint": "fp", "digest": "d1"}


def test_saved_batches_come_back_only_under_the_same_identity(tmp_path):
    batch = [(5, [Sample("a", "stop", 1), Sample("b", "length", 4)]), (7, [Sample("c", "stop", 2)])]
    checkpoints.save(tmp_path, 3, IDENTITY, batch)
    checkpoints.save(tmp_path, 3, IDENTITY, [(9, [Sample("d", "stop", 1), Sample("e", "stop", 1)])])
    found = checkpoints.load(tmp_path, 3, IDENTITY, samples=2)
    assert found == {5: batch[0][1], 9: [Sample("d", "stop", 1), Sample("e", "stop", 1)]}
    assert checkpoints.load(tmp_path, 3, {**IDENTITY, "digest": "changed rows"}, 2) == {}
    assert checkpoints.load(tmp_path, 4, IDENTITY, 2) == {}
    folder = layout.checkpoint_dir(tmp_path, 3)
    assert folder.relative_to(tmp_path).parts[:2] == ("_batchgen", "checkpoints")
    next(folder.glob("rows-*.ckpt")).write_bytes(b"damaged")
    assert len(checkpoints.load(tmp_path, 3, IDENTITY, 2)) == 1  # the damaged file is redone
    checkpoints.clear(tmp_path, 3)
    assert not folder.exists()


def test_logprobs_round_trip_and_older_files_load_without(tmp_path):
    values = torch.tensor([-0.1, -2.3, -0.0]).tolist()  # float32, as the engine records them
    top = [[(11, values[0]), (4, -3.5)], [(7, values[1]), (11, -2.75)], [(2, 0.0), (9, -30.0)]]
    scored = Sample("abc", "stop", 3, values, top)
    batch = [(0, [scored, Sample("x", "length", 1, [-1.5])]), (1, [Sample("y", "stop", 1)] * 2)]
    checkpoints.save(tmp_path, 0, IDENTITY, batch)
    assert checkpoints.load(tmp_path, 0, IDENTITY, samples=2) == dict(batch)

    # A file from before the log-probability columns: its samples come back without them.
    old = pa.schema([f for f in checkpoints.SCHEMA if "logprobs" not in f.name])
    row = {"index": 2, "sample_index": 0, "text": "z", "finish_reason": "stop"}
    table = pa.Table.from_pylist([{**row, "completion_tokens": 1}], schema=old)
    table = table.replace_schema_metadata({checkpoints.META_KEY: json.dumps(IDENTITY).encode()})
    pq.write_table(table, layout.checkpoint_dir(tmp_path, 0) / "rows-000000002-old.ckpt")
    assert checkpoints.load(tmp_path, 0, IDENTITY, samples=1)[2] == [Sample("z", "stop", 1)]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "rows.jsonl"
    with path.open("w") as f:
        for i in range(200):
            f.write(json.dumps({"uid": f"r{i}", "prompt": f"question {i} " + "why " * (i % 5)}))
            f.write("\n")
    return path


@pytest.fixture
def calls(monkeypatch):
    """Rows per call of the engine; ``calls.stop_after = N`` sends SIGINT in the Nth call."""
    seen = []
    real = Engine.generate

    def counting(self, batch, seed, sampling=None):
        seen.append(len(batch))
        outs = real(self, batch, seed, sampling)
        if len(seen) == getattr(calls, "stop_after", None):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while this batch is generated
        return outs

    monkeypatch.setattr(Engine, "generate", counting)
    calls.seen = seen
    return calls


def rows(out):
    return [r for f in sorted(out.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_ctrl_c_at_sixty_percent_of_a_shard_loses_at_most_one_batch(
    tiny_models, data, make_job, tmp_path, calls
):
    settings = {
        "sampling__do_sample": True,
        "sampling__max_new_tokens": 6,
        "output__rows_per_shard": 200,
        "runner__batch_size": 8,
    }
    full = tmp_path / "full"
    run(make_job(tiny_models["chat"], data, full, **settings))
    reference = rows(full)
    assert len(calls.seen) == 25  # 200 rows in batches of 8

    out = tmp_path / "out"
    calls.seen.clear()
    calls.stop_after = 15
    with pytest.raises(Stopped) as stopped:
        run(make_job(tiny_models["chat"], data, out, **settings))
    assert stopped.value.exit_code == 130
    kept = sum(calls.seen)
    assert kept == 120 and f"{kept} finished rows of the shard in progress kept" in str(
        stopped.value
    )
    assert not list(out.glob("part-*.parquet"))

    calls.seen.clear()
    calls.stop_after = None
    run(make_job(tiny_models["chat"], data, out, **settings))
    assert sum(calls.seen) == 200 - kept  # nothing generated twice
    assert rows(out) == reference
    assert not (out / "_batchgen" / "checkpoints").exists()


def test_changed_rows_do_not_reuse_checkpoints(tiny_models, data, make_job, tmp_path, calls):
    settings = {"sampling__max_new_tokens": 4, "output__rows_per_shard": 200}
    out = tmp_path / "out"
    calls.stop_after = 3
    with pytest.raises(Stopped):
        run(make_job(tiny_models["chat"], data, out, **settings))
    lines = data.read_text().splitlines()
    lines[3] = json.dumps({"uid": "r3", "prompt": "a question that was edited"})
    data.write_text("\n".join(lines) + "\n")
    calls.seen.clear()
    calls.stop_after = None
    run(make_job(tiny_models["chat"], data, out, **settings))
    assert sum(calls.seen) == 200
    assert rows(out)[3]["prompt"].endswith(
        "a question that was edited<|im_end|>\n<|im_start|>assistant\n"
    )
