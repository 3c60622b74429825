"""The Python API: in memory it gives what a job writes; file to file it is the job."""

from __future__ import annotations

import copy
import dataclasses
import json

import pyarrow.parquet as pq
import pytest

import batchgen
from batchgen.errors import ConfigError, DataError, ModelError
from batchgen.store import writer


def shard_rows(out):
    return [row for f in sorted(out.glob("*.parquet")) for row in pq.read_table(f).to_pylist()]


def prompts(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def chat_gen(tiny_models):
    return batchgen.Generator(str(tiny_models["chat"]), progress=False, runner={"batch_size": 4})


def test_completion_fields_are_the_output_columns():
    names = [f.name for f in dataclasses.fields(batchgen.Completion)]
    assert names == [f.name for f in writer.BASE_FIELDS] + list(writer.OPTIONAL_FIELDS)


def test_chat_equals_the_job_rows(chat_gen, make_job, tiny_models, prompts_file, tmp_path):
    """Same rendering, engine, batching and sampling: each completion is the job's row."""
    sampling = {"max_new_tokens": 8, "do_sample": True, "temperature": 0.9, "top_k": 50}
    sampling["num_return_sequences"] = 2
    cfg = make_job(tiny_models["chat"], prompts_file, tmp_path / "out")
    cfg.sampling = batchgen.api.SamplingConfig(**sampling)
    batchgen.run(cfg)
    rows = prompts(prompts_file)
    got = chat_gen.chat(
        [[{"role": "user", "content": r["prompt"]}] for r in rows],
        sampling,
        ids=[r["uid"] for r in rows],
    )
    written = shard_rows(tmp_path / "out")
    assert len(got) == len(written) == 24
    assert [{k: getattr(c, k) for k in w} for c, w in zip(got, written, strict=True)] == written
    assert all(c.reasoning is None and c.token_logprobs is None for c in got)


def test_results_are_in_input_order_whatever_the_batching(tiny_models):
    texts = [f"{'word ' * (i * 7 % 23)}#{i}" for i in range(10)]
    small = batchgen.Generator(str(tiny_models["base"]), progress=False, runner={"batch_size": 3})
    large = batchgen.Generator(str(tiny_models["base"]), progress=False, runner={"batch_size": 16})
    a = small.generate(texts, {"max_new_tokens": 5})
    b = large.generate(texts, {"max_new_tokens": 5})
    assert [c.id for c in a] == [str(i) for i in range(10)]
    assert a == b
    assert all(c.prompt == t for c, t in zip(a, texts, strict=True))


def test_a_loaded_model_is_not_modified(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["chat"])
    tok = AutoTokenizer.from_pretrained(tiny_models["chat"], padding_side="left")
    before = copy.deepcopy(model.generation_config.to_dict())
    gen = batchgen.Generator(model, tokenizer=tok, progress=False)
    out = gen.generate(["one", "two three"], {"max_new_tokens": 4, "stop": ["x"]})
    assert len(out) == 2 and all(c.completion_tokens <= 4 for c in out)
    assert model.generation_config.to_dict() == before


def test_bad_inputs_are_named(chat_gen, tiny_models):
    with pytest.raises(ConfigError, match=r"sampling\.max_tokens: not a batchgen setting"):
        chat_gen.generate(["hi"], {"max_tokens": 3})
    with pytest.raises(ConfigError, match=r"sampling\.max_new_tokens"):
        chat_gen.generate(["hi"], {"max_new_tokens": 0})
    with pytest.raises(DataError, match="messages"):
        chat_gen.chat([[{"role": "user", "content": "hi"}], []], {"max_new_tokens": 4})
    with pytest.raises(DataError, match="a"):
        chat_gen.generate(["x", "y"], {"max_new_tokens": 4}, ids=["a", "a"])
    with pytest.raises(ConfigError, match="prompt: 1, id: 2: one value per prompt"):
        chat_gen.generate(["x"], {"max_new_tokens": 4}, ids=["a", "b"])
    with pytest.raises(ConfigError, match="no chat template"):
        batchgen.Generator(str(tiny_models["base"]), progress=False).chat([[]])
    with pytest.raises(ConfigError, match=r"runner\.batch_sise"):
        batchgen.Generator(str(tiny_models["base"]), runner={"batch_sise": 2})
    with pytest.raises(ModelError, match="tokenizer"):
        batchgen.Generator(object())


def test_bad_rows_skipped_on_request(tiny_models):
    gen = batchgen.Generator(
        str(tiny_models["chat"]), progress=False, runner={"on_bad_row": "skip"}
    )
    hi, yo = [{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]
    out = gen.chat([hi, [], yo], {"max_new_tokens": 4})
    assert [c.id for c in out] == ["0", "2"]


def test_run_takes_overrides(tiny_models, prompts_file, tmp_path):
    summary = batchgen.run(
        [
            f"model.name_or_path={tiny_models['chat']}",
            "model.gguf_file=null",
            f"dataset.path={prompts_file}",
            "dataset.id_column=uid",
            "sampling.max_new_tokens=3",
            "runner.progress=false",
            f"output.dir={tmp_path / 'out'}",
        ]
    )
    assert summary["shards_done"] == 1
    assert len(shard_rows(tmp_path / "out")) == 12
    with pytest.raises(ConfigError, match="did you mean"):
        batchgen.run(["sampling.max_new_tokes=3"])


def test_compose_is_the_command_line_job():
    cfg = batchgen.compose(["sampling=nucleus", "runner.batch_size=8"])
    assert isinstance(cfg, batchgen.JobConfig)
    assert cfg.sampling.do_sample and cfg.runner.batch_size == 8
    assert cfg.dataset.path.endswith("sample_prompts.jsonl")


def test_per_prompt_sampling_equals_one_call_per_setting(tiny_models):
    gen = batchgen.Generator(str(tiny_models["base"]), progress=False, runner={"batch_size": 8})
    texts = ["one two", "three", "four five six", "seven"]
    settings = [
        {"max_new_tokens": 3},
        {"max_new_tokens": 6, "do_sample": True, "temperature": 0.8, "seed": 5},
        {"max_new_tokens": 3},
        {"max_new_tokens": 6, "stop": ["x"]},
    ]
    mixed = gen.generate(texts, settings)
    pairs = list(zip(texts, settings, strict=True))
    alone = [gen.generate([t], [s], ids=[str(i)])[0] for i, (t, s) in enumerate(pairs)]
    assert mixed == alone
    assert all(
        c.completion_tokens <= s["max_new_tokens"] for c, s in zip(mixed, settings, strict=True)
    )
