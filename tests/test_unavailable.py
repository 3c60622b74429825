"""``unavailable``: a test whose real component cannot start skips on a developer's machine and
fails, with the reason, under CI."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "1", " true "])
def test_fails_under_ci(monkeypatch, unavailable, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="cannot start under CI: no Slurm here"):
        unavailable("no Slurm here")


@pytest.mark.parametrize("value", [None, "", "false", "0", "no"])
def test_skips_elsewhere(monkeypatch, unavailable, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match="^no Slurm here$"):
        unavailable("no Slurm here")
