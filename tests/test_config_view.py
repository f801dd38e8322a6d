"""A stage reads only what its fingerprint covers (distill.run.config_view)."""

import pytest

from distill.config import Config, TeacherConfig
from distill.run.config_file import config_from_dict
from distill.run.config_view import UNFINGERPRINTED, ConfigView, missing_keys
from distill.errors import DistillError
from distill.run.pipeline import Pipeline
from distill.stages import STAGES

SOURCES = {"data": {"sources": [{"name": "a", "kind": "files", "files": ["x.txt"]}]}}


def test_a_view_gives_covered_keys_and_refuses_the_rest_by_name():
    config = config_from_dict(SOURCES, ["train.lr=0.01"])
    view = ConfigView(config, ("teacher", "train.loss.teacher_topk", "train.lr"), stage="probe")
    assert isinstance(view.teacher, TeacherConfig) and view.teacher is config.teacher  # a whole section, typed
    assert view.train.lr == 0.01 and view.train.loss.teacher_topk == 0
    assert view.run_dir == config.run_dir  # a property of the config, not a key
    with pytest.raises(DistillError, match="stage 'probe' read config key 'train.steps', which its fingerprint"):
        view.train.steps
    with pytest.raises(DistillError, match="'eval'"):
        view.eval
    with pytest.raises(DistillError, match="read-only"):
        view.train.lr = 1.0
    with pytest.raises(AttributeError):
        view.train.no_such_key


def test_every_stage_names_only_keys_that_exist():
    config = Config()
    for stage in STAGES:
        assert missing_keys(config, stage.config_keys) == [], stage.name
    assert missing_keys(config, UNFINGERPRINTED) == []
    assert missing_keys(config, ("train.los",)) == ["train.los"]  # what a typo looks like


def test_a_stage_may_read_what_its_upstream_stages_fingerprint():
    """A change there runs the upstream stage again and so this one: covered without listing it."""
    from accelerate import Accelerator

    pipeline = Pipeline(config_from_dict(SOURCES), Accelerator(cpu=True), STAGES)
    by_name = {stage.name: stage for stage in STAGES}
    evaluate = pipeline.readable_keys(by_name["evaluate"])
    assert {"eval", "teacher", "prune", "train", "calibration"} <= set(evaluate)
    teacher = pipeline.readable_keys(by_name["teacher"])
    assert "eval" not in teacher and "train" not in teacher and "train.loss" not in teacher


def test_every_activations_key_is_fingerprinted_by_the_stage_that_reads_it():
    """prune calibrates the thresholds, distill trains under them: a key of how they train does not
    calibrate them again, and a key added to the section must be given to one of the two."""
    import dataclasses

    from distill.sparsity.activations_config import ActivationsConfig
    from distill.run.config_view import covers

    by_name = {stage.name: stage for stage in STAGES}
    prune, distill = by_name["prune"].config_keys, by_name["distill"].config_keys
    for field in dataclasses.fields(ActivationsConfig):
        key = f"activations.{field.name}"
        assert covers(prune, key) != covers(distill, key), key
    assert covers(distill, "activations.straight_through") and covers(prune, "activations.greedy_blocks")
