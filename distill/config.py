"""Typed configuration: dataclass schemas, YAML loading, dotted overrides, validation.

OmegaConf merges the YAML file and the `key=value` overrides into the schemas below, which rejects
unknown keys and values of the wrong type (a choice outside its enum included) with the key's path.
Each section then checks what types cannot express (ranges, N < M) in its own `validate`, and
`Config.validate` the rules that tie sections together. Every failure becomes one `DistillError` line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import enum
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill.errors import DistillError
from distill.precision import Precision

# the projections of a Llama-style decoder layer (tests and benchmarks name them; configs need not)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Choice(str, enum.Enum):
    """A config choice: written in YAML as its value, printed as its value, compared by member."""

    def __str__(self) -> str:
        return self.value


class TeacherDtype(Choice):
    AUTO = "auto"  # float32 on CPU, bfloat16 on GPU
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class SourceKind(Choice):
    FILES = "files"  # local .txt, .jsonl/.json, .parquet
    HUB = "hub"  # a Hugging Face dataset
    TEACHER = "teacher"  # text the teacher samples itself


class Criterion(Choice):
    MAGNITUDE = "magnitude"
    WANDA = "wanda"
    SPARSEGPT = "sparsegpt"
    TAYLOR = "taylor"
    FISHER = "fisher"


class PatternKind(Choice):
    NM = "nm"
    BLOCK = "block"
    CHANNEL = "channel"
    UNSTRUCTURED = "unstructured"
    MLP_CHANNELS = "mlp_channels"
    HEADS = "heads"


class ChannelAxis(Choice):
    INPUT = "input"
    OUTPUT = "output"


class Scope(Choice):
    LAYER = "layer"
    GLOBAL = "global"


class Incompatible(Choice):
    ERROR = "error"
    DENSE = "dense"


class MaskMode(Choice):
    FIXED = "fixed"
    DYNAMIC = "dynamic"
    LEARNABLE = "learnable"


class Sharding(Choice):
    DDP = "ddp"
    FSDP = "fsdp"


class Divergence(Choice):
    FORWARD_KL = "forward_kl"
    REVERSE_KL = "reverse_kl"
    JSD = "jsd"


class NonFinite(Choice):
    STOP = "stop"
    SKIP = "skip"


class Allocation(Choice):
    UNIFORM = "uniform"  # every projection input zeroed at the target fraction
    GREEDY = "greedy"  # TEAL: per layer, the inputs whose sparsity costs the layer's output least go further


class HeadSelection(Choice):
    MASS = "mass"  # training-free: the KV heads whose attention falls most inside sink + window stream
    DISTILL = "distill"  # DuoAttention: a gate per KV head trained against the teacher, the lowest gates stream


class TrackingBackend(Choice):
    WANDB = "wandb"
    TENSORBOARD = "tensorboard"
    NONE = "none"


def _positive(path: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise DistillError(f"config key '{path}': {value} must be {bound}")


def _refuse_non_finite(section: Any, where: str) -> None:
    """Every float of a config section (nested sections and lists included) is a finite number: YAML
    reads `.nan` and `.inf` as floats, and nan passes every range check, as no comparison holds for it."""
    for item in dataclasses.fields(section):
        value, path = getattr(section, item.name), f"{where}.{item.name}"
        if dataclasses.is_dataclass(value):
            _refuse_non_finite(value, path)
        elif isinstance(value, list):
            for index, element in enumerate(value):
                if dataclasses.is_dataclass(element):
                    _refuse_non_finite(element, f"{path}[{index}]")
                else:
                    _refuse_nan_or_inf(f"{path}[{index}]", element)
        else:
            _refuse_nan_or_inf(path, value)


def _refuse_nan_or_inf(path: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise DistillError(f"config key '{path}': {value} is not a finite number")


def _within(path: str, value: float, low: float, high: float, closed: str = "[]") -> None:
    """`value` in the interval from `low` to `high`, each end closed ('[' / ']') or open ('(' / ')')."""
    above = value >= low if closed[0] == "[" else value > low
    below = value <= high if closed[1] == "]" else value < high
    if not (above and below):
        raise DistillError(f"config key '{path}': {value} is not in {closed[0]}{low:g}, {high:g}{closed[1]}")


# the run dir's name plus what the pipeline adds beside it (`.<name>.lock`) must fit one path
# component, which most filesystems cap at 255 bytes
MAX_RUN_NAME_BYTES = 255 - len(".") - len(".lock")


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"  # the run dir is <output_dir>/<name>: derived from the config alone
    seed: int = 0
    # auto: bf16 autocast where the hardware computes bf16 natively (CUDA with bf16, CPUs with
    # AVX512-BF16 or AMX), fp32 elsewhere; bf16 or fp32 force it. The effective precision is part of
    # the fingerprint of every stage whose results depend on it (distill.precision)
    precision: Precision = Precision.AUTO
    # how long a rank waits in a collective: ranks wait at a barrier while the main process alone
    # exports and writes the student, which for a large model outlasts NCCL's 10-minute default
    collective_timeout_minutes: int = 60

    def validate(self, where: str = "run") -> None:
        name = self.name
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            raise DistillError(f"config key '{where}.name': {name!r} is not a directory name (no '/', not '.' or '..')")
        if len(name.encode()) > MAX_RUN_NAME_BYTES:
            raise DistillError(f"config key '{where}.name': {len(name.encode())} bytes is longer than the "
                               f"{MAX_RUN_NAME_BYTES} a directory name can hold here; shorten it")
        _positive(f"{where}.collective_timeout_minutes", self.collective_timeout_minutes)


@dataclass
class TeacherConfig:
    # "demo" (SmolLM2-135M-Instruct from PyPI), a hub id, a save_pretrained dir, or a .gguf file
    source: str = "demo"
    gguf_file: Optional[str] = None  # a GGUF file name inside `source` when `source` is a dir or hub id
    revision: Optional[str] = None
    dtype: TeacherDtype = TeacherDtype.AUTO

    def validate(self, where: str = "teacher") -> None:
        pass  # every field is checked by its type


@dataclass
class TeacherSamplesConfig:
    """Text the teacher writes itself (data-free distillation)."""

    num_sequences: int = 64
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0: sample from the whole vocabulary
    batch_size: int = 16

    def validate(self, where: str) -> None:
        for key in ("num_sequences", "max_new_tokens", "temperature", "batch_size"):
            _positive(f"{where}.{key}", getattr(self, key))
        _positive(f"{where}.top_k", self.top_k, allow_zero=True)


@dataclass
class SourceConfig:
    name: str = MISSING  # key of this source in reports
    kind: SourceKind = MISSING
    files: List[str] = field(default_factory=list)  # kind=files: .txt, .jsonl/.json, .parquet
    dataset: Optional[str] = None  # kind=hub: dataset id
    subset: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    samples: TeacherSamplesConfig = field(default_factory=TeacherSamplesConfig)
    heldout_fraction: float = 0.1  # the last blocks of the source; 1.0 makes it evaluation-only
    max_blocks: int = 0  # 0: every block

    def validate(self, where: str) -> None:
        if self.kind is SourceKind.FILES and not self.files:
            raise DistillError(f"config key '{where}.files': a files source needs at least one file")
        if self.kind is SourceKind.HUB and not self.dataset:
            raise DistillError(f"config key '{where}.dataset': a hub source needs a dataset id")
        _within(f"{where}.heldout_fraction", self.heldout_fraction, 0.0, 1.0)
        _positive(f"{where}.max_blocks", self.max_blocks, allow_zero=True)
        if self.kind is SourceKind.TEACHER:
            self.samples.validate(f"{where}.samples")


@dataclass
class DataConfig:
    block_size: int = 128
    sources: List[SourceConfig] = field(default_factory=list)
    max_heldout_blocks: int = 64  # per source

    def validate(self, where: str = "data") -> None:
        _positive(f"{where}.block_size", self.block_size)
        _positive(f"{where}.max_heldout_blocks", self.max_heldout_blocks, allow_zero=True)
        names = [source.name for source in self.sources]
        if not names:
            raise DistillError(f"config key '{where}.sources': at least one text source is needed")
        if len(set(names)) != len(names):
            raise DistillError(f"config key '{where}.sources': source names must be unique, got {names}")
        for index, source in enumerate(self.sources):
            source.validate(f"{where}.sources[{index}]")
        if all(source.heldout_fraction == 1.0 for source in self.sources):
            raise DistillError(f"config key '{where}.sources': every source is held out, nothing is left to train on")


@dataclass
class CalibrationConfig:
    num_blocks: int = 32  # training blocks the teacher sees to gather activation statistics
    # blocks per teacher forward in the teacher stage (statistics, held-out perplexity); before this
    # key existed the stage used 4, which run dirs of that time are read as (distill.run.pipeline)
    batch_size: int = 4

    def validate(self, where: str = "calibration") -> None:
        _positive(f"{where}.num_blocks", self.num_blocks)
        _positive(f"{where}.batch_size", self.batch_size)


@dataclass
class PruneConfig:
    criterion: Criterion = Criterion.WANDA
    # only 2:4 (nm, n=2, m=4) runs on sparse kernels; mlp_channels and heads remove whole channels /
    # head groups across their projections
    pattern: PatternKind = PatternKind.NM
    n: int = 2  # nm: keep n weights ...
    m: int = 4  # ... in every group of m consecutive input weights
    sparsity: float = 0.5  # block, channel, unstructured, mlp_channels, heads: fraction removed per layer
    block: int = 4  # block: b x b tiles
    channel_axis: ChannelAxis = ChannelAxis.INPUT  # channel: remove input columns or output rows
    scope: Scope = Scope.LAYER  # unstructured: the fraction per layer, or over all layers at once (global)
    # which decoder projections to prune (distill.targets): names or globs matched against a
    # projection's last name (q_proj), its path in the layer (mlp.*) or its full name; "*" is every
    # linear projection inside the decoder layers. `exclude` removes from that set.
    targets: List[str] = field(default_factory=lambda: ["*"])
    exclude: List[str] = field(default_factory=list)
    incompatible: Incompatible = Incompatible.ERROR  # a target whose input size is not a multiple of m
    # nm: reorder each gated MLP's intermediate channels (function unchanged) so down_proj's groups keep
    # more score, by `permute_sweeps` sweeps of pairwise group exchanges (distill.sparsity.permutation)
    permute: bool = False
    permute_sweeps: int = 100

    def validate(self, where: str = "prune") -> None:
        for key in ("m", "n", "block", "permute_sweeps"):
            _positive(f"{where}.{key}", getattr(self, key))
        if self.n >= self.m:
            raise DistillError(f"config key '{where}.n': N:M sparsity needs N < M, got {self.n}:{self.m}")
        _within(f"{where}.sparsity", self.sparsity, 0.0, 1.0, "()")
        if self.permute and self.pattern is not PatternKind.NM:
            raise DistillError(f"config key '{where}.permute': channel permutation serves N:M patterns, not '{self.pattern}'")
        if self.criterion is Criterion.SPARSEGPT and self.pattern is not PatternKind.NM:
            raise DistillError(f"config key '{where}.criterion': sparsegpt prunes N:M patterns only, not '{self.pattern}'")
        if self.scope is Scope.GLOBAL and (self.pattern is not PatternKind.UNSTRUCTURED or self.criterion is Criterion.MAGNITUDE):
            raise DistillError(f"config key '{where}.scope': global needs pattern unstructured and a criterion whose "
                               "scores compare across layers (wanda, taylor, fisher)")
        if not self.targets:
            raise DistillError(f"config key '{where}.targets': name at least one projection to prune (\"*\" for all)")


@dataclass
class ActivationsConfig:
    """Activation sparsity (distill.sparsity.activations): projection inputs below a calibrated
    magnitude become zero in the student, thresholds calibrated on the one-shot student in the prune
    stage, trained under in distill, and exported with the packed student."""

    target: float = 0.0  # fraction of projection inputs zeroed, model-wide; 0 keeps activations dense
    allocation: Allocation = Allocation.UNIFORM
    # which projection inputs: names or globs of the projections reading them, matched as prune.targets
    # (a shared input, like q/k/v's, is thresholded when any of its projections is named)
    where: List[str] = field(default_factory=lambda: ["*"])
    greedy_step: float = 0.1  # greedy: how much sparsity one step of the allocation adds to one input
    # greedy: calibration blocks the layer output error is measured on (0: all of them). Every step
    # of the allocation runs each layer once per input over them, so they set its cost: all 32 blocks
    # of 256 tokens took over 40 minutes on 2 CPU cores for the demo teacher
    greedy_blocks: int = 0
    straight_through: bool = False  # distill: gradients reach the zeroed entries too, as if kept
    recalibrate_every: int = 0  # distill: re-calibrate the thresholds to the moving student every k steps; 0 keeps them
    # distill: each input's zeroed fraction rises linearly from 0 to its allocation over the first k
    # steps, moved at each re-calibration (so it needs recalibrate_every); 0 trains at the allocation from the start
    ramp_steps: int = 0

    @property
    def enabled(self) -> bool:
        return self.target > 0

    def validate(self, where: str = "activations") -> None:
        _within(f"{where}.target", self.target, 0.0, 1.0, "[)")
        _within(f"{where}.greedy_step", self.greedy_step, 0.0, 1.0, "(]")
        _positive(f"{where}.greedy_blocks", self.greedy_blocks, allow_zero=True)
        _positive(f"{where}.recalibrate_every", self.recalibrate_every, allow_zero=True)
        _positive(f"{where}.ramp_steps", self.ramp_steps, allow_zero=True)
        if self.ramp_steps and not self.recalibrate_every:
            raise DistillError(f"config key '{where}.ramp_steps': the ramp moves the thresholds when they are "
                               f"re-calibrated; set {where}.recalibrate_every too")
        if not self.where:
            raise DistillError(f"config key '{where}.where': name at least one projection input (\"*\" for all)")


@dataclass
class AttentionConfig:
    """Attention sparsity (distill.sparsity.attention): a fraction of the student's KV heads attend
    only to the first `sink` tokens and the last `window` ones (StreamingLLM, DuoAttention). The heads
    are chosen in the prune stage, trained with in distill, and exported with the student."""

    streaming_fraction: float = 0.0  # of all KV heads, model-wide; 0 keeps every head full
    sink: int = 4  # first tokens every streaming head keeps (attention sinks)
    window: int = 256  # most recent tokens every streaming head keeps, the current one included
    select: HeadSelection = HeadSelection.MASS
    # select=distill: the gates' training on calibration text against the teacher (the student's
    # weights frozen): optimizer steps, blocks per step, AdamW learning rate, and the L1 weight that
    # pushes every gate towards streaming
    gate_steps: int = 20
    gate_batch_size: int = 2
    gate_lr: float = 0.02
    gate_penalty: float = 0.05
    measure_blocks: int = 4  # select=mass: calibration blocks the attention mass is measured on

    @property
    def enabled(self) -> bool:
        return self.streaming_fraction > 0

    def validate(self, where: str = "attention") -> None:
        _within(f"{where}.streaming_fraction", self.streaming_fraction, 0.0, 1.0, "[]")
        _positive(f"{where}.sink", self.sink, allow_zero=True)
        _positive(f"{where}.window", self.window)
        _positive(f"{where}.gate_steps", self.gate_steps)
        _positive(f"{where}.gate_batch_size", self.gate_batch_size)
        _positive(f"{where}.gate_lr", self.gate_lr)
        _positive(f"{where}.gate_penalty", self.gate_penalty, allow_zero=True)
        _positive(f"{where}.measure_blocks", self.measure_blocks)


@dataclass
class LossConfig:
    divergence: Divergence = Divergence.FORWARD_KL  # to the teacher, at `temperature`
    temperature: float = 1.0
    jsd_beta: float = 0.5  # jsd: weight of the teacher in the mixture
    kd_weight: float = 1.0  # weight of the divergence, which is scaled by T^2
    lm_weight: float = 0.0  # next-token cross-entropy on the training text
    hidden_weight: float = 0.0  # normalized MSE between every decoder layer's output, student vs teacher
    # positions per chunk of the loss, computed with the output projections and recomputed in backward
    # so no batch-sized logits tensor exists; 0 computes full logits (needed for heads with extras
    # such as logit soft-capping)
    chunk_tokens: int = 1024
    # > 0: the teacher_logits stage caches the teacher's `teacher_topk` most likely tokens per training
    # position (all ranks share the work) and distill compares on those k tokens plus "any other",
    # without running the teacher; needs temperature 1 and no hidden-state matching
    teacher_topk: int = 0

    def validate(self, where: str = "train.loss") -> None:
        _within(f"{where}.jsd_beta", self.jsd_beta, 0.0, 1.0, "()")
        _positive(f"{where}.chunk_tokens", self.chunk_tokens, allow_zero=True)
        _positive(f"{where}.teacher_topk", self.teacher_topk, allow_zero=True)
        if self.teacher_topk and self.temperature != 1.0:
            raise DistillError(f"config key '{where}.temperature': the cached teacher ({where}.teacher_topk) is "
                               f"stored at temperature 1, got {self.temperature}")
        if self.teacher_topk and self.hidden_weight:
            raise DistillError(f"config key '{where}.hidden_weight': hidden-state matching needs the live teacher; "
                               f"set {where}.teacher_topk=0")
        _positive(f"{where}.temperature", self.temperature)
        for key in ("kd_weight", "lm_weight", "hidden_weight"):
            _positive(f"{where}.{key}", getattr(self, key), allow_zero=True)
        if self.kd_weight == 0 and self.lm_weight == 0 and self.hidden_weight == 0:
            raise DistillError(f"config key '{where}': kd_weight, lm_weight and hidden_weight are all 0, nothing to train on")


@dataclass
class MasksConfig:
    """How the masks behave during distill (distill.sparsity.masks.modes)."""

    # fixed: the prune stage's masks; dynamic: re-chosen (same pattern, by Wanda's score on the
    # current weights, |W| for a magnitude student) every `update_every` steps, gradients reaching
    # pruned weights through a sparse-refined STE; learnable: a Gumbel-softmax choice per group among
    # the N:M candidate patterns
    mode: MaskMode = MaskMode.FIXED
    update_every: int = 10
    refine_decay: float = 2.0e-4  # dynamic: SR-STE pull of pruned weights towards zero
    # learnable: every group picks one of the C(m, n) candidate patterns through Gumbel-softmax logits,
    # initialised to favour the prune stage's choice by `init_logit`, trained at `lr`; the Gumbel noise
    # is scaled by `noise` at the first step, falling linearly to 0 at the last (0.5 at init 3.0
    # redraws ~1% of groups at the start; 1.0 redraws ~20%, which wrecked the student)
    lr: float = 0.05
    init_logit: float = 3.0
    gumbel_temperature: float = 1.0
    noise: float = 0.5

    def validate(self, where: str = "train.masks") -> None:
        _positive(f"{where}.update_every", self.update_every)
        _positive(f"{where}.refine_decay", self.refine_decay, allow_zero=True)
        _positive(f"{where}.lr", self.lr)
        _positive(f"{where}.gumbel_temperature", self.gumbel_temperature)
        _positive(f"{where}.noise", self.noise, allow_zero=True)



@dataclass
class TrainConfig:
    steps: int = 100
    global_batch_size: int = 8  # blocks per optimizer step, over all processes and accumulation
    micro_batch_size: int = 4  # blocks per forward pass on one process
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    max_grad_norm: float = 1.0  # 0 disables clipping
    masks: MasksConfig = field(default_factory=MasksConfig)
    group_lasso: float = 0.0  # weight of the sum of the pattern's group norms (pushes whole groups to zero)
    group_dropout: float = 0.0  # probability of dropping each whole group of the pattern in a forward
    # ddp: every process holds the whole student (accelerate's DDP); fsdp: parameters, gradients,
    # optimizer state sharded over the processes (torch FSDP2, distill.train.sharding); fixed masks
    sharding: Sharding = Sharding.DDP
    log_every: int = 5
    # a non-finite loss or gradient norm: stop (exit with one line naming the step and the last good
    # checkpoint, which is kept; checked at log steps, so no extra host sync) or skip (drop that step's
    # update and count it; checked every step)
    on_nonfinite: NonFinite = NonFinite.STOP
    # perplexity of the student on the held-out blocks every `eval_every` steps (a multiple of
    # log_every; 0: never), logged as `heldout_ppl`: the recovery curve
    eval_every: int = 0
    checkpoint_every: int = 25  # a multiple of log_every, so a resumed run logs the same averages
    keep_checkpoints: int = 2
    loss: LossConfig = field(default_factory=LossConfig)

    def per_projection_features(self) -> list[str]:
        """The features in use that act on a projection's whole mask (not possible on a shard of it,
        nor on groups that span several projections)."""
        used = (("masks.mode", self.masks.mode is not MaskMode.FIXED), ("group_lasso", self.group_lasso),
                ("group_dropout", self.group_dropout))
        return [key for key, on in used if on]

    def validate(self, where: str = "train") -> None:
        for key in ("steps", "micro_batch_size", "global_batch_size", "lr", "log_every", "checkpoint_every",
                    "keep_checkpoints"):
            _positive(f"{where}.{key}", getattr(self, key))
        for key in ("warmup_steps", "group_lasso", "eval_every", "max_grad_norm", "weight_decay"):
            _positive(f"{where}.{key}", getattr(self, key), allow_zero=True)
        _within(f"{where}.group_dropout", self.group_dropout, 0.0, 1.0, "[)")
        _within(f"{where}.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if len(self.betas) != 2:
            raise DistillError(f"config key '{where}.betas': needs two values, got {len(self.betas)}")
        for index, beta in enumerate(self.betas):  # Adam's decay rates of its two moment averages
            _within(f"{where}.betas[{index}]", beta, 0.0, 1.0, "[)")
        self.masks.validate(f"{where}.masks")
        if self.sharding is Sharding.FSDP and self.per_projection_features():
            raise DistillError(f"config key '{where}.sharding': fsdp trains fixed masks only; "
                               f"unset {where}.{self.per_projection_features()[0]} or use ddp")
        # a resumed run logs the same windows as an uninterrupted one
        for key in ("eval_every", "checkpoint_every"):
            if getattr(self, key) % self.log_every:
                raise DistillError(f"config key '{where}.{key}': {getattr(self, key)} is not a multiple of "
                                   f"{where}.log_every ({self.log_every})")
        if self.global_batch_size % self.micro_batch_size:
            raise DistillError(f"config key '{where}.global_batch_size': {self.global_batch_size} is not a multiple "
                               f"of {where}.micro_batch_size ({self.micro_batch_size})")
        self.loss.validate(f"{where}.loss")


@dataclass
class SpeedConfig:
    """How fast the distill stage runs, never what it computes: no stage's fingerprint includes these,
    so they may change between a run and its resume."""

    activation_checkpointing: bool = False  # recompute each decoder layer in backward: less memory, ~1/3 more compute
    compile: bool = False  # torch.compile every decoder layer of student and teacher (the loss stays eager)
    # bf16 matrix-product peak of one device in TFLOP/s, for the logged MFU; 0 measures it at the start
    # on CUDA (a large matrix product) and logs no MFU on CPU
    peak_tflops: float = 0.0

    def validate(self, where: str = "speed") -> None:
        _positive(f"{where}.peak_tflops", self.peak_tflops, allow_zero=True)


@dataclass
class ExportConfig:
    # on CUDA, the student runs on PyTorch's 2:4 kernels and its logits are compared to the dense
    # model's; this is the largest relative error accepted
    kernel_tolerance: float = 0.05
    # mlp_channels and heads: cut the removed channels / heads out, so hf/ is a smaller dense model
    # (its config says how much smaller); false exports dense-with-zeros
    shrink: bool = True
    # a hub model repo id: after the export is verified, upload export/packed (export/hf when there is
    # no packed form) there with huggingface_hub; off by default
    push_to_hub: Optional[str] = None

    def validate(self, where: str = "export") -> None:
        _positive(f"{where}.kernel_tolerance", self.kernel_tolerance)


@dataclass
class LmEvalConfig:
    """Zero-shot accuracy from lm-evaluation-harness (the optional extra `pip install -e '.[eval]'`)."""

    tasks: List[str] = field(default_factory=list)  # lm-eval task names (registry or include_path); empty: none
    include_path: Optional[str] = None  # a directory of local task YAMLs
    batch_size: int = 8
    limit: int = 0  # documents per task; 0: all

    def validate(self, where: str = "eval.lm_eval") -> None:
        _positive(f"{where}.batch_size", self.batch_size)
        _positive(f"{where}.limit", self.limit, allow_zero=True)
        if self.tasks and importlib.util.find_spec("lm_eval") is None:
            raise DistillError(f"config key '{where}.tasks': needs lm-evaluation-harness, the optional extra: "
                               "pip install -e '.[eval]'")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise DistillError(f"config key '{where}.include_path': {self.include_path} is not a directory")


@dataclass
class EvalConfig:
    files: List[str] = field(default_factory=list)  # extra plain-text files, keyed by file stem
    block_size: int = 512
    max_blocks: int = 32  # per file; 0: the whole file
    batch_size: int = 4
    # the teacher's held-out perplexity under training-free activation sparsity at these uniform
    # fractions, in the report (empty: not measured)
    activation_levels: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.4, 0.5, 0.6, 0.7])
    # held-out blocks (of the first eval set) on which each model's attention is measured per KV head
    # (mass inside attention.sink + attention.window, small probabilities, entropy); 0: not measured
    attention_blocks: int = 1
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)

    def validate(self, where: str = "eval") -> None:
        for level in self.activation_levels:
            _within(f"{where}.activation_levels", level, 0.0, 1.0, "[)")
        _positive(f"{where}.block_size", self.block_size)
        _positive(f"{where}.max_blocks", self.max_blocks, allow_zero=True)
        _positive(f"{where}.batch_size", self.batch_size)
        _positive(f"{where}.attention_blocks", self.attention_blocks, allow_zero=True)
        self.lm_eval.validate(f"{where}.lm_eval")


@dataclass
class TrackingConfig:
    backend: TrackingBackend = TrackingBackend.NONE
    # WANDB_PROJECT wins when set. tensorboard writes under <run_dir>/logs/<project>: a relative project
    # stays inside the run dir, an absolute one is a place the user chose
    project: str = "distill"

    def validate(self, where: str = "tracking") -> None:
        if not self.project or "\0" in self.project:
            raise DistillError(f"config key '{where}.project': {self.project!r} is not a project name")
        if not Path(self.project).is_absolute() and ".." in Path(self.project).parts:
            raise DistillError(f"config key '{where}.project': {self.project!r} climbs out of the run dir with '..'; "
                               f"name a project (or an absolute dir for tensorboard) instead")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def validate(self) -> None:
        """Every float is finite, every section checks itself; then the rules that tie sections together."""
        for section in dataclasses.fields(self):
            _refuse_non_finite(getattr(self, section.name), section.name)
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate(section.name)
        prune, train = self.prune, self.train
        if train.masks.mode is MaskMode.LEARNABLE and prune.pattern is not PatternKind.NM:
            raise DistillError(f"config key 'train.masks.mode': learnable masks choose among N:M patterns, "
                               f"not '{prune.pattern}'")
        per_projection = train.per_projection_features()
        if prune.pattern in (PatternKind.MLP_CHANNELS, PatternKind.HEADS) and per_projection:
            raise DistillError(f"config key 'train.{per_projection[0]}': not available with prune.pattern={prune.pattern} "
                               f"(its groups span several projections); use fixed masks")
        if train.masks.mode is MaskMode.DYNAMIC and prune.scope is Scope.GLOBAL:
            raise DistillError("config key 'train.masks.mode': dynamic masks are re-chosen per layer; use prune.scope=layer")
        attention = self.attention
        if attention.enabled and self.data.block_size <= attention.sink + attention.window:
            raise DistillError(f"config key 'attention.window': streaming heads keep {attention.sink} + {attention.window} "
                               f"tokens, the whole of a {self.data.block_size}-token training block, so choosing and "
                               "training them would change nothing; raise data.block_size or lower attention.window")
        if attention.enabled and prune.pattern is PatternKind.HEADS:
            raise DistillError("config key 'attention.streaming_fraction': streaming heads are chosen per KV head, and "
                               "prune.pattern=heads removes heads; use one of the two")


def _field_types(schema: type) -> dict[str, Any]:
    """The resolved type of every field of a dataclass (its annotations are strings here)."""
    return typing.get_type_hints(schema)


def _type_at(path: str) -> Any:
    """The schema type of a dotted config path (list indices allowed), or None when unknown."""
    kind: Any = Config
    for part in path.replace("[", ".").replace("]", "").split("."):
        if part.isdigit():
            kind = typing.get_args(kind)[0] if typing.get_args(kind) else None
        elif dataclasses.is_dataclass(kind):
            kind = _field_types(kind).get(part)
        else:
            return None
    return kind


def _one_line(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    kind = _type_at(key) if key else None
    if isinstance(kind, type) and issubclass(kind, Choice):  # name the choices as they are written
        value = getattr(error, "msg", str(error)).split("'")[1] if "'" in str(error) else "?"
        return f"config key '{key}': '{value}' is not one of {', '.join(choice.value for choice in kind)}"
    message = str(error).splitlines()[0]
    return f"config key '{key}': {message}" if key else f"config: {message}"


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise DistillError(f"override '{text}' is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as error:
        raise DistillError(f"override '{text}': value is not valid YAML ({error.__class__.__name__})")
    return key, value


def load_config(path: str | Path, overrides: List[str] | None = None) -> Config:
    """Read a YAML config, apply dotted `key=value` overrides, validate, and return the typed Config."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise DistillError(f"config file {path} is not a YAML text file: not UTF-8 (byte offset {error.start})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "malformed YAML"
        raise DistillError(f"config file {path} is not valid YAML{where}: {problem}")
    if not isinstance(raw, dict):
        raise DistillError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    return config_from_dict(raw, overrides)


def _check_keys(raw: Any, schema: type, path: str) -> None:
    """Name unknown keys with their full path, list indices included (OmegaConf loses the path
    inside lists of structured configs)."""
    if not isinstance(raw, dict):
        return
    fields = _field_types(schema)
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise DistillError(f"config key '{where}': unknown key (known: {', '.join(fields)})")
        kind = fields[key]
        inner = (typing.get_args(kind) or (None,))[0]
        if dataclasses.is_dataclass(kind):
            _check_keys(value, kind, where)
        elif dataclasses.is_dataclass(inner) and isinstance(value, list):
            for index, item in enumerate(value):
                _check_keys(item, inner, f"{where}[{index}]")
                try:  # type errors, named with the item's path
                    OmegaConf.merge(OmegaConf.structured(inner), OmegaConf.create(item))
                except OmegaConfBaseException as error:
                    error.full_key = f"{where}[{index}].{getattr(error, 'full_key', '') or ''}"
                    raise DistillError(_one_line(error)) from None


def config_from_dict(raw: dict, overrides: List[str] | None = None) -> Config:
    _check_keys(raw, Config, "")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(raw))
        for text in overrides or []:
            key, value = _parse_override(text)
            OmegaConf.update(merged, key, value, merge=True)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise DistillError(f"config key '{missing[0]}' is required but not set")
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise DistillError(_one_line(error)) from None
    config.validate()
    return config


def _plain(pairs: list[tuple[str, Any]]) -> dict:
    return {key: value.value if isinstance(value, enum.Enum) else value for key, value in pairs}


def to_dict(config: Any) -> dict:
    """The config as plain data (choices as their string values), for YAML and fingerprints."""
    return dataclasses.asdict(config, dict_factory=_plain)


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def validate(config: Config) -> None:
    """Check a Config built in code (load_config does this itself)."""
    config.validate()


def check_input_paths(config: Config) -> None:
    """Fail before any work when a named input file is missing, or a text file is empty or binary."""
    named = [(f"data.sources[{index}].files", path) for index, source in enumerate(config.data.sources)
             for path in source.files] + [("eval.files", path) for path in config.eval.files]
    for key, path in named:
        if not Path(path).is_file():
            raise DistillError(f"config key '{key}': file not found: {path}")
        if Path(path).suffix in (".txt", ".text"):
            try:
                check_text_file(Path(path))
            except DistillError as error:
                raise DistillError(f"config key '{key}': {error}") from None


def check_text_file(path: Path, prefix_bytes: int = 1 << 20) -> None:
    """Refuse, in one line, a text file that is empty or not UTF-8 text (judged on its first MiB;
    a later bad byte is reported by the reader)."""
    with open(path, "rb") as handle:
        head = handle.read(prefix_bytes)
    if not head.strip():
        raise DistillError(f"data file {path} holds no text (it is empty or only whitespace)")
    if b"\0" in head:
        offset = head.index(b"\0")
        raise DistillError(f"data file {path} is binary, not text (a NUL byte at offset {offset})")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # not merely a character cut at the end of the prefix
            raise DistillError(f"data file {path} is not UTF-8 text (byte offset {error.start})") from None

