"""Batch checkpoints: a stop keeps finished batches; the resume reuses them exactly."""

from __future__ import annotations

import json
import os
import signal

import pyarrow.parquet as pq
import pytest
import torch

from batchgen import run
from batchgen.engine.interface import Sample
from batchgen.engine.static import StaticEngine
from batchgen.errors import Stopped
from batchgen.store import checkpoints, layout

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


def test_logprobs_round_trip(tmp_path):
    values = torch.tensor([-0.1, -2.3, -0.0]).tolist()  # float32, as the engine records them
    top = [[(11, values[0]), (4, -3.5)], [(7, values[1]), (11, -2.75)], [(2, 0.0), (9, -30.0)]]
    scored = Sample("abc", "stop", 3, values, top)
    batch = [(0, [scored, Sample("x", "length", 1, [-1.5])]), (1, [Sample("y", "stop", 1)] * 2)]
    checkpoints.save(tmp_path, 0, IDENTITY, batch)
    assert checkpoints.load(tmp_path, 0, IDENTITY, samples=2) == dict(batch)


def _saved(tmp_path, first: int, text: str):
    checkpoints.save(tmp_path, 0, IDENTITY, [(first, [Sample(text, "length", 9)])])
    return next(layout.checkpoint_dir(tmp_path, 0).glob(f"rows-{first:09d}-*.ckpt"))


def test_damaged_files_are_discarded_with_a_warning_naming_them(tmp_path, capsys):
    texts = {i: f"response number {i} " * 8 for i in range(6)}
    files = {i: _saved(tmp_path, i, t) for i, t in texts.items()}
    raw = bytearray(files[0].read_bytes())
    at = raw.find(b"response number 0")
    assert at > 0, "the text is stored uncompressed enough to find"
    raw[at + 3] ^= 0x01  # one bit inside the response's text: 'response' -> 'resqonse'
    files[0].write_bytes(raw)
    files[1].write_bytes(files[1].read_bytes()[:-40])  # cut short
    files[2].write_bytes(b"")  # an empty file after a host crash
    # A well-formed checkpoint whose rows were rewritten: its bytes no longer match its name.
    other = _saved(tmp_path / "elsewhere", 3, "not what the model wrote")
    files[3].write_bytes(other.read_bytes())
    # Written by a batchgen without checksums: nothing vouches for its rows.
    legacy = files[4].with_name("rows-000000004-0123456789ab.ckpt")
    files[4].rename(legacy)
    assert checkpoints.load(tmp_path, 0, IDENTITY, samples=1) == {
        5: [Sample(texts[5], "length", 9)]
    }
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 5
    for path in (files[0], files[1], files[2], files[3], legacy):
        name = str(path.relative_to(tmp_path))
        assert any(line.startswith(f"batchgen: checkpoint {name} is damaged (") for line in said)
        assert not path.exists()
    assert [p.name for p in layout.checkpoint_dir(tmp_path, 0).iterdir()] == [files[5].name]


def test_random_bit_flips_never_come_back_as_rows(tmp_path):
    import random

    rng = random.Random(7)
    reference = {0: [Sample("el " * 30, "length", 30, [-0.5] * 30)]}
    for trial in range(200):
        folder = tmp_path / str(trial)
        checkpoints.save(folder, 0, IDENTITY, list(reference.items()))
        path = next(layout.checkpoint_dir(folder, 0).iterdir())
        raw = bytearray(path.read_bytes())
        for _ in range(rng.choice([1, 1, 2, 8])):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        path.write_bytes(raw)
        assert checkpoints.load(folder, 0, IDENTITY, samples=1) == {}


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
    real = StaticEngine.generate

    def counting(self, batch, seed, sampling=None):
        seen.append(len(batch))
        outs = real(self, batch, seed, sampling)
        if len(seen) == getattr(calls, "stop_after", None):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while this batch is generated
        return outs

    monkeypatch.setattr(StaticEngine, "generate", counting)
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


def test_resume_over_damaged_checkpoints_publishes_a_clean_runs_rows(
    tiny_models, data, make_job, tmp_path, calls, capsys
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

    out = tmp_path / "out"
    calls.seen.clear()
    calls.stop_after = 6
    with pytest.raises(Stopped):
        run(make_job(tiny_models["chat"], data, out, **settings))
    saved = sorted(layout.checkpoint_dir(out, 0).glob("rows-*.ckpt"))
    assert len(saved) == 6
    text = max(pq.read_table(saved[1]).column("text").to_pylist(), key=len).encode()
    raw = bytearray(saved[1].read_bytes())
    at = raw.find(text)
    assert at >= 0
    raw[at + 1] ^= 0x04  # one bit of one character of the response
    saved[1].write_bytes(raw)
    raw = bytearray(saved[3].read_bytes())
    for at in (100, 500, 900):
        raw[at] ^= 0x81
    saved[3].write_bytes(raw)
    saved[4].write_bytes(saved[4].read_bytes()[:300])
    capsys.readouterr()

    calls.seen.clear()
    calls.stop_after = None
    run(make_job(tiny_models["chat"], data, out, **settings))
    said = [x for x in capsys.readouterr().out.splitlines() if " is damaged " in x]
    assert [x.split()[2] for x in said] == [str(saved[i].relative_to(out)) for i in (1, 3, 4)]
    assert sum(calls.seen) == 200 - 6 * 8 + 3 * 8  # the three damaged batches, generated again
    assert rows(out) == reference


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


def test_rows_with_their_own_sample_counts_come_back_whole(tmp_path):
    """A row may have its own ``num_return_sequences``: a row is reused when it holds its own
    count of samples, and progress reports count rows, not samples over one count."""
    one, three = [Sample("a", "stop", 1)], [Sample(t, "stop", 1) for t in "bcd"]
    checkpoints.save(tmp_path, 0, IDENTITY, [(0, one), (1, three), (2, three[:2])])
    found = checkpoints.load(tmp_path, 0, IDENTITY, samples={0: 1, 1: 3, 2: 3})
    assert found == {0: one, 1: three}  # row 2 lacks a sample: generated again
    (batch,) = checkpoints.finished_batches(tmp_path)
    assert batch["rows"] == 3 and batch["completion_tokens"] == 6
