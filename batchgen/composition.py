"""Composition: Hydra's configs and the command line's overrides into one typed ``JobConfig``.

Invariant: Hydra's global state is batchgen's only while batchgen composes. Importing the
package, building a ``Generator`` or calling ``compose`` leaves Hydra's config store and
OmegaConf's resolvers as they were: the schema (``SCHEMA``) and the resolvers the presets use
(``batchgen.for_source``, ``batchgen.output_dir``, ``batchgen.sweeps_dir``,
``batchgen.help_keys``) are registered by ``hydra_registered`` for the block that composes, and
removed after. The command line and the Python API compose through the same functions here; the
conversion that finishes a config (``conversion.convert``) is the job's, not composition's,
so a ``JobConfig`` built by hand is finished the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from batchgen import paths
from batchgen.config import DatasetConfig, JobConfig, ModelConfig
from batchgen.errors import ConfigError
from batchgen.store import layout
from batchgen.store.naming import default_output_dir

# The name of batchgen's schema in Hydra's config store (config.yaml's first default): batchgen's
# own, so it cannot overwrite a host application's ``base_config``.
SCHEMA = "batchgen_job"
# The key naming each source section's source: overriding it means another model or dataset.
SOURCE_KEYS = {ModelConfig: "name_or_path", DatasetConfig: "path"}


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


def output_dir(*, _root_: DictConfig) -> str:
    """``${batchgen.output_dir:}``, the default ``output.dir`` (``naming.default_output_dir``)."""
    return default_output_dir(
        OmegaConf.to_object(_root_.model),
        OmegaConf.to_object(_root_.dataset),
        OmegaConf.to_object(_root_.sampling),
    )


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


RESOLVERS = {
    "batchgen.for_source": for_source,
    "batchgen.output_dir": output_dir,
    "batchgen.sweeps_dir": sweeps_dir,
    "batchgen.help_keys": help_keys,
}


@contextlib.contextmanager
def hydra_registered() -> Iterator[None]:
    """batchgen's schema and resolvers registered for the block, then Hydra's config store and
    OmegaConf's resolvers as they were before it."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    name = f"{SCHEMA}.yaml"
    saved = store.repo.get(name)
    added = [key for key in RESOLVERS if not OmegaConf.has_resolver(key)]
    store.store(name=SCHEMA, node=JobConfig)
    for key, resolver in RESOLVERS.items():
        OmegaConf.register_new_resolver(key, resolver, replace=True)
    try:
        yield
    finally:
        if saved is None:
            store.repo.pop(name, None)
        else:
            store.repo[name] = saved
        for key in added:
            OmegaConf.clear_resolver(key)


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
    """Resolve interpolations and turn the composed config into the typed dataclasses (call it
    inside ``hydra_registered``: the presets' resolvers run here).

    Raises:
        ConfigError: a mandatory value (``???``) was left unset, or a key was added with ``+``
            that the schema does not know (such as ``_target_``): it would be silently dropped.
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
    return job


def compose_job(overrides: list[str]) -> JobConfig:
    """The job ``batchgen OVERRIDES...`` runs, composed, without running it.

    Raises:
        ConfigError: an override that does not parse or names no setting.
    """
    from hydra import compose, initialize_config_dir

    check_overrides(overrides)
    with (
        hydra_registered(),
        initialize_config_dir(config_dir=paths.CONFIG_DIR, version_base="1.3"),
    ):
        return to_job_config(compose("config", overrides=overrides))


def _groups() -> set[str]:
    return {p.name for p in Path(paths.CONFIG_DIR).iterdir() if p.is_dir() and p.name != "hydra"}


def presets(group: str) -> list[str]:
    """The presets of a config group: the names of its ``conf/GROUP/*.yaml`` files."""
    return sorted(p.stem for p in (Path(paths.CONFIG_DIR) / group).glob("*.yaml"))


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


def _choices(override) -> list[str]:
    """The presets a group override asks for: one, or each of a ``-m`` sweep's list; none for
    a deletion, a null, or a sweep Hydra expands itself (``glob``)."""
    from hydra.core.override_parser.types import ChoiceSweep

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return [v for v in value.list if isinstance(v, str)]
    return [value] if isinstance(value, str) and not override.is_delete() else []


def _check_choice(group: str, choice: str) -> None:
    """Refuse a preset that ``conf/GROUP/`` does not hold (Hydra's message lists its search
    paths over several lines and exits 1).

    Raises:
        ConfigError: naming the override, the closest preset and every preset of the group.
    """
    names = presets(group)
    if choice in names:
        return
    close = difflib.get_close_matches(choice, names, n=1, cutoff=0.5)
    hint = f"; did you mean {group}={close[0]}?" if close else "."
    raise ConfigError(f"{group}={choice}: not a {group} preset (they are {', '.join(names)}){hint}")


def check_overrides(overrides: list[str], own_presets: bool = True) -> None:
    """Refuse, before Hydra sees them, overrides it cannot parse, keys the schema lacks and
    presets that do not exist.

    Hydra's own messages for these name no fix (and exit 1); keys under ``hydra`` and
    ``+``/``++`` additions are left to Hydra and ``to_job_config``.

    Args:
        own_presets: the presets are batchgen's own files; False when a config directory
            was added on the command line (``--config-dir``), whose presets Hydra finds.

    Raises:
        ConfigError: naming the override, and how to quote it, the key or the preset meant.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    known = set(dotted_keys()) | _groups() | {f.name for f in dataclasses.fields(JobConfig)}
    own_presets = own_presets and not any(o.startswith("hydra.searchpath") for o in overrides)
    for text in overrides:
        if "=" not in text and not text.startswith("~"):
            raise ConfigError(
                f"{text!r} is not an override: write KEY=VALUE or GROUP=PRESET"
                f"{did_you_mean(text)} (`python -m batchgen --help` lists every key)."
            )
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
        ):
            continue
        if key in _groups():
            for choice in _choices(override) if own_presets else []:
                _check_choice(key, choice)
            continue
        if key in known:
            continue
        raise ConfigError(
            f"{key}: not a batchgen setting{did_you_mean(key)} "
            "(`python -m batchgen --help` lists every key)."
        )
