"""Checking and finishing composed configs: ``validate`` names the key, ``convert`` makes
greedy greedy, interprets stop-string escapes and reads ``dataset.template_file``."""

from __future__ import annotations

import re

import pytest
from test_composition import OUT, compose_job

from batchgen.config import JobConfig, OutputConfig, SamplingConfig
from batchgen.config_checks import validate
from batchgen.errors import ConfigError


@pytest.mark.parametrize(
    "overrides,key",
    [
        (
            ["sampling.num_return_sequences=3", "sampling.do_sample=false"],
            "sampling.num_return_sequences",
        ),
        (
            ["sampling.num_return_sequences=0", "sampling.do_sample=true"],
            "sampling.num_return_sequences",
        ),
        (["sampling.top_p=0"], "sampling.top_p"),
        (["sampling.top_p=1.5"], "sampling.top_p"),
        (["sampling.temperature=-0.5"], "sampling.temperature"),
        (["sampling.top_k=-1"], "sampling.top_k"),
        (["sampling.max_new_tokens=0"], "sampling.max_new_tokens"),
        (["sampling.stop=['']"], "sampling.stop"),
        (["runner.batch_size=0"], "runner.batch_size"),
        (["runner.devices=0"], "runner.devices"),
        (["runner.devices=two"], "runner.devices"),
        (["runner.devices=true"], "runner.devices"),
        (["runner.devices=[]"], "runner.devices"),
        (["runner.devices=[0,0]"], "runner.devices"),
        (["runner.devices=[-1]"], "runner.devices"),
        (["runner.devices=[0,cuda]"], "runner.devices"),
        (["model.device_map=auto", "runner.devices=2"], "runner.devices"),
        (["runner.on_long_prompt=bogus"], "runner.on_long_prompt"),
        (["model.dtype=float8"], "model.dtype"),
        (["dataset.limit=0"], "dataset.limit"),
        (["dataset.chat_template=maybe"], "dataset.chat_template"),
        (["dataset.prompt_column=null"], "dataset"),
        (["output.rows_per_shard=0"], "output.rows_per_shard"),
        (["output.dir=''"], "output.dir"),
        (["model.device_map=everywhere"], "model.device_map"),
        (["model.device_map={model.layers:gpu7}"], "model.device_map"),
        (["model.device_map=auto", "model.device=cuda:1"], "model.device_map"),
        (["model.max_memory={cpu:1GB}"], "model.max_memory"),
        (["model.device_map=auto", "model.max_memory={cpu:lots}"], "model.max_memory"),
        (["model.device_map=auto", "model.max_memory={tpu:1GB}"], "model.max_memory"),
        (["model.quantization=fp8"], "model.quantization"),
        (["model.adapter=''"], "model.adapter"),
    ],
)
def test_validate_names_the_key(overrides, key):
    job = compose_job(*overrides)
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ":"):
        validate(job)


@pytest.mark.parametrize(
    "overrides",
    [
        ["sampling.num_return_sequences=3", "sampling.do_sample=true"],
        ["sampling.top_p=1"],
        ["sampling.top_k=0"],
        ["runner.batch_size=1"],
        ["runner.devices=auto"],
        ["runner.devices=1"],
        ["runner.devices=[3,0]"],
        ["model.device_map=auto", "runner.devices=auto"],
        ["runner.on_long_prompt=truncate_left"],
        ["runner.on_long_prompt=skip"],
        ["model.dtype=float16"],
        ["dataset.prompt_column=null", "dataset.messages_column=messages"],
        ["dataset.prompt_column=null", "dataset.template='Q: {question}'"],
        ["model.device_map=balanced", "model.max_memory={0:20GiB,1:20GiB,cpu:60GB,disk:1000}"],
        ["model.device_map={model.embed_tokens:0,model.layers:cpu,lm_head:disk}"],
        ["model.quantization=bnb-4bit", "model.adapter=some/adapter", "model.merge_adapter=false"],
    ],
)
def test_validate_accepts_the_neighbouring_good_values(overrides):
    validate(compose_job(*overrides))


def test_temperature_zero_means_greedy():
    from batchgen.engine.sampling import sampling_processors
    from batchgen.store.manifest import fingerprint, fingerprint_parts

    job = compose_job("sampling=nucleus", "sampling.temperature=0")
    validate(job)
    assert job.sampling.do_sample is False and job.sampling.temperature == 1.0
    # Greedy is greedy: the same job, hence the same fingerprint, as without the setting.
    assert compose_job("sampling.temperature=0") == compose_job()
    parts = [
        fingerprint_parts(compose_job(*o), True, "float32", 32)
        for o in ([], ["sampling.temperature=0"])
    ]
    assert fingerprint(parts[0]) == fingerprint(parts[1])
    # Built in code without the conversion, temperature 0 still decodes greedily.
    raw = SamplingConfig(do_sample=True, temperature=0.0)
    validate(JobConfig(sampling=raw, output=OutputConfig(dir=OUT)))
    assert len(sampling_processors(raw, [1], 1, "cpu")) == 0


def test_stop_strings_get_their_escapes_interpreted():
    # What the shell passes on for 'sampling.stop=["\n"]' is a backslash and an n.
    job = compose_job('sampling.stop=["\\n","a\\tb","\\\\n","\\u00e9"]')
    assert job.sampling.stop == ["\n", "a\tb", "\\n", "é"]
    with pytest.raises(ConfigError, match=r"^sampling\.stop\[0\]=.*unknown escape \\d"):
        compose_job('sampling.stop=["\\d+"]')


def test_template_file_is_read_into_the_template(tmp_path):
    from batchgen.store.manifest import fingerprint_parts

    text = "Translate to {lang}:\n{text}"
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text(text + "\n")  # the newline editors add is dropped
    second.write_text(text)
    job = compose_job(f"dataset.template_file={first}")
    assert (job.dataset.template, job.dataset.template_file) == (text, str(first))
    validate(job)
    # The fingerprint covers the text, not where the file lies.
    parts = [
        fingerprint_parts(compose_job(f"dataset.template_file={p}"), True, "float32", 3)
        for p in (first, second)
    ]
    assert parts[0]["prompts"]["template"] == text and parts[0] == parts[1]
    with pytest.raises(ConfigError, match=r"^dataset\.template_file=.*both set"):
        compose_job(f"dataset.template_file={first}", "dataset.template='x {a}'")
    with pytest.raises(ConfigError, match=r"^dataset\.template_file=.*no such file"):
        compose_job(f"dataset.template_file={tmp_path / 'nope.txt'}")
    (tmp_path / "bad.txt").write_text("unclosed {field")
    with pytest.raises(ConfigError, match=r"^dataset\.template_file=.*not a valid template"):
        compose_job(f"dataset.template_file={tmp_path / 'bad.txt'}")
