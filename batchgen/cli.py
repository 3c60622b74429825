"""The thin Hydra entry point: check the command line, compose the config, convert it once, run.

Invariant: every mistake on the command line (an override Hydra cannot parse, a key the schema
does not know, a bad value) ends as one line ``batchgen: error: KEY...`` and exit status 2
before the model loads; Ctrl-C never ends in a traceback. Hydra stays here: the resolvers the
presets use (``batchgen.for_source``, ``batchgen.output_dir``, ``batchgen.sweeps_dir``,
``batchgen.help_keys``) are registered on import, and package code receives plain dataclasses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import importlib
import json
import sys
import typing
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from batchgen.config import DatasetConfig, JobConfig, ModelConfig, SamplingConfig
from batchgen.config_checks import convert, normalize_sampling
from batchgen.errors import BatchgenError, ConfigError
from batchgen.store import layout, manifest

# An absolute path: `python -m batchgen` would otherwise make Hydra look for a `conf` module.
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")
# The key naming each source section's source: overriding it means another model or dataset.
SOURCE_KEYS = {ModelConfig: "name_or_path", DatasetConfig: "path"}
# Suffixes dropped from a source's name in the default output folder.
_SUFFIXES = (".gguf", ".jsonl", ".json", ".parquet", ".csv")
INTERRUPTED = (
    "batchgen: interrupted at once (Ctrl-C); finished shards are intact; "
    "rerun the same command to resume."
)

ConfigStore.instance().store(name="base_config", node=JobConfig)


def dotted_keys(schema: type = JobConfig, prefix: str = "") -> list[str]:
    """Every setting of the schema as a dotted key (``sampling.max_new_tokens``), in order."""
    keys = []
    for name, hint in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(hint):
            keys += dotted_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _schema_default(schema: type, key: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(schema)}[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def for_source(source: str, value: Any, *, _parent_: DictConfig, _node_: Any) -> Any:
    """``${batchgen.for_source:SOURCE,VALUE}`` in a preset: VALUE while the section's source
    (``model.name_or_path``, ``dataset.path``) is SOURCE, else the schema's default.

    A preset marks this way what belongs to its own model or data (a GGUF file name, an id
    column, a hub config name): overriding the source on the command line drops all of it.
    """
    schema = OmegaConf.get_type(_parent_)
    path_key = SOURCE_KEYS.get(schema) or ("name_or_path" if "name_or_path" in _parent_ else "path")
    if OmegaConf.select(_parent_, path_key, throw_on_missing=False) == source:
        return value
    key = _node_._key()
    if schema not in SOURCE_KEYS:
        raise ConfigError(f"{key}: batchgen.for_source is only for the model and dataset groups.")
    return _schema_default(schema, key)


def _label(location: str) -> str:
    """A folder name for a model or dataset: the last part of its path or hub id."""
    text = location.removeprefix("pkg:").replace("\\", "/").rstrip("/")
    name = text.rsplit("/", 1)[-1]
    if name in ("", ".", "..", "~"):
        name = Path(location).expanduser().resolve().name or "root"
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return "".join(c if c.isalnum() or c in "._+-" else "-" for c in name).lstrip(".") or "x"


@functools.cache  # the preset files are package data: fixed for the process
def _sampling_presets() -> dict[str, SamplingConfig]:
    presets = {}
    for path in sorted((Path(CONFIG_DIR) / "sampling").glob("*.yaml")):
        merged = OmegaConf.merge(OmegaConf.structured(SamplingConfig), OmegaConf.load(path))
        presets[path.stem] = normalize_sampling(OmegaConf.to_object(merged))
    return presets


def sampling_label(sampling: SamplingConfig) -> str:
    """The preset whose settings these are, else ``greedy-HASH`` / ``sampling-HASH``."""
    # A bad stop string is reported by to_job_config; the folder name only has to be stable.
    with contextlib.suppress(ConfigError):
        sampling = normalize_sampling(sampling)
    for name, preset in _sampling_presets().items():
        if preset == sampling:
            return name
    digest = manifest.fingerprint(dataclasses.asdict(sampling))[:8]
    return f"{'sampling' if sampling.do_sample else 'greedy'}-{digest}"


def output_dir(*, _root_: DictConfig) -> str:
    """``${batchgen.output_dir:}``, the default ``output.dir``:
    ``outputs/MODEL/DATASET-SAMPLING``, named after the actual model (its GGUF file, else the
    last part of its path or hub id), the actual data (file stem, folder or hub name) and the
    sampling preset the settings equal (else a hash of them). The same command always names
    the same folder, so rerunning it resumes."""
    m, d = _root_.model, _root_.dataset
    model = _label(m.gguf_file) if m.gguf_file else _label(m.name_or_path)
    sampling = OmegaConf.to_object(_root_.sampling)
    return f"outputs/{model}/{_label(d.path)}-{sampling_label(sampling)}"


def sweeps_dir(out_dir: str) -> str:
    """``${batchgen.sweeps_dir:${output.dir}}``, under which ``hydra.sweep.dir`` puts each ``-m``
    sweep's folder: inside the output folder's ``_batchgen/`` (``layout.sweeps_dir``), where no
    folder reader takes Hydra's and submitit's files for outputs."""
    return str(layout.sweeps_dir(Path(out_dir)))


def help_keys(*, _root_: DictConfig) -> str:
    """``${batchgen.help_keys:}``: every key with its value in the composed config (for --help)."""
    lines = []
    for key in dotted_keys():
        try:
            value = OmegaConf.select(_root_, key, throw_on_missing=True)
            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True)
            shown = value if isinstance(value, str) else json.dumps(value)
        except Exception:  # a mandatory value not set yet, or an interpolation that fails
            shown = "???"
        lines.append(f"  {key:<30} {shown}")
    return "\n".join(lines).replace("$", "$$")  # the help text is a string.Template


OmegaConf.register_new_resolver("batchgen.for_source", for_source, replace=True)
OmegaConf.register_new_resolver("batchgen.output_dir", output_dir, replace=True)
OmegaConf.register_new_resolver("batchgen.sweeps_dir", sweeps_dir, replace=True)
OmegaConf.register_new_resolver("batchgen.help_keys", help_keys, replace=True)


def _unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[str]:
    types = typing.get_type_hints(schema)  # resolves the postponed annotations
    unknown = []
    for key in node:
        if key not in types:
            unknown.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(types[key]) and isinstance(node[key], DictConfig):
            unknown += _unknown_keys(node[key], types[key], f"{prefix}{key}.")
    return unknown


def to_job_config(cfg: DictConfig) -> JobConfig:
    """Resolve interpolations and turn the composed config into the typed dataclasses.

    Then ``batchgen.config_checks.convert``: ``sampling.temperature=0`` becomes greedy, escapes in
    stop strings are interpreted, ``dataset.template_file`` is read.

    Raises:
        ConfigError: a mandatory value (``???``) was left unset, or a key was added with ``+``
            that the schema does not know (such as ``_target_``): it would be silently dropped;
            or ``convert`` refused a value.
    """
    unknown = _unknown_keys(cfg, JobConfig)
    if unknown:
        raise ConfigError(
            f"{', '.join(unknown)}: not a batchgen setting (see `python -m batchgen --help`)."
        )
    try:
        job = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise ConfigError(
            f"{e.full_key}: missing mandatory value; set it on the command line, "
            f"e.g. {e.full_key}=..."
        ) from e
    assert isinstance(job, JobConfig), type(job)
    return convert(job)


def compose_job(overrides: list[str]) -> JobConfig:
    """The job ``batchgen OVERRIDES...`` runs, composed and converted, without running it.

    Raises:
        ConfigError: an override that does not parse or names no setting, or a bad value.
    """
    from hydra import compose, initialize_config_dir

    check_overrides(overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return to_job_config(compose("config", overrides=overrides))


def _groups() -> set[str]:
    return {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and p.name != "hydra"}


def did_you_mean(key: str) -> str:
    """`` (did you mean KEY?)`` for the closest setting or group, else an empty string."""
    keys = dotted_keys()
    choices = sorted(set(keys) | _groups())
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    if not close:  # the section left out or wrong: match the last part alone
        tails = {k.rsplit(".", 1)[-1]: k for k in keys}
        tail = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.75)
        close = [tails[t] for t in tail]
    return f"; did you mean {close[0]}?" if close else ""


def _quoting_hint(text: str) -> str:
    key, sep, value = text.partition("=")
    if sep and "'" not in value and '"' not in value:
        fixed = f'{key}="{value}"'
        escaped = fixed.replace('"', '\\"')
        return f"python -m batchgen '{fixed}' (make run ARGS=\"'{escaped}'\")"
    return 'KEY="VALUE" inside the shell\'s single quotes'


def check_overrides(overrides: list[str]) -> None:
    """Refuse, before Hydra sees them, overrides it cannot parse and keys the schema lacks.

    Hydra's own messages for these name no fix (and exit 1); keys under ``hydra``, group
    choices and ``+``/``++`` additions are left to Hydra and ``to_job_config``.

    Raises:
        ConfigError: naming the override, and how to quote it or the key meant.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    known = set(dotted_keys()) | _groups() | {f.name for f in dataclasses.fields(JobConfig)}
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException as e:
            reason = " ".join(str(e).split())
            raise ConfigError(
                f"cannot parse the override {text!r} ({reason}). A value with spaces, braces, "
                "colons, commas, brackets or quotes needs Hydra's double quotes inside the "
                f"shell's single quotes: {_quoting_hint(text)}; see README, Quoting."
            ) from e
        key = override.key_or_group
        if (
            override.package is not None
            or key == "hydra"
            or key.startswith(("hydra.", "hydra/"))
            or override.is_add()
            or override.is_force_add()
            or key in known
        ):
            continue
        raise ConfigError(
            f"{key}: not a batchgen setting{did_you_mean(key)} "
            "(`python -m batchgen --help` lists every key)."
        )


def _job(cfg: DictConfig) -> None:
    """Run one batch generation job; a user error prints one paragraph and exits with 2."""
    from batchgen.api import run
    from batchgen.errors import Stopped

    try:
        run(to_job_config(cfg))
    except Stopped as e:
        print(f"batchgen: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except BatchgenError as e:
        print(f"batchgen: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


_hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")(_job)


# ``batchgen TOOL OUTPUT_DIR``: commands over an output folder (batchgen/tools/), not Hydra jobs.
TOOLS = ("status", "report", "finalize", "export")


def main() -> None:
    """``batchgen [--version] [--help] [KEY=VALUE ...]``: check, then hand to Hydra;
    ``batchgen status|report|finalize|export OUTPUT_DIR``: the tool of that name."""
    from hydra._internal.utils import get_args_parser

    argv = sys.argv[1:]
    if argv and argv[0] in TOOLS:
        tool = importlib.import_module(f"batchgen.tools.{argv[0]}")
        sys.exit(tool.main(argv[1:]))
    try:
        if "--version" in argv:
            from batchgen.version import __version__

            print(f"batchgen {__version__}")
            return
        args = get_args_parser().parse_args(argv)  # a bad flag: argparse's usage, exit 2
        try:
            check_overrides(args.overrides)
        except ConfigError as e:
            print(f"batchgen: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        if args.multirun or "hydra.mode=MULTIRUN" in args.overrides:
            import batchgen.launcher  # noqa: F401  registers the output-judging launchers
        _hydra_main()
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr, flush=True)
        sys.exit(130)
