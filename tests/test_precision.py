"""The precision the pipeline computes in: forced by run.precision, or chosen by the hardware, with
the reason said; bf16 only where the CPU computes it natively."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.run.config_file import config_from_dict
from distill.errors import DistillError
from distill.precision import Precision, choose_precision, cpu_bf16_support


def _has_native_bf16_flags() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and any(flag in cpuinfo.read_text() for flag in (" avx512_bf16", " amx_bf16"))


@pytest.mark.parametrize("setting", ["bf16", "fp32"])
def test_a_forced_precision_is_kept_on_every_device(setting):
    for device in ("cpu", "cuda"):
        choice = choose_precision(setting, device)
        assert choice.precision is Precision(setting) and choice.reason == "forced by run.precision"
        assert choice.mixed_precision == ("bf16" if setting == "bf16" else "no")


def test_auto_on_cpu_follows_the_native_bf16_instructions():
    choice = choose_precision("auto", "cpu")
    native, reason = cpu_bf16_support()
    assert choice.precision is (Precision.BF16 if native else Precision.FP32) and choice.reason == reason
    if not _has_native_bf16_flags():
        assert choice.precision is Precision.FP32, "a CPU without AVX512-BF16 or AMX must not get bf16"
    assert choice.describe().startswith(f"precision {choice.precision.value} (")


def test_an_isa_cap_that_hides_bf16_gives_fp32_and_says_why(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    choice = choose_precision("auto", "cpu")
    assert choice.precision is Precision.FP32
    if _has_native_bf16_flags():
        assert "ONEDNN_MAX_CPU_ISA=AVX2" in choice.reason


def test_the_config_takes_the_choices_and_refuses_others():
    raw = {"data": {"sources": [{"name": "a", "kind": "teacher"}]}}
    assert config_from_dict(raw).run.precision is Precision.AUTO
    assert config_from_dict(raw, ["run.precision=fp32"]).run.precision is Precision.FP32
    with pytest.raises(DistillError, match="config key 'run.precision'"):
        config_from_dict(raw, ["run.precision=fp16"])
