"""Third-party noise: torchao's import-time warnings, which transformers triggers wherever
torchao is installed, reach no one who imports batchgen."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TORCHAO_LINES = ("Failed to load", "is an Enum subclass", "Detected no triton")


def _stderr(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_torchaos_import_warnings_are_kept_from_batchgen_users(unavailable):
    if importlib.util.find_spec("torchao") is None:
        unavailable("torchao is not installed (make install installs it with the dev extra)")
    # from_pretrained imports transformers' quantizer registry, which imports torchao; Hydra's
    # job configures the root logger, which torchao's Triton warning then reaches.
    models = (
        "import logging\nlogging.basicConfig()\n"
        "from transformers import LlamaForCausalLM\nimport transformers.quantizers"
    )
    # Without batchgen, loading transformers' model classes imports torchao, which says so.
    loud = _stderr(models)
    assert all(line in loud for line in TORCHAO_LINES), loud
    quiet = _stderr(f"import batchgen\n{models}")
    assert not any(line in quiet for line in TORCHAO_LINES), quiet
