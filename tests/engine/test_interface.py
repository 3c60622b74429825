"""The engine interface: both engines implement it, and only the session builds one."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from batchgen.engine import interface
from batchgen.engine.continuous import ContinuousEngine
from batchgen.engine.interface import Engine
from batchgen.engine.static import StaticEngine

PACKAGE = Path(interface.__file__).resolve().parent.parent
# What choosing or building an engine takes: nothing outside the engine layer and the session
# (batchgen.job.session) touches these.
ENGINE_SPECIFIC = {
    "StaticEngine",
    "ContinuousEngine",
    "build_engine",
    "choose_engine",
    "Batcher",
}


def test_the_interface_is_abstract_and_both_engines_implement_it():
    with pytest.raises(TypeError, match="abstract"):
        Engine()
    for cls in (StaticEngine, ContinuousEngine):
        assert issubclass(cls, Engine) and not inspect.isabstract(cls)
        params = list(inspect.signature(cls.generate).parameters)
        assert params == ["self", "records", "seed", "sampling"]
    assert (StaticEngine.kind, ContinuousEngine.kind) == ("static", "continuous")
    params = list(inspect.signature(ContinuousEngine.generate_all).parameters)
    assert params == ["self", "records", "seed", "sampling", "on_finished", "stop"]
    assert list(inspect.signature(Engine.serves).parameters) == ["self", "sampling", "per_row"]


def users(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module file -> the engine-specific names it refers to, outside the engine layer."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        if path.parent.name == "engine":
            continue
        names = {
            node.id if isinstance(node, ast.Name) else node.attr
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Name | ast.Attribute)
        }
        names |= {
            alias.asname or alias.name
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        }
        if names & ENGINE_SPECIFIC:
            found[path.relative_to(package.parent).as_posix()] = names & ENGINE_SPECIFIC
    return found


def test_only_the_session_builds_an_engine():
    assert users() == {"batchgen/job/session.py": {"Batcher", "build_engine", "choose_engine"}}
