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


def test_importing_and_a_generator_leave_hydras_global_state_alone(tiny_models):
    """Nothing registered in Hydra's config store or OmegaConf's resolvers by importing the
    library, building a Generator (the default one composes the packaged configs) or calling
    ``batchgen.compose``: a host application's own ``base_config`` stays its own."""
    code = """
import json, sys
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
OmegaConf.register_new_resolver("host.own", lambda: 1)
ConfigStore.instance().store(name="base_config", node={"host": 1})
def state():
    repo = ConfigStore.instance().repo
    names = ["batchgen.for_source", "batchgen.output_dir", "batchgen.sweeps_dir",
             "batchgen.help_keys", "host.own"]
    return sorted(repo), [OmegaConf.has_resolver(n) for n in names], repo["base_config.yaml"].node
before = state()
import batchgen
batchgen.Generator(sys.argv[1], progress=False).generate(["hi"], {"max_new_tokens": 2})
assert batchgen.compose(["seed=3"]).seed == 3
after = state()
print(json.dumps([str(before), str(after)]))
"""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny_models["chat"])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    before, after = json.loads(done.stdout.splitlines()[-1])
    assert before == after
    assert "host" in before and "batchgen_job.yaml" not in after


def test_two_calls_load_and_measure_once(tiny_models, monkeypatch):
    """One session for every call: the engine and batch runner are built once, and the batch
    size search goes on from what the first call measured instead of starting over."""
    from batchgen.engine import choice, memory

    built = []
    real = choice.build_engine
    monkeypatch.setattr(memory, "available_ram", lambda: 16 * 2**30)
    from batchgen.job import session

    monkeypatch.setattr(session, "build_engine", lambda *a, **k: built.append(1) or real(*a, **k))
    gen = batchgen.Generator(str(tiny_models["chat"]), progress=False)
    texts = [f"prompt {i} " + "word " * i for i in range(40)]
    gen.generate(texts, {"max_new_tokens": 3})
    first = dict(gen.stats["tuning"]["decode_tokens_per_second"])
    gen.generate(texts, {"max_new_tokens": 3})
    second = gen.stats["tuning"]["decode_tokens_per_second"]
    assert built == [1]
    assert first and set(first) <= set(second)  # the sizes measured first are still known
    assert gen.session.batcher.tuner is not None


def test_run_of_a_hand_built_config_equals_the_command_line(
    tiny_models, prompts_file, tmp_path, monkeypatch
):
    """The same settings through the command line and through ``batchgen.run(JobConfig(...))``:
    stop-string escapes, temperature=0 and a schema file are converted once, the same way, so
    both give one fingerprint and, with output.dir unset, one folder."""
    import os
    import subprocess
    import sys

    from batchgen.config import DatasetConfig, JobConfig, ModelConfig, SamplingConfig
    from batchgen.store import manifest

    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"a": {"type": "string"}}}')
    model = str(tiny_models["chat"])
    overrides = [
        f"model.name_or_path={model}",
        "model.gguf_file=null",
        "dataset=local",
        f"dataset.path={prompts_file}",
        "dataset.id_column=uid",
        "sampling.max_new_tokens=4",
        "sampling.temperature=0",
        'sampling.stop=["\\n\\n"]',  # as a shell passes a typed \n: two characters
        f"sampling.json_schema={schema}",
        "runner.progress=false",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = subprocess.run(
        [sys.executable, "-m", "batchgen", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    (cli_dir,) = [p.parent for p in tmp_path.glob("outputs/*/*/_batchgen")]
    by_hand = JobConfig(
        model=ModelConfig(name_or_path=model),
        dataset=DatasetConfig(path=str(prompts_file), id_column="uid"),
        sampling=SamplingConfig(
            max_new_tokens=4, temperature=0, stop=["\\n\\n"], json_schema=str(schema)
        ),
    )
    by_hand.runner.progress = False
    monkeypatch.chdir(tmp_path)
    summary = batchgen.run(by_hand)
    assert summary["this_run"]["rows"] == 0 and summary["already_complete"]
    cli_run = json.loads((cli_dir / "_batchgen" / "run.json").read_text())
    assert cli_run["fingerprint_parts"]["sampling"]["stop"] == ["\n\n"]
    assert cli_run["fingerprint_parts"]["sampling"]["do_sample"] is False
    assert manifest.fingerprint(cli_run["fingerprint_parts"]) == cli_run["fingerprint"]


def test_identical_calls_repeat_their_samples_and_a_seed_changes_them(chat_gen):
    sampling = {"max_new_tokens": 6, "do_sample": True, "temperature": 1.0}
    texts = ["one prompt", "another prompt"]
    first = [c.response for c in chat_gen.generate(texts, sampling)]
    assert [c.response for c in chat_gen.generate(texts, sampling)] == first  # reproducible
    other = [c.response for c in chat_gen.generate(texts, sampling, seed=1234)]
    assert other != first
    assert [c.response for c in chat_gen.generate(texts, sampling, seed=1234)] == other
    assert [c.response for c in chat_gen.generate(texts, sampling, seed=0)] == first  # the default
