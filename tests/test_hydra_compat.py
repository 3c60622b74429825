"""batchgen.hydra_compat: the one module touching internals of Hydra, hydra-submitit-launcher
and submitit; each use refuses, in one line, a version it was not verified with."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from batchgen import hydra_compat, launcher

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "batchgen"
COMPAT = PACKAGE / "hydra_compat.py"
# Internal names of Hydra, hydra-submitit-launcher and submitit that batchgen uses (attributes,
# functions, keywords), and the internal module prefix.
PRIVATE = {"_return_value", "_results_timeout_s", "class_name_to_class", "_EXECUTOR"}
PRIVATE |= {"get_args_parser"}
INTERNAL = "hydra._internal"


def private_uses(source: str) -> list[str]:
    """``LINE: NAME`` for each import of ``hydra._internal`` and each use of a ``PRIVATE`` name
    (attribute, name, keyword argument, imported name, or a string such as ``getattr``'s)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith(INTERNAL)]
            names += [a.asname for a in node.names if a.asname in PRIVATE]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith(INTERNAL):
                names.append(module)
            for alias in node.names:
                if module == "hydra" and alias.name == "_internal":
                    names.append(INTERNAL)
                elif alias.name in PRIVATE:
                    names.append(alias.name)
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE:
            names.append(node.attr)
        elif isinstance(node, ast.Name) and node.id in PRIVATE:
            names.append(node.id)
        elif isinstance(node, ast.keyword) and node.arg in PRIVATE:
            names.append(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if text in PRIVATE or text.startswith(INTERNAL):
                names.append(text)
        found += [(node.lineno, name) for name in names]
    return [f"{line}: {name}" for line, name in sorted(found)]


def test_only_the_compat_module_touches_internals():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30 and COMPAT in modules, modules
    found = []
    for path in modules:
        name = path.relative_to(REPO).as_posix()
        uses = private_uses(path.read_text(encoding="utf-8")) if path != COMPAT else []
        found += [f"{name}:{use}" for use in uses]
    assert not found, "internals outside batchgen/hydra_compat.py:\n" + "\n".join(found)


def test_the_scan_sees_each_form():
    # The compat module itself: every listed internal is really used there, so the list of
    # what no other module may touch is not stale.
    seen = {use.split(": ")[1] for use in private_uses(COMPAT.read_text(encoding="utf-8"))}
    assert seen >= {"hydra._internal.utils", "get_args_parser"}
    assert seen >= {"class_name_to_class", "_results_timeout_s"}
    # _return_value and _EXECUTOR are no longer used anywhere; each form of use is found.
    fake = (
        "import hydra._internal.utils\n"
        "from hydra import _internal\n"
        "from hydra._internal.utils import get_args_parser\n"
        "x = ret._return_value\n"
        "JobReturn(_return_value=e)\n"
        "getattr(job, '_results_timeout_s')\n"
        "Plugins.instance().class_name_to_class[n] = c\n"
        "cluster = self._EXECUTOR\n"
        "ok = ret.return_value\n"
    )
    assert private_uses(fake) == [
        "1: hydra._internal.utils",
        "2: hydra._internal",
        "3: get_args_parser",
        "3: hydra._internal.utils",
        "4: _return_value",
        "5: _return_value",
        "6: _results_timeout_s",
        "7: class_name_to_class",
        "8: _EXECUTOR",
    ]


def test_installed_versions_are_the_verified_ones():
    for dist in hydra_compat.VERIFIED:
        hydra_compat.check(dist)


def test_verified_versions_are_the_pins():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = {(r := Requirement(d)).name: r.specifier for d in project["dependencies"]}
    for dist, wanted in hydra_compat.VERIFIED.items():
        assert pins[dist] == SpecifierSet(wanted), dist


@pytest.mark.parametrize(
    ("dist", "version"),
    [
        ("hydra-submitit-launcher", "1.3.0"),
        ("submitit", "1.5.5"),
        ("hydra-core", "1.4.0"),
        ("hydra-core", "1.3.1"),
        ("submitit", "not-a-version"),
        ("hydra-submitit-launcher", None),
    ],
)
def test_an_unknown_version_ends_in_one_line(monkeypatch, dist, version):
    real = hydra_compat.installed_version
    monkeypatch.setattr(
        hydra_compat, "installed_version", lambda d: version if d == dist else real(d)
    )
    with pytest.raises(SystemExit) as stop:
        hydra_compat.check(dist)
    message = str(stop.value.code)
    assert "\n" not in message
    assert message.startswith("batchgen: error: ")
    found = f"{dist} {version} is installed" if version else f"{dist} is not installed"
    assert found in message, message
    assert f"pip install '{dist}{hydra_compat.VERIFIED[dist]}'" in message


@pytest.fixture
def unverified(monkeypatch):
    """Every package at a version batchgen was not verified with, the passed checks forgotten."""
    monkeypatch.setattr(hydra_compat, "installed_version", lambda dist: "0.0.1")
    hydra_compat.require.cache_clear()
    yield
    hydra_compat.require.cache_clear()


def test_each_internal_is_touched_only_after_the_check(unverified):
    with pytest.raises(SystemExit, match="hydra-core 0.0.1 is installed"):
        hydra_compat.args_parser()
    with pytest.raises(SystemExit, match="hydra-core 0.0.1 is installed"):
        hydra_compat.register_launcher("hydra_plugins.x.Y", launcher.LocalLauncher)
    job = object()  # an attribute set on it would raise AttributeError instead
    with pytest.raises(SystemExit, match="submitit 0.0.1 is installed"):
        hydra_compat.set_result_wait(job, 1.0)
    with pytest.raises(SystemExit, match="hydra-submitit-launcher 0.0.1 is installed"):
        hydra_compat.submit(object(), "local", [["a=1"]], 0)


def test_args_parser_reads_the_command_line_as_hydra_does():
    args = hydra_compat.args_parser().parse_args(["-m", "runner.rank=0,1", "--cfg", "job"])
    assert (args.multirun, args.overrides, args.cfg) == (True, ["runner.rank=0,1"], "job")


def test_the_launchers_are_registered_with_hydra():
    from hydra.core.plugins import Plugins

    table = Plugins.instance().class_name_to_class
    assert table["hydra_plugins.batchgen_launcher.SlurmLauncher"] is launcher.SlurmLauncher
    assert table["hydra_plugins.batchgen_launcher.LocalLauncher"] is launcher.LocalLauncher


def test_the_result_wait_takes_effect(tmp_path):
    # A local job with no process and no result: exception() waits for the result file, 15 s
    # by default. Were submitit to rename the attribute, setting it would change nothing.
    job = submitit.LocalJob(folder=tmp_path, job_id="12")
    hydra_compat.set_result_wait(job, 0)
    start = time.monotonic()
    error = job.exception()
    assert type(error).__name__ == "UncompletedJobError", error
    assert time.monotonic() - start < 5


def test_a_sweep_on_an_unverified_launcher_stops_in_one_line_before_any_folder(tmp_path):
    # `batchgen -m` with hydra-submitit-launcher 1.3.0 "installed": refused when the launchers
    # register, before Hydra writes the sweep's folder.
    patched = (
        "import importlib.metadata as m, runpy, sys\n"
        "real = m.version\n"
        "m.version = lambda d: '1.3.0' if d == 'hydra-submitit-launcher' else real(d)\n"
        "sys.argv = ['batchgen', *sys.argv[1:]]\n"
        "runpy.run_module('batchgen', run_name='__main__')\n"
    )
    out = tmp_path / "out"
    sweep = ["-m", "hydra/launcher=local", "runner.rank=0,1", "runner.world_size=2"]
    proc = subprocess.run(
        [sys.executable, "-c", patched, *sweep, f"output.dir={out}"],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        "batchgen: error: hydra-submitit-launcher 1.3.0 is installed, but batchgen relies on "
        "internals of hydra-submitit-launcher==1.2.0 (batchgen/hydra_compat.py) and was verified "
        "with those only; pip install 'hydra-submitit-launcher==1.2.0'."
    ]
    assert not out.exists()
