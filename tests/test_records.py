"""What a stage hands downstream is a typed record with one writer and one reader (distill.run.artifacts):
each comes back as it was written, and a missing or corrupt record file is refused in one line that
names the file and the stage to run again."""

from __future__ import annotations

import json

import pytest

from distill.errors import DistillError
from distill.run.artifacts import (DISTILL_RECORD, EXPORT_RECORD, PRUNE_RECORD, DistillRecord, ExportRecord, PruneRecord,
                                   read_distill_record, read_export_record, read_prune_record, write_distill_record,
                                   write_export_record, write_prune_record)
from distill.sparsity.patterns import NM
from distill.sparsity.spec import SparsitySpec, read_sparsity_spec, write_sparsity_spec

COVERAGE = {"decoder_linears": 14, "pruned": 13, "pruned_weight_fraction": 0.9, "unasked_dense_fraction": 0.0,
            "left_dense": {"model.layers.0.mlp.down_proj": "excluded by prune.exclude"}}

RECORDS = [
    (PRUNE_RECORD, write_prune_record, read_prune_record,
     PruneRecord(["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"], {"model.layers.1.mlp.up_proj": "odd"},
                 COVERAGE, 0.5, {"model.layers.0.mlp": 0.02},
                 {"select": "distill", "scores": {"model.layers.0.self_attn": [0.1, 0.9]},
                  "heads": {"model.layers.0.self_attn": [0]}, "gate_history": [{"kl": 0.1, "mean_gate": 0.5}]})),
    (PRUNE_RECORD, write_prune_record, read_prune_record, PruneRecord(["a.q_proj"], {}, COVERAGE, 0.5)),
    (DISTILL_RECORD, write_distill_record, read_distill_record,
     DistillRecord(6, 6144, 2, "fsdp", {"step": 6, "loss": 1.5}, teacher_layers_sharded=True, masked_weights_zero=True)),
    (DISTILL_RECORD, write_distill_record, read_distill_record, DistillRecord(0, 0, 1, "ddp", {})),
    (EXPORT_RECORD, write_export_record, read_export_record,
     ExportRecord(True, "2:4", 14, "/runs/a/export/hf", 1000, "/runs/a/export/packed", 700, note="packed",
                  sparse_kernel_relative_error={"triton": 1e-3}, card={"teacher": "demo"},
                  pushed={"repo_id": "me/model", "dir": "packed", "url": "https://hf.co/me/model"})),
    (EXPORT_RECORD, write_export_record, read_export_record,
     ExportRecord(True, "mlp_channels 50%", 14, "/runs/a/export/hf", 1000,
                  shrunk={"intermediate_size": [64, 32]}, note="exported smaller")),
]


@pytest.mark.parametrize("filename,write,read,record", RECORDS)
def test_a_record_reads_back_as_it_was_written(tmp_path, filename, write, read, record):
    write(tmp_path, record)
    assert (tmp_path / filename).is_file()  # in the stage's dir, so its manifest's checksums cover it
    assert read(tmp_path) == record


@pytest.mark.parametrize("filename,write,read,record", RECORDS[::2])
def test_a_missing_record_is_refused_in_one_line_naming_the_stage(tmp_path, filename, write, read, record):
    stage_dir = tmp_path / "prune"
    stage_dir.mkdir()
    with pytest.raises(DistillError) as refusal:
        read(stage_dir)
    message = str(refusal.value)
    assert filename in message and "--from prune" in message and "\n" not in message


@pytest.mark.parametrize("filename,write,read,record", RECORDS[::2])
@pytest.mark.parametrize("damage", [
    lambda data: "{not json",
    lambda data: json.dumps([data]),
    lambda data: json.dumps({key: value for key, value in list(data.items())[1:]}),  # a field lost
    lambda data: json.dumps({**data, next(iter(data)): "text"}),  # a field of the wrong type
])
def test_a_corrupt_record_is_refused_in_one_line(tmp_path, filename, write, read, record, damage):
    write(tmp_path, record)
    path = tmp_path / filename
    path.write_text(damage(json.loads(path.read_text())))
    with pytest.raises(DistillError) as refusal:
        read(tmp_path)
    message = str(refusal.value)
    assert str(path) in message and "corrupt" in message and "\n" not in message


def test_a_pruned_records_coverage_must_hold_its_counts(tmp_path):
    write_prune_record(tmp_path, PruneRecord(["a"], {}, {**COVERAGE, "pruned": "13"}, 0.5))
    with pytest.raises(DistillError, match="corrupt file .*'pruned' is str"):
        read_prune_record(tmp_path)


def test_the_sparsity_spec_carries_the_activation_allocation_with_the_thresholds(tmp_path):
    spec = SparsitySpec(NM(2, 4), ["a.q_proj", "a.k_proj"], input_thresholds={"a.q_proj": 0.1, "a.k_proj": 0.1},
                        input_allocation={"a.q_proj": 0.4})
    write_sparsity_spec(tmp_path, spec)
    assert read_sparsity_spec(tmp_path) == spec
    data = json.loads((tmp_path / "sparsity.json").read_text())
    (tmp_path / "sparsity.json").write_text(json.dumps({**data, "version": SparsitySpec.VERSION - 1}))
    with pytest.raises(DistillError, match=f"schema version {SparsitySpec.VERSION - 1} and this distill reads "
                                           f"version {SparsitySpec.VERSION}"):
        read_sparsity_spec(tmp_path)
