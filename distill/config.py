"""Typed configuration: dataclass schemas, YAML loading, dotted overrides, validation.

OmegaConf merges the YAML file and the `key=value` overrides into the schemas below, which rejects
unknown keys and values of the wrong type with the key's path; `validate` then checks what types
cannot express (choices, ranges, N < M). Every failure becomes one `DistillError` line.
"""

from __future__ import annotations

import dataclasses
import enum
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


@dataclass
class TeacherConfig:
    # "demo" (SmolLM2-135M-Instruct from PyPI), a hub id, a save_pretrained dir, or a .gguf file
    source: str = "demo"
    gguf_file: Optional[str] = None  # a GGUF file name inside `source` when `source` is a dir or hub id
    revision: Optional[str] = None
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU


@dataclass
class TeacherSamplesConfig:
    """Text the teacher writes itself (data-free distillation)."""

    num_sequences: int = 64
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0: sample from the whole vocabulary
    batch_size: int = 16


@dataclass
class SourceConfig:
    name: str = MISSING  # key of this source in reports
    kind: str = MISSING  # files | hub | teacher
    files: List[str] = field(default_factory=list)  # kind=files: .txt, .jsonl/.json, .parquet
    dataset: Optional[str] = None  # kind=hub: dataset id
    subset: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    samples: TeacherSamplesConfig = field(default_factory=TeacherSamplesConfig)
    heldout_fraction: float = 0.1  # the last blocks of the source; 1.0 makes it evaluation-only
    max_blocks: int = 0  # 0: every block


@dataclass
class DataConfig:
    block_size: int = 128
    sources: List[SourceConfig] = field(default_factory=list)
    max_heldout_blocks: int = 64  # per source


@dataclass
class CalibrationConfig:
    num_blocks: int = 32  # training blocks the teacher sees to gather activation statistics


@dataclass
class PruneConfig:
    criterion: str = "wanda"  # magnitude | wanda | sparsegpt | taylor | fisher
    # nm | block | channel | unstructured | mlp_channels | heads (only 2:4 runs on sparse kernels;
    # mlp_channels and heads remove whole channels / head groups across their projections)
    pattern: str = "nm"
    n: int = 2  # nm: keep n weights ...
    m: int = 4  # ... in every group of m consecutive input weights
    sparsity: float = 0.5  # block, channel, unstructured, mlp_channels, heads: fraction removed per layer
    block: int = 4  # block: b x b tiles
    channel_axis: str = "input"  # channel: remove input columns or output rows
    scope: str = "layer"  # unstructured: the fraction per layer, or over all layers at once (global)
    # which decoder projections to prune (distill.targets): names or globs matched against a
    # projection's last name (q_proj), its path in the layer (mlp.*) or its full name; "*" is every
    # linear projection inside the decoder layers. `exclude` removes from that set.
    targets: List[str] = field(default_factory=lambda: ["*"])
    exclude: List[str] = field(default_factory=list)
    incompatible: str = "error"  # a target whose input size is not a multiple of m: error | dense
    # nm: reorder each gated MLP's intermediate channels (function unchanged) so down_proj's groups keep
    # more score, by `permute_sweeps` sweeps of pairwise group exchanges (distill.permutation)
    permute: bool = False
    permute_sweeps: int = 100


@dataclass
class LossConfig:
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd (to the teacher, at `temperature`)
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


class NonFinite(str, enum.Enum):
    STOP = "stop"
    SKIP = "skip"


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
    # fixed: the prune stage's masks; dynamic: masks re-chosen (same pattern, by Wanda's score on the
    # current weights, |W| for a magnitude student) every mask_update_every steps, gradients reaching
    # pruned weights through a sparse-refined STE;
    # learnable: a Gumbel-softmax choice per group among the N:M candidate patterns
    mask_mode: str = "fixed"
    mask_update_every: int = 10
    refine_decay: float = 2.0e-4  # dynamic: SR-STE pull of pruned weights towards zero
    # learnable: every group picks one of the C(m, n) candidate patterns through Gumbel-softmax logits,
    # initialised to favour the prune stage's choice by `mask_init_logit`, trained at `mask_lr`; the
    # Gumbel noise is scaled by `mask_noise` at the first step, falling linearly to 0 at the last
    # (0.5 at init 3.0 redraws ~1% of groups at the start; 1.0 redraws ~20%, which wrecked the student)
    mask_lr: float = 0.05
    mask_init_logit: float = 3.0
    gumbel_temperature: float = 1.0
    mask_noise: float = 0.5
    group_lasso: float = 0.0  # weight of the sum of the pattern's group norms (pushes whole groups to zero)
    group_dropout: float = 0.0  # probability of dropping each whole group of the pattern in a forward
    # ddp: every process holds the whole student (accelerate's DDP); fsdp: parameters, gradients,
    # optimizer state and masks sharded over the processes (torch FSDP2, distill.sharding); fixed masks
    sharding: str = "ddp"
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


@dataclass
class SpeedConfig:
    """How fast the distill stage runs, never what it computes: no stage's fingerprint includes these,
    so they may change between a run and its resume."""

    activation_checkpointing: bool = False  # recompute each decoder layer in backward: less memory, ~1/3 more compute
    compile: bool = False  # torch.compile every decoder layer of student and teacher (the loss stays eager)
    # bf16 matrix-product peak of one device in TFLOP/s, for the logged MFU; 0 measures it at the start
    # on CUDA (a large matrix product) and logs no MFU on CPU
    peak_tflops: float = 0.0


@dataclass
class ExportConfig:
    # on CUDA, the student runs on PyTorch's 2:4 kernels and its logits are compared to the dense
    # model's; this is the largest relative error accepted
    kernel_tolerance: float = 0.05
    # mlp_channels and heads: cut the removed channels / heads out, so hf/ is a smaller dense model
    # (its config says how much smaller); false exports dense-with-zeros
    shrink: bool = True


@dataclass
class EvalConfig:
    files: List[str] = field(default_factory=list)  # extra plain-text files, keyed by file stem
    block_size: int = 512
    max_blocks: int = 32  # per file; 0: the whole file
    batch_size: int = 4


@dataclass
class TrackingConfig:
    backend: str = "none"  # wandb | tensorboard | none
    project: str = "distill"  # WANDB_PROJECT wins when set


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


def _one_line(error: OmegaConfBaseException) -> str:
    message = str(error).splitlines()[0]
    key = getattr(error, "full_key", None)
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
        raw = yaml.safe_load(path.read_text()) or {}
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
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise DistillError(f"config key '{where}': unknown key (known: {', '.join(fields)})")
        kind = fields[key].type
        kind = eval(kind, globals()) if isinstance(kind, str) else kind  # annotations are strings here
        inner = getattr(kind, "__args__", (None,))[0]
        if dataclasses.is_dataclass(kind):
            _check_keys(value, kind, where)
        elif dataclasses.is_dataclass(inner) and isinstance(value, list):
            for index, item in enumerate(value):
                _check_keys(item, inner, f"{where}[{index}]")
                try:  # type errors, named with the item's path
                    OmegaConf.merge(OmegaConf.structured(inner), OmegaConf.create(item))
                except OmegaConfBaseException as error:
                    key = getattr(error, "full_key", "") or ""
                    raise DistillError(f"config key '{where}[{index}].{key}': {str(error).splitlines()[0]}") from None


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
    validate(config)
    return config


def _plain(pairs: list[tuple[str, Any]]) -> dict:
    return {key: value.value if isinstance(value, enum.Enum) else value for key, value in pairs}


def to_dict(config: Any) -> dict:
    """The config as plain data (choices as their string values), for YAML and fingerprints."""
    return dataclasses.asdict(config, dict_factory=_plain)


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _choice(path: str, value: str, choices: list[str]) -> None:
    if value not in choices:
        raise DistillError(f"config key '{path}': '{value}' is not one of {', '.join(choices)}")


def _positive(path: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise DistillError(f"config key '{path}': {value} must be {bound}")


# the run dir's name plus what the pipeline adds beside it (`.<name>.lock`) must fit one path
# component, which most filesystems cap at 255 bytes
MAX_RUN_NAME_BYTES = 255 - len(".") - len(".lock")


def _check_run_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise DistillError(f"config key 'run.name': {name!r} is not a directory name (no '/', not '.' or '..')")
    if len(name.encode()) > MAX_RUN_NAME_BYTES:
        raise DistillError(f"config key 'run.name': {len(name.encode())} bytes is longer than the "
                           f"{MAX_RUN_NAME_BYTES} a directory name can hold here; shorten it")


def validate(config: Config) -> None:
    """Checks that the schema's types cannot express; each names the key it is about."""
    _check_run_name(config.run.name)
    _positive("run.collective_timeout_minutes", config.run.collective_timeout_minutes)
    _choice("teacher.dtype", config.teacher.dtype, ["auto", "float32", "bfloat16", "float16"])
    _positive("data.block_size", config.data.block_size)
    names = [source.name for source in config.data.sources]
    if not names:
        raise DistillError("config key 'data.sources': at least one text source is needed")
    if len(set(names)) != len(names):
        raise DistillError(f"config key 'data.sources': source names must be unique, got {names}")
    for i, source in enumerate(config.data.sources):
        where = f"data.sources[{i}]"
        _choice(f"{where}.kind", source.kind, ["files", "hub", "teacher"])
        if source.kind == "files" and not source.files:
            raise DistillError(f"config key '{where}.files': a files source needs at least one file")
        if source.kind == "hub" and not source.dataset:
            raise DistillError(f"config key '{where}.dataset': a hub source needs a dataset id")
        if not 0.0 <= source.heldout_fraction <= 1.0:
            raise DistillError(f"config key '{where}.heldout_fraction': {source.heldout_fraction} is not in [0, 1]")
        _positive(f"{where}.max_blocks", source.max_blocks, allow_zero=True)
        if source.kind == "teacher":
            _positive(f"{where}.samples.num_sequences", source.samples.num_sequences)
            _positive(f"{where}.samples.max_new_tokens", source.samples.max_new_tokens)
            _positive(f"{where}.samples.temperature", source.samples.temperature)
            _positive(f"{where}.samples.batch_size", source.samples.batch_size)
    if all(source.heldout_fraction == 1.0 for source in config.data.sources):
        raise DistillError("config key 'data.sources': every source is held out, nothing is left to train on")
    _positive("calibration.num_blocks", config.calibration.num_blocks)

    prune = config.prune
    _choice("prune.criterion", prune.criterion, ["magnitude", "wanda", "sparsegpt", "taylor", "fisher"])
    _choice("prune.incompatible", prune.incompatible, ["error", "dense"])
    _choice("prune.pattern", prune.pattern, ["nm", "block", "channel", "unstructured", "mlp_channels", "heads"])
    _choice("prune.channel_axis", prune.channel_axis, ["input", "output"])
    _choice("prune.scope", prune.scope, ["layer", "global"])
    _positive("prune.m", prune.m)
    _positive("prune.n", prune.n)
    _positive("prune.block", prune.block)
    if prune.n >= prune.m:
        raise DistillError(f"config key 'prune.n': N:M sparsity needs N < M, got {prune.n}:{prune.m}")
    if not 0.0 < prune.sparsity < 1.0:
        raise DistillError(f"config key 'prune.sparsity': {prune.sparsity} is not in (0, 1)")
    _positive("prune.permute_sweeps", prune.permute_sweeps)
    if prune.permute and prune.pattern != "nm":
        raise DistillError(f"config key 'prune.permute': channel permutation serves N:M patterns, not '{prune.pattern}'")
    if prune.criterion == "sparsegpt" and prune.pattern != "nm":
        raise DistillError(f"config key 'prune.criterion': sparsegpt prunes N:M patterns only, not '{prune.pattern}'")
    if prune.scope == "global" and (prune.pattern != "unstructured" or prune.criterion == "magnitude"):
        raise DistillError("config key 'prune.scope': global needs pattern unstructured and a criterion whose "
                           "scores compare across layers (wanda, taylor, fisher)")
    if not prune.targets:
        raise DistillError("config key 'prune.targets': name at least one projection to prune (\"*\" for all)")

    train = config.train
    _positive("train.steps", train.steps)
    _positive("train.micro_batch_size", train.micro_batch_size)
    _positive("train.global_batch_size", train.global_batch_size)
    _positive("train.lr", train.lr)
    _positive("train.warmup_steps", train.warmup_steps, allow_zero=True)
    _choice("train.mask_mode", train.mask_mode, ["fixed", "dynamic", "learnable"])
    if train.mask_mode == "learnable" and prune.pattern != "nm":
        raise DistillError(f"config key 'train.mask_mode': learnable masks choose among N:M patterns, not '{prune.pattern}'")
    _positive("train.mask_lr", train.mask_lr)
    _positive("train.gumbel_temperature", train.gumbel_temperature)
    _positive("train.mask_noise", train.mask_noise, allow_zero=True)
    _positive("train.mask_update_every", train.mask_update_every)
    _positive("train.refine_decay", train.refine_decay, allow_zero=True)
    _positive("train.group_lasso", train.group_lasso, allow_zero=True)
    if not 0.0 <= train.group_dropout < 1.0:
        raise DistillError(f"config key 'train.group_dropout': {train.group_dropout} is not in [0, 1)")
    _choice("train.sharding", train.sharding, ["ddp", "fsdp"])
    # features that act on a projection's whole mask: fsdp holds a shard of it, spanning groups cross projections
    per_projection = [key for key, used in (("mask_mode", train.mask_mode != "fixed"), ("group_lasso", train.group_lasso),
                                            ("group_dropout", train.group_dropout)) if used]
    if train.sharding == "fsdp" and per_projection:
        raise DistillError(f"config key 'train.sharding': fsdp trains fixed masks only; "
                           f"unset train.{per_projection[0]} or use ddp")
    _positive("train.log_every", train.log_every)
    _positive("train.eval_every", train.eval_every, allow_zero=True)
    if train.eval_every % train.log_every:
        raise DistillError(f"config key 'train.eval_every': {train.eval_every} is not a multiple of train.log_every "
                           f"({train.log_every})")
    _positive("train.checkpoint_every", train.checkpoint_every)
    if train.checkpoint_every % train.log_every:  # a resumed run logs the same windows as an uninterrupted one
        raise DistillError(f"config key 'train.checkpoint_every': {train.checkpoint_every} is not a multiple of "
                           f"train.log_every ({train.log_every})")
    _positive("train.keep_checkpoints", train.keep_checkpoints)
    _positive("train.max_grad_norm", train.max_grad_norm, allow_zero=True)
    if not 0.0 <= train.min_lr_ratio <= 1.0:
        raise DistillError(f"config key 'train.min_lr_ratio': {train.min_lr_ratio} is not in [0, 1]")
    if len(train.betas) != 2:
        raise DistillError(f"config key 'train.betas': needs two values, got {len(train.betas)}")
    if prune.pattern in ("mlp_channels", "heads") and per_projection:
        raise DistillError(f"config key 'train.{per_projection[0]}': not available with prune.pattern={prune.pattern} "
                           f"(its groups span several projections); use fixed masks")
    if train.mask_mode == "dynamic" and prune.scope == "global":
        raise DistillError("config key 'train.mask_mode': dynamic masks are re-chosen per layer; use prune.scope=layer")
    if train.global_batch_size % train.micro_batch_size:
        raise DistillError(
            f"config key 'train.global_batch_size': {train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size ({train.micro_batch_size})"
        )
    loss = train.loss
    _choice("train.loss.divergence", loss.divergence, ["forward_kl", "reverse_kl", "jsd"])
    if not 0.0 < loss.jsd_beta < 1.0:
        raise DistillError(f"config key 'train.loss.jsd_beta': {loss.jsd_beta} is not in (0, 1)")
    _positive("train.loss.chunk_tokens", loss.chunk_tokens, allow_zero=True)
    _positive("train.loss.teacher_topk", loss.teacher_topk, allow_zero=True)
    if loss.teacher_topk and loss.temperature != 1.0:
        raise DistillError(f"config key 'train.loss.temperature': the cached teacher (train.loss.teacher_topk) is "
                           f"stored at temperature 1, got {loss.temperature}")
    if loss.teacher_topk and loss.hidden_weight:
        raise DistillError("config key 'train.loss.hidden_weight': hidden-state matching needs the live teacher; "
                           "set train.loss.teacher_topk=0")
    _positive("train.loss.temperature", loss.temperature)
    _positive("train.loss.kd_weight", loss.kd_weight, allow_zero=True)
    _positive("train.loss.lm_weight", loss.lm_weight, allow_zero=True)
    _positive("train.loss.hidden_weight", loss.hidden_weight, allow_zero=True)
    if loss.kd_weight == 0 and loss.lm_weight == 0 and loss.hidden_weight == 0:
        raise DistillError("config key 'train.loss': kd_weight, lm_weight and hidden_weight are all 0, nothing to train on")

    _positive("speed.peak_tflops", config.speed.peak_tflops, allow_zero=True)
    _positive("eval.block_size", config.eval.block_size)
    _positive("eval.max_blocks", config.eval.max_blocks, allow_zero=True)
    _positive("eval.batch_size", config.eval.batch_size)
    _choice("tracking.backend", config.tracking.backend, ["wandb", "tensorboard", "none"])


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

