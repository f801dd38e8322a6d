"""What the stages leave in a run dir, in one place: the names, and typed readers and writers. A stage
writes through these and later stages read through them, so no stage imports another and no file
is parsed in two places.

    <run_dir>/teacher/BLOCKS_DIR           the training and held-out token blocks, in shards
                                           (distill.data.token_blocks)
    <run_dir>/teacher/CALIBRATION_FILE     per-projection input square sums (Wanda), plus "tokens"
    <run_dir>/teacher_logits/TOPK_DIR      the teacher's top-k at every training position, in shards
                                           (distill.data.teacher_cache)
    <run_dir>/prune/STUDENT_DIR            the one-shot student (distill.student's layout)
    <run_dir>/prune/PRUNE_RECORD           PruneRecord: the resolved targets, coverage, how heads were chosen
    <run_dir>/distill/STUDENT_DIR          the distilled student
    <run_dir>/distill/METRICS_FILE         the logged training rows, one JSON object per line
    <run_dir>/distill/DISTILL_RECORD       DistillRecord: what the training ran through
    <run_dir>/export/EXPORT_RECORD         ExportRecord: what the export verified and wrote
    <dir>/SPARSITY_FILE                    SparsitySpec (distill.sparsity.spec), in every student dir
                                           and the packed export (masks, input thresholds, streaming heads)
    <run_dir>/<stage>/MANIFEST_FILE        what the stage ran on and its summary (distill.run.pipeline)

A record is a file in its stage's dir, so the manifest's checksums cover it; the manifest's summary is
a copy for people, which no stage reads.
"""

from __future__ import annotations

import json
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from distill.errors import DistillError
from distill.io import load_tensors, read_json, save_tensors, write_json, write_text
from distill.data.teacher_cache import TeacherCache
from distill.data.token_blocks import StoredBlocks

BLOCKS_DIR = "blocks"
CALIBRATION_FILE = "calibration.safetensors"
TOPK_DIR = "topk"
STUDENT_DIR = "student"
METRICS_FILE = "metrics.jsonl"
MANIFEST_FILE = "manifest.json"
PRUNE_RECORD = "pruned.json"
DISTILL_RECORD = "distilled.json"
EXPORT_RECORD = "exported.json"


def read_token_blocks(directory: Path) -> StoredBlocks:
    """The teacher stage's token blocks in `directory`, read lazily."""
    path = Path(directory) / BLOCKS_DIR
    if not path.is_dir():
        raise DistillError(f"missing token blocks {path}; rerun the teacher stage")
    return StoredBlocks(path)


def write_calibration(directory: Path, square_sums: dict[str, torch.Tensor]) -> None:
    save_tensors(Path(directory) / CALIBRATION_FILE, square_sums)


def read_calibration(directory: Path) -> dict[str, torch.Tensor]:
    """{projection name: sum of x_j^2 over the calibration tokens} plus "tokens"."""
    return load_tensors(Path(directory) / CALIBRATION_FILE)


def read_teacher_cache(directory: Path, blocks_shape: tuple[int, int], k: int) -> TeacherCache:
    """The teacher_logits stage's cache in `directory`, refused in one line unless it covers
    `blocks_shape` training blocks at `k`."""
    path = Path(directory) / TOPK_DIR
    if not path.is_dir():
        raise DistillError(f"missing teacher cache {path}; rerun the teacher_logits stage")
    cache = TeacherCache(path)
    cache.check(*blocks_shape, k)
    return cache


def write_metrics(directory: Path, rows: list[dict]) -> None:
    write_text(Path(directory) / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in rows))


def read_metrics(directory: Path) -> list[dict]:
    """The logged training rows (none when nothing was logged yet)."""
    path = Path(directory) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


Record = TypeVar("Record")


def _field(data: dict, key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    """data[key], refused (TypeError, worded by the reader) unless it is a `kind` (or None, if optional)."""
    value = data[key] if not optional else data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        raise TypeError(f"'{key}' is {type(value).__name__}, not {getattr(kind, '__name__', kind)}")
    return value


NUMBER = (int, float)


def _write_record(directory: Path, filename: str, record) -> None:
    write_json(Path(directory) / filename, dataclasses.asdict(record))


def _read_record(directory: Path, filename: str, parse: Callable[[dict], Record]) -> Record:
    """The record a finished stage wrote in `directory`, refused in one line when it is missing or
    corrupt (the way on: run that stage again)."""
    directory = Path(directory)
    path = directory / filename
    again = f"rerun with --from {directory.name} to run stage '{directory.name}' again"
    if not path.is_file():
        raise DistillError(f"{directory} holds no {filename}; {again}")
    data = read_json(path)
    try:
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, found {type(data).__name__}")
        return parse(data)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise DistillError(f"corrupt file {path}: {type(error).__name__} {error}; {again}") from None


COVERAGE_KEYS = {"decoder_linears": int, "pruned": int, "pruned_weight_fraction": NUMBER,
                 "unasked_dense_fraction": NUMBER, "left_dense": dict}


@dataclass(frozen=True)
class PruneRecord:
    """What the prune stage hands on besides its student (whose sparsity.json holds the masks, input
    thresholds with their allocation, and streaming heads)."""

    # the projections prune.targets selects and prune.exclude does not, resolved once on the teacher
    targets: list[str]
    dense: dict[str, str]  # target projections left dense, and why
    coverage: dict  # distill.sparsity.pruning.pruning_coverage: how much of the decoder the masks cover
    mean_sparsity: float
    permutation_gain: dict[str, float] = field(default_factory=dict)  # per gated MLP, under prune.permute
    # how the streaming heads were chosen: select, scores per KV head, the heads, gate_history
    head_selection: dict | None = None

    @classmethod
    def from_json(cls, data: dict) -> "PruneRecord":
        coverage = _field(data, "coverage", dict)
        for key, kind in COVERAGE_KEYS.items():
            _field(coverage, key, kind)
        return cls([str(name) for name in _field(data, "targets", list)],
                   {str(name): str(why) for name, why in _field(data, "dense", dict).items()}, coverage,
                   float(_field(data, "mean_sparsity", NUMBER)),
                   {str(name): float(gain) for name, gain in _field(data, "permutation_gain", dict).items()},
                   _field(data, "head_selection", dict, optional=True))


def write_prune_record(directory: Path, record: PruneRecord) -> None:
    _write_record(directory, PRUNE_RECORD, record)


def read_prune_record(directory: Path) -> PruneRecord:
    return _read_record(directory, PRUNE_RECORD, PruneRecord.from_json)


@dataclass(frozen=True)
class DistillRecord:
    """What the distill stage ran through."""

    steps: int
    tokens: int  # trained on: steps x global batch x block size
    processes: int
    sharding: str
    final: dict  # the last logged training row (empty when none was logged)
    teacher_layers_sharded: bool | None = None  # None: the teacher was not loaded
    masked_weights_zero: bool | None = None  # every pruned weight of the saved student is exactly zero

    @classmethod
    def from_json(cls, data: dict) -> "DistillRecord":
        return cls(_field(data, "steps", int), _field(data, "tokens", int), _field(data, "processes", int),
                   _field(data, "sharding", str), _field(data, "final", dict),
                   _field(data, "teacher_layers_sharded", bool, optional=True),
                   _field(data, "masked_weights_zero", bool, optional=True))


def write_distill_record(directory: Path, record: DistillRecord) -> None:
    _write_record(directory, DISTILL_RECORD, record)


def read_distill_record(directory: Path) -> DistillRecord:
    return _read_record(directory, DISTILL_RECORD, DistillRecord.from_json)


@dataclass(frozen=True)
class ExportRecord:
    """What the export stage verified and wrote."""

    verified: bool
    pattern: str  # described, as in the report
    masked: int  # projections carrying masks
    hf_dir: str
    dense_bytes: int
    packed_dir: str | None = None  # None: no packed form (a pattern no sparse kernel runs, or shrunk)
    packed_bytes: int | None = None
    shrunk: dict[str, list[int]] | None = None  # {size: [old, new]} of a model exported smaller
    note: str | None = None
    sparse_kernel_relative_error: dict[str, float] | None = None  # per 2:4 kernel path, measured on CUDA
    card: dict = field(default_factory=dict)  # the model cards' facts (distill.export.model_card.StudentFacts)
    pushed: dict | None = None  # repo_id, dir, url under export.push_to_hub

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ExportRecord":
        shrunk = _field(data, "shrunk", dict, optional=True)
        errors = _field(data, "sparse_kernel_relative_error", dict, optional=True)
        return cls(_field(data, "verified", bool), _field(data, "pattern", str), _field(data, "masked", int),
                   _field(data, "hf_dir", str), _field(data, "dense_bytes", int),
                   _field(data, "packed_dir", str, optional=True), _field(data, "packed_bytes", int, optional=True),
                   {str(key): [int(old), int(new)] for key, (old, new) in shrunk.items()} if shrunk is not None else None,
                   _field(data, "note", str, optional=True),
                   {str(path): float(error) for path, error in errors.items()} if errors is not None else None,
                   _field(data, "card", dict), _field(data, "pushed", dict, optional=True))


def write_export_record(directory: Path, record: ExportRecord) -> None:
    _write_record(directory, EXPORT_RECORD, record)


def read_export_record(directory: Path) -> ExportRecord:
    return _read_record(directory, EXPORT_RECORD, ExportRecord.from_json)
