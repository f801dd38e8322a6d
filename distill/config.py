"""Typed configuration: the Config composed of its sections, and the rules that cross sections.

Each kind of sparsity owns its section, next to its code: `prune` (distill.sparsity.prune_config),
`train.masks` (distill.sparsity.masks_config), `activations` (distill.sparsity.activations_config),
`attention` (distill.sparsity.attention_config); `train.loss` is distill.sections' LossConfig. The
other sections are here. Every section checks itself when built (distill.sections.Section), and
`Config` the rules that tie sections together.

distill.run.config_file reads a YAML file and its overrides into the Config; distill.data.files checks
the data files it names.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import MISSING

from distill.errors import DistillError
from distill.precision import Precision
from distill.sections import Choice, LossConfig, Section, positive, refuse_non_finite, within
from distill.sparsity.activations_config import ActivationsConfig
from distill.sparsity.attention_config import AttentionConfig
from distill.sparsity.masks_config import MaskMode, MasksConfig
from distill.sparsity.prune_config import PatternKind, PruneConfig, Scope

# the projections of a Llama-style decoder layer (tests and benchmarks name them; configs need not)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TeacherDtype(Choice):
    AUTO = "auto"  # float32 on CPU, bfloat16 on GPU
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class SourceKind(Choice):
    FILES = "files"  # local .txt, .jsonl/.json, .parquet
    HUB = "hub"  # a Hugging Face dataset
    TEACHER = "teacher"  # text the teacher samples itself


class Sharding(Choice):
    DDP = "ddp"
    FSDP = "fsdp"


class OptimizerState(Choice):
    FP32 = "fp32"
    BF16 = "bf16"


class NonFinite(Choice):
    STOP = "stop"
    SKIP = "skip"


class TrackingBackend(Choice):
    WANDB = "wandb"
    TENSORBOARD = "tensorboard"
    NONE = "none"


# the run dir's name plus what the pipeline adds beside it (`.<name>.lock`) must fit one path
# component, which most filesystems cap at 255 bytes
MAX_RUN_NAME_BYTES = 255 - len(".") - len(".lock")


@dataclass
class RunConfig(Section):
    KEY = "run"

    name: str = "run"  # the run dir's name under output_dir
    output_dir: str = "runs"  # the run dir is <output_dir>/<name>: derived from the config alone
    seed: int = 0  # every random draw of the run (data order, teacher samples, masks) follows it
    # auto: bf16 autocast where the hardware computes bf16 natively (CUDA with bf16, CPUs with
    # AVX512-BF16 or AMX), fp32 elsewhere; bf16 or fp32 force it. The effective precision is part of
    # the fingerprint of every stage whose results depend on it (distill.precision)
    precision: Precision = Precision.AUTO
    # how long a rank waits in a collective: ranks wait at a barrier while the main process alone
    # exports and writes the student, which for a large model outlasts NCCL's 10-minute default
    collective_timeout_minutes: int = 60

    def check(self, where: str) -> None:
        name = self.name
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            raise DistillError(f"config key '{where}.name': {name!r} is not a directory name (no '/', not '.' or '..')")
        if len(name.encode()) > MAX_RUN_NAME_BYTES:
            raise DistillError(f"config key '{where}.name': {len(name.encode())} bytes is longer than the "
                               f"{MAX_RUN_NAME_BYTES} a directory name can hold here; shorten it")
        positive(f"{where}.collective_timeout_minutes", self.collective_timeout_minutes)


@dataclass
class TeacherConfig(Section):
    KEY = "teacher"

    # "demo" (SmolLM2-135M-Instruct from PyPI), a hub id, a save_pretrained dir, or a .gguf file
    source: str = "demo"
    gguf_file: Optional[str] = None  # a GGUF file name inside `source` when `source` is a dir or hub id
    revision: Optional[str] = None  # a hub branch, tag or commit of `source`
    dtype: TeacherDtype = TeacherDtype.AUTO


@dataclass
class TeacherSamplesConfig(Section):
    """Text the teacher writes itself (data-free distillation)."""

    KEY = "data.sources[].samples"

    num_sequences: int = 64  # sequences the teacher writes
    max_new_tokens: int = 128  # tokens per sequence at most (a sequence ends early at EOS)
    temperature: float = 1.0  # the sampling temperature
    top_k: int = 0  # 0: sample from the whole vocabulary
    batch_size: int = 16  # sequences written at once

    def check(self, where: str) -> None:
        for key in ("num_sequences", "max_new_tokens", "temperature", "batch_size"):
            positive(f"{where}.{key}", getattr(self, key))
        positive(f"{where}.top_k", self.top_k, allow_zero=True)


@dataclass
class SourceConfig(Section):
    """A source of text: local files, a hub dataset, or text the teacher writes."""

    KEY = "data.sources[]"

    name: str = MISSING  # key of this source in reports
    kind: SourceKind = MISSING
    files: List[str] = field(default_factory=list)  # kind=files: .txt, .jsonl/.json, .parquet
    dataset: Optional[str] = None  # kind=hub: dataset id
    subset: Optional[str] = None  # kind=hub: the dataset's configuration name
    split: str = "train"  # kind=hub: the split to read
    streaming: bool = False  # kind=hub: read the records as a stream instead of downloading the dataset first
    text_field: str = "text"  # the field holding the text in .jsonl/.parquet records and hub datasets
    samples: TeacherSamplesConfig = field(default_factory=TeacherSamplesConfig)
    heldout_fraction: float = 0.1  # the last blocks of the source; 1.0 makes it evaluation-only
    max_blocks: int = 0  # 0: every block

    def check(self, where: str) -> None:
        if self.kind is SourceKind.FILES and not self.files:
            raise DistillError(f"config key '{where}.files': a files source needs at least one file")
        if self.kind is SourceKind.HUB and not self.dataset:
            raise DistillError(f"config key '{where}.dataset': a hub source needs a dataset id")
        if self.streaming and self.kind is not SourceKind.HUB:
            raise DistillError(f"config key '{where}.streaming': only a hub source streams (files are always read "
                               "as a stream, teacher samples are written)")
        within(f"{where}.heldout_fraction", self.heldout_fraction, 0.0, 1.0)
        positive(f"{where}.max_blocks", self.max_blocks, allow_zero=True)
        if self.kind is SourceKind.TEACHER:
            self.samples.validate(f"{where}.samples")


@dataclass
class DataConfig(Section):
    KEY = "data"

    block_size: int = 128  # tokens per training block
    sources: List[SourceConfig] = field(default_factory=list)
    max_heldout_blocks: int = 64  # per source
    shard_blocks: int = 4096  # token blocks per file on disk (they are written and read a shard at a time)

    def check(self, where: str) -> None:
        positive(f"{where}.block_size", self.block_size)
        positive(f"{where}.max_heldout_blocks", self.max_heldout_blocks, allow_zero=True)
        positive(f"{where}.shard_blocks", self.shard_blocks)
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise DistillError(f"config key '{where}.sources': source names must be unique, got {names}")
        for index, source in enumerate(self.sources):
            source.validate(f"{where}.sources[{index}]")
        if self.sources and all(source.heldout_fraction == 1.0 for source in self.sources):
            raise DistillError(f"config key '{where}.sources': every source is held out, nothing is left to train on")


@dataclass
class CalibrationConfig(Section):
    KEY = "calibration"

    num_blocks: int = 32  # training blocks the teacher sees to gather activation statistics
    batch_size: int = 4  # blocks per teacher forward in the teacher stage (statistics, held-out perplexity)

    def check(self, where: str) -> None:
        positive(f"{where}.num_blocks", self.num_blocks)
        positive(f"{where}.batch_size", self.batch_size)


@dataclass
class TrainConfig(Section):
    KEY = "train"

    steps: int = 100  # optimizer steps
    global_batch_size: int = 8  # blocks per optimizer step, over all processes and accumulation
    micro_batch_size: int = 4  # blocks per forward pass on one process
    lr: float = 3e-4  # AdamW's peak learning rate (cosine schedule after warmup)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10  # linear warmup from 0 to lr
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's betas, each in [0, 1)
    # the dtype AdamW stores its two moment averages in: fp32 (16 bytes per trained weight with the
    # weight and its gradient), or bf16 (12 bytes; the update is still computed in fp32)
    optimizer_state: OptimizerState = OptimizerState.FP32
    max_grad_norm: float = 1.0  # 0 disables clipping
    masks: MasksConfig = field(default_factory=MasksConfig)
    group_lasso: float = 0.0  # weight of the sum of the pattern's group norms (pushes whole groups to zero)
    group_dropout: float = 0.0  # probability of dropping each whole group of the pattern in a forward
    # ddp: every process holds the whole student (accelerate's DDP); fsdp: parameters, gradients,
    # optimizer state sharded over the processes (torch FSDP2, distill.train.sharding); fixed masks
    sharding: Sharding = Sharding.DDP
    log_every: int = 5  # steps between logged rows (metrics.jsonl and the trackers)
    # a non-finite loss or gradient norm: stop (exit with one line naming the step and the last good
    # checkpoint, which is kept; checked at log steps, so no extra host sync) or skip (drop that step's
    # update and count it; checked every step)
    on_nonfinite: NonFinite = NonFinite.STOP
    # perplexity of the student on the held-out blocks every `eval_every` steps (a multiple of
    # log_every; 0: never), logged as `heldout_ppl`, with its KL to the teacher as `heldout_kl`: the
    # recovery curve
    eval_every: int = 0
    # the held-out blocks the recovery curve and the report's per-layer error measure: the first ones,
    # sources in name order; the teacher's log-probs of them stay in memory (blocks x length x vocab)
    eval_blocks: int = 8
    checkpoint_every: int = 25  # a multiple of log_every, so a resumed run logs the same averages
    keep_checkpoints: int = 2  # the newest checkpoints kept while distill runs
    loss: LossConfig = field(default_factory=LossConfig)

    def per_projection_features(self) -> list[str]:
        """The features in use that act on a projection's whole mask (not possible on a shard of it,
        nor on groups that span several projections)."""
        used = (("masks.mode", self.masks.mode is not MaskMode.FIXED), ("group_lasso", self.group_lasso),
                ("group_dropout", self.group_dropout))
        return [key for key, on in used if on]

    def check(self, where: str) -> None:
        for key in ("steps", "micro_batch_size", "global_batch_size", "lr", "log_every", "checkpoint_every",
                    "keep_checkpoints", "eval_blocks"):
            positive(f"{where}.{key}", getattr(self, key))
        for key in ("warmup_steps", "group_lasso", "eval_every", "max_grad_norm", "weight_decay"):
            positive(f"{where}.{key}", getattr(self, key), allow_zero=True)
        within(f"{where}.group_dropout", self.group_dropout, 0.0, 1.0, "[)")
        within(f"{where}.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if len(self.betas) != 2:
            raise DistillError(f"config key '{where}.betas': needs two values, got {len(self.betas)}")
        for index, beta in enumerate(self.betas):  # Adam's decay rates of its two moment averages
            within(f"{where}.betas[{index}]", beta, 0.0, 1.0, "[)")
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
class SpeedConfig(Section):
    """How fast the distill stage runs, never what it computes: no stage's fingerprint includes these,
    so they may change between a run and its resume."""

    KEY = "speed"

    activation_checkpointing: bool = False  # recompute each decoder layer in backward: less memory, ~1/3 more compute
    compile: bool = False  # torch.compile every decoder layer of student and teacher (the loss stays eager)
    # bf16 matrix-product peak of one device in TFLOP/s, for the logged MFU; 0 measures it at the start
    # on CUDA (a large matrix product) and logs no MFU on CPU
    peak_tflops: float = 0.0

    def check(self, where: str) -> None:
        positive(f"{where}.peak_tflops", self.peak_tflops, allow_zero=True)


@dataclass
class ExportConfig(Section):
    KEY = "export"

    # on CUDA, the student runs on PyTorch's 2:4 kernels and its logits are compared to the dense
    # model's; this is the largest relative error accepted
    kernel_tolerance: float = 0.05
    # mlp_channels and heads: cut the removed channels / heads out, so hf/ is a smaller dense model
    # (its config says how much smaller); false exports dense-with-zeros
    shrink: bool = True
    # a hub model repo id: after the export is verified, upload export/packed (export/hf when there is
    # no packed form) there with huggingface_hub; off by default
    push_to_hub: Optional[str] = None

    def check(self, where: str) -> None:
        positive(f"{where}.kernel_tolerance", self.kernel_tolerance)


@dataclass
class LmEvalConfig(Section):
    """Zero-shot accuracy from lm-evaluation-harness (the optional extra `pip install -e '.[eval]'`)."""

    KEY = "eval.lm_eval"

    tasks: List[str] = field(default_factory=list)  # lm-eval task names (registry or include_path); empty: none
    include_path: Optional[str] = None  # a directory of local task YAMLs
    batch_size: int = 8  # documents per forward
    limit: int = 0  # documents per task; 0: all

    def check(self, where: str) -> None:
        positive(f"{where}.batch_size", self.batch_size)
        positive(f"{where}.limit", self.limit, allow_zero=True)
        if self.tasks and importlib.util.find_spec("lm_eval") is None:
            raise DistillError(f"config key '{where}.tasks': needs lm-evaluation-harness, the optional extra: "
                               "pip install -e '.[eval]'")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise DistillError(f"config key '{where}.include_path': {self.include_path} is not a directory")


@dataclass
class EvalConfig(Section):
    KEY = "eval"

    files: List[str] = field(default_factory=list)  # extra plain-text files, keyed by file stem
    block_size: int = 512  # tokens per evaluation window
    max_blocks: int = 32  # per file; 0: the whole file
    batch_size: int = 4  # windows per forward
    # the teacher's held-out perplexity under training-free activation sparsity at these uniform
    # fractions, in the report (empty: not measured)
    activation_levels: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.4, 0.5, 0.6, 0.7])
    # held-out blocks (of the first eval set) on which each model's attention is measured per KV head
    # (mass inside attention.sink + attention.window, small probabilities, entropy); 0: not measured
    attention_blocks: int = 1
    # rounds of the report's speed measurement on the machine evaluate runs on: decode and prefill
    # tokens/s at batch 1 of the teacher and the student as it runs, timed in turns (teacher, student,
    # teacher, ...), medians over the rounds, and their tensor bytes; 0: not measured
    speed_repeats: int = 3
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)

    def check(self, where: str) -> None:
        for level in self.activation_levels:
            within(f"{where}.activation_levels", level, 0.0, 1.0, "[)")
        positive(f"{where}.block_size", self.block_size)
        positive(f"{where}.max_blocks", self.max_blocks, allow_zero=True)
        positive(f"{where}.batch_size", self.batch_size)
        positive(f"{where}.attention_blocks", self.attention_blocks, allow_zero=True)
        positive(f"{where}.speed_repeats", self.speed_repeats, allow_zero=True)
        self.lm_eval.validate(f"{where}.lm_eval")


@dataclass
class TrackingConfig(Section):
    KEY = "tracking"

    backend: TrackingBackend = TrackingBackend.NONE  # where the metrics go besides metrics.jsonl
    # WANDB_PROJECT wins when set. tensorboard writes under <run_dir>/logs/<project>: a relative project
    # stays inside the run dir, an absolute one is a place the user chose
    project: str = "distill"

    def check(self, where: str) -> None:
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

    def __post_init__(self) -> None:
        self.check_across_sections()

    def validate(self) -> None:
        """The whole config again, as a run needs it: every section (each checked itself when built,
        but a field may have been set since), at least one text source, and the rules across sections."""
        for section in dataclasses.fields(self):
            refuse_non_finite(getattr(self, section.name), section.name)
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate(section.name)
        if not self.data.sources:  # a Config built in code may leave data empty; a run may not
            raise DistillError("config key 'data.sources': at least one text source is needed")
        self.check_across_sections()

    def check_across_sections(self) -> None:
        prune, train = self.prune, self.train
        if train.masks.mode is MaskMode.LEARNABLE and prune.pattern is not PatternKind.NM:
            raise DistillError(f"config key 'train.masks.mode': learnable masks choose among N:M patterns, "
                               f"not '{prune.pattern}'")
        per_projection = train.per_projection_features()
        if prune.pattern in (PatternKind.MLP_CHANNELS, PatternKind.HEADS) and per_projection:
            raise DistillError(f"config key 'train.{per_projection[0]}': not available with prune.pattern={prune.pattern} "
                               f"(its groups span several projections); use fixed masks")
        if prune.pattern is PatternKind.NONE and per_projection:
            raise DistillError(f"config key 'train.{per_projection[0]}': not available with prune.pattern=none "
                               f"(no weight is masked)")
        if prune.pattern is PatternKind.NONE and not (self.activations.enabled or self.attention.enabled):
            raise DistillError("config key 'prune.pattern': none prunes no weight, and activations.target and "
                               "attention.streaming_fraction are 0: the student would be the teacher; set one of them")
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


def _plain(pairs: list[tuple[str, Any]]) -> dict:
    return {key: value.value if isinstance(value, enum.Enum) else value for key, value in pairs}


def to_dict(config: Any) -> dict:
    """The config as plain data (choices as their string values), for YAML and fingerprints."""
    return dataclasses.asdict(config, dict_factory=_plain)


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
