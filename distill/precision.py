"""Which precision the pipeline computes in: bf16 autocast where the hardware runs bf16 natively,
fp32 everywhere else, or whatever `run.precision` forces.

Why not always bf16: on a CPU without native bf16 instructions (AVX512-BF16 or AMX), bf16 matrix
products are emulated. Measured on a 2-core AMD EPYC with AVX2 only: a bf16 matmul at the demo's
shapes took 2x the fp32 time, and a forward and backward of the demo teacher under bf16 autocast 28x
(138 s against 4.9 s). So the choice follows the hardware, and the reason is printed with it.

The effective precision (never the `auto` setting) goes into the fingerprint of every stage whose
results depend on it, so a run dir made under one precision is not silently mixed with another.
"""

from __future__ import annotations

import enum
import os
import platform
from dataclasses import dataclass
from pathlib import Path


class Precision(str, enum.Enum):
    AUTO = "auto"  # chosen by the hardware (below)
    BF16 = "bf16"  # bf16 autocast around forward passes; weights and optimizer state stay fp32
    FP32 = "fp32"


@dataclass(frozen=True)
class PrecisionChoice:
    precision: Precision  # BF16 or FP32, never AUTO
    reason: str

    @property
    def mixed_precision(self) -> str:
        """The value accelerate's `Accelerator(mixed_precision=...)` takes."""
        return "bf16" if self.precision is Precision.BF16 else "no"

    def describe(self) -> str:
        return f"precision {self.precision.value} ({self.reason})"


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below the first one with bf16 dot products, AVX512_CORE_BF16:
# with one of these set, oneDNN emulates bf16 even on hardware that has it
_ONEDNN_CAPS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bf16 matrix products natively, as PyTorch will run them, and why."""
    import torch  # here, not at the top: the config imports Precision before any heavy import

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"no native bf16 detection on {platform.machine()}; set run.precision=bf16 to force it"
    flags = sorted(set(_NATIVE_BF16_FLAGS) & _cpu_flags())
    if not flags:
        return False, "CPU without AVX512-BF16 or AMX: bf16 would be emulated, about 2x slower than fp32"
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa_cap in _ONEDNN_CAPS_WITHOUT_BF16:
        return False, f"ONEDNN_MAX_CPU_ISA={isa_cap} hides the CPU's {'/'.join(flags)}: bf16 would be emulated"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return False, f"PyTorch runs its CPU kernels at {capability} (ATEN_CPU_CAPABILITY): bf16 would be emulated"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False, "oneDNN reports no bf16 support on this CPU"
    return True, f"CPU with native bf16 ({', '.join(flags)})"


def choose_precision(setting: Precision | str, device) -> PrecisionChoice:
    """The effective precision for `setting` on `device` (a torch.device or its name): forced, or
    chosen by the hardware."""
    import torch

    setting = Precision(setting)
    if setting is not Precision.AUTO:
        return PrecisionChoice(setting, "forced by run.precision")
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return PrecisionChoice(Precision.BF16, f"{torch.cuda.get_device_name(device)} computes bf16 natively")
        return PrecisionChoice(Precision.FP32, f"{torch.cuda.get_device_name(device)} has no bf16")
    if device.type == "cpu":
        native, reason = cpu_bf16_support()
        return PrecisionChoice(Precision.BF16 if native else Precision.FP32, reason)
    return PrecisionChoice(Precision.FP32, f"no bf16 detection for {device.type} devices")


def cpu_model() -> str:
    """The CPU's model name (what `lscpu` calls it), for timings and logs."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()
