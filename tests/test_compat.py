"""Run dirs written before masks became parametrizations and sparsity.json got one versioned schema:
their students load, their fingerprints still match, and their checkpoints are refused by name."""

import json

import pytest
import torch
from safetensors.torch import save_file

from distill.artifacts import Layout, SparsitySpec, read_sparsity_spec
from distill.config import Criterion
from distill.errors import DistillError
from distill.pipeline import upgrade_inputs
from distill.sparsity.patterns import NM, Blocks


def test_version_1_specs_of_students_and_packed_exports_read_as_today(tmp_path):
    student = {"n": 2, "m": 4, "pattern": {"kind": "nm", "n": 2, "m": 4, "sparsity": 0.5, "block": 4, "axis": "input",
                                           "scope": "layer"}, "criterion": "wanda", "dense": {"x": "why"}, "masked": ["a", "b"]}
    (tmp_path / "sparsity.json").write_text(json.dumps(student))
    spec = read_sparsity_spec(tmp_path)
    assert spec == SparsitySpec(NM(2, 4), ["a", "b"], Layout.MASKED, Criterion.WANDA, {"x": "why"})
    (tmp_path / "sparsity.json").write_text(json.dumps({"format": "distill.nm_packed.v1", "n": 2, "m": 4, "masked": ["a"]}))
    assert read_sparsity_spec(tmp_path) == SparsitySpec(NM(2, 4), ["a"], Layout.PACKED_V1)
    today = SparsitySpec(Blocks(8, 0.25), ["c"], criterion=Criterion.MAGNITUDE)
    (tmp_path / "sparsity.json").write_text(json.dumps(today.to_json()))
    assert read_sparsity_spec(tmp_path) == today


@pytest.mark.parametrize("content,message", [
    ({"version": 9, "masked": []}, "schema version 9; this distill reads up to 3"),
    ({"n": 2}, "expected a JSON object with a 'masked' list"),
    ({"version": 2, "masked": [], "layout": "masked", "pattern": {"kind": "diagonal"}}, "corrupt file"),
])
def test_a_bad_spec_is_one_line_naming_the_file(tmp_path, content, message):
    (tmp_path / "sparsity.json").write_text(json.dumps(content))
    with pytest.raises(DistillError, match=message) as info:
        read_sparsity_spec(tmp_path)
    assert "\n" not in str(info.value)


def test_saved_inputs_of_older_runs_match_todays_keys():
    old = {"config.train.mask_mode": "fixed", "config.train.mask_lr": 0.05, "config.train.steps": 3,
           "config.calibration.num_blocks": 8}
    assert upgrade_inputs(old, ("train.masks", "train.steps", "calibration")) == {
        "config.train.masks.mode": "fixed", "config.train.masks.lr": 0.05, "config.train.steps": 3,
        "config.calibration.num_blocks": 8, "config.calibration.batch_size": 4}
    assert "config.calibration.batch_size" not in upgrade_inputs({"config.train.steps": 3}, ("train",))


def test_a_key_a_stage_no_longer_fingerprints_does_not_run_it_again():
    """The prune stage fingerprinted all of `activations` until how the student trains under the
    thresholds moved to distill: a prune stage saved then matches whatever those keys now say."""
    from distill.stages import STAGES

    prune = next(stage for stage in STAGES if stage.name == "prune")
    saved = {"config.activations.target": 0.5, "config.activations.straight_through": True,
             "config.activations.recalibrate_every": 5, "config.prune.n": 2, "precision": "bf16"}
    upgraded = upgrade_inputs(saved, prune.config_keys)
    assert "config.activations.straight_through" not in upgraded and "config.activations.recalibrate_every" not in upgraded
    assert upgraded["config.activations.target"] == 0.5 and upgraded["precision"] == "bf16"
    assert upgraded["config.activations.greedy_blocks"] == 0  # added since, at what those runs did


def test_a_checkpoint_with_masks_as_buffers_is_refused_by_name(tmp_path):
    from accelerate import Accelerator

    from distill.checkpoints import load_checkpoint

    old = tmp_path / "step_00000004"
    old.mkdir()
    save_file({"student.model.layers.0.mlp.up_proj.weight": torch.randn(4, 8),
               "student.model.layers.0.mlp.up_proj.mask": torch.ones(4, 8, dtype=torch.bool)}, str(old / "model.safetensors"))
    with pytest.raises(DistillError, match="was written by an older distill \\(masks as buffers\\)"):
        load_checkpoint(Accelerator(cpu=True), old)
