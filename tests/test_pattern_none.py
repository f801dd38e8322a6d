"""prune.pattern none: a student with dense weights whose sparsity is its activations' (or attention's)
alone. The config refuses it where nothing would be sparse or a feature needs masks; the prune stage
chooses no mask and the rest of the pipeline runs on the unmasked student."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from conftest import run_pipeline, tiny_config, write_config
from distill.errors import DistillError
from distill.run.artifacts import read_prune_record
from distill.run.config_file import config_from_dict
from distill.sparsity.patterns import NoPruning, Pattern
from distill.sparsity.prune_config import PatternKind, PruneConfig
from distill.sparsity.pruning import pruning_coverage
from distill.sparsity.spec import read_sparsity_spec

DATA = {"sources": [{"name": "a", "kind": "files", "files": ["x.txt"]}]}


def test_pattern_none_is_a_config_choice_with_activation_sparsity():
    config = config_from_dict({"data": DATA, "prune": {"pattern": "none"}, "activations": {"target": 0.5}})
    assert config.prune.pattern is PatternKind.NONE
    pattern = Pattern.from_config(config.prune)
    assert isinstance(pattern, NoPruning) and not pattern.accelerated and not pattern.spans_projections
    assert Pattern.from_spec(pattern.to_spec()) == pattern
    assert pattern.describe() == "dense weights"


@pytest.mark.parametrize("raw,message", [
    ({"prune": {"pattern": "none"}}, "none prunes no weight, and activations.target and attention.streaming_fraction are 0"),
    ({"prune": {"pattern": "none"}, "activations": {"target": 0.5}, "train": {"masks": {"mode": "dynamic"}}},
     "'train.masks.mode': not available with prune.pattern=none"),
    ({"prune": {"pattern": "none"}, "activations": {"target": 0.5}, "train": {"group_lasso": 0.1}},
     "'train.group_lasso': not available with prune.pattern=none"),
    ({"prune": {"pattern": "none", "permute": True}, "activations": {"target": 0.5}}, "channel permutation serves N:M"),
])
def test_pattern_none_is_refused_where_it_would_do_nothing_or_a_feature_needs_masks(raw, message):
    with pytest.raises(DistillError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict({"data": DATA, **raw})


def test_coverage_of_pattern_none_says_why_every_projection_is_dense(tiny_teacher):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    coverage = pruning_coverage(model, PruneConfig(pattern=PatternKind.NONE), [], {}, {})
    assert coverage["pruned"] == 0 and coverage["pruned_weight_fraction"] == 0
    assert coverage["decoder_linears"] == len(coverage["left_dense"]) == 14
    assert set(coverage["left_dense"].values()) == {"prune.pattern none"}
    assert coverage["unasked_dense_fraction"] == 0  # asked for: no warning about unpruned weights


@pytest.mark.slow  # a pipeline run in a process of its own
def test_pipeline_with_dense_weights_and_sparse_activations(tmp_path, tiny_teacher):
    config = tiny_config(tmp_path, tiny_teacher, prune={"pattern": "none"}, activations={"target": 0.5})
    result = run_pipeline(write_config(tmp_path / "none.yaml", config))
    assert "[prune] prune.pattern none: no weight pruned" in result.stdout
    run_dir = tmp_path / "runs" / "tiny"
    record = read_prune_record(run_dir / "prune")
    assert record.targets == [] and record.mean_sparsity == 0
    spec = read_sparsity_spec(run_dir / "distill" / "student")
    assert spec.masked == [] and isinstance(spec.pattern, NoPruning) and spec.input_thresholds
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert report["export"]["note"] == "dense weights: exported dense, no weight was pruned"
    assert report["export"]["packed_dir"] is None
    scores = report["sources"]["wiki"]
    assert {"teacher", "oneshot", "student", "student_runtime"} <= set(scores)  # runtime: the thresholds applied
