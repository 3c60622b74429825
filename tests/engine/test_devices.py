"""Device and dtype: ``model.dtype=auto`` is bf16 on a CPU that computes it natively, fp32 on
one that would emulate it; a folder begun in one dtype keeps it under ``auto``."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from batchgen import run
from batchgen.config import ModelConfig
from batchgen.engine import devices
from batchgen.errors import ResumeError
from batchgen.store import layout

FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nbogomips\t: 4000\n"


@pytest.mark.parametrize(
    "extra,expected",
    [("avx512_bf16", "avx512_bf16"), ("amx_bf16 amx_tile", "amx_bf16"), ("avx512vl", None)],
)
def test_native_bf16_reads_the_cpu_flags(tmp_path, extra, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(FLAGS.format(extra=extra))
    assert devices.native_bf16(cpuinfo) == expected
    assert devices.native_bf16(tmp_path / "missing") is None


@pytest.mark.parametrize("flag,dtype", [("avx512_bf16", "bfloat16"), (None, "float32")])
def test_auto_on_cpu_follows_the_cpu(monkeypatch, flag, dtype):
    monkeypatch.setattr(devices, "native_bf16", lambda: flag)
    cfg = ModelConfig(device="cpu")
    assert devices.resolve_device_dtype(cfg) == ("cpu", dtype)
    assert devices.resolve_device_dtype(ModelConfig(device="cpu", dtype="float32"))[1] == "float32"
    reason = devices.dtype_reason(cfg, "cpu", dtype)
    assert (flag in reason) if flag else "no native bf16" in reason


def rows(out):
    return [r for f in sorted(out.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_a_folder_begun_in_fp32_resumes_in_fp32_under_auto(
    tiny_models, prompts_file, make_job, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    monkeypatch.setattr(devices, "native_bf16", lambda: None)  # a CPU without bf16
    run(make_job(tiny_models["chat"], prompts_file, out))
    before = rows(out)
    assert (
        json.loads(layout.run_file(out).read_text())["fingerprint_parts"]["model"]["dtype"]
        == "float32"
    )
    (out / "part-00001.parquet").unlink()
    capsys.readouterr()
    monkeypatch.setattr(devices, "native_bf16", lambda: "amx_bf16")  # the same folder, moved
    run(make_job(tiny_models["chat"], prompts_file, out))
    said = capsys.readouterr().out
    assert (
        "model.dtype=auto: this folder's run was begun in float32; resuming it in float32" in said
    )
    assert " on cpu in float32 (auto: the dtype this folder's run was begun in)" in said
    assert rows(out) == before
    with pytest.raises(ResumeError, match="model.dtype: 'float32' -> 'bfloat16'"):
        run(make_job(tiny_models["chat"], prompts_file, out, model__dtype="bfloat16"))


def test_a_new_folder_under_auto_on_a_bf16_cpu_is_bf16(
    tiny_models, prompts_file, make_job, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(devices, "native_bf16", lambda: "avx512_bf16")
    out = tmp_path / "out"
    run(make_job(tiny_models["chat"], prompts_file, out))
    parts = json.loads(layout.run_file(out).read_text())["fingerprint_parts"]
    assert parts["model"]["dtype"] == "bfloat16"
    banner = capsys.readouterr().out.splitlines()[0]
    assert " on cpu in bfloat16 (auto: this CPU computes bf16 natively, avx512_bf16)" in banner
