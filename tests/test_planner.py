"""The stage runner's decisions (Pipeline.plan and run), in process, on three small stages that
write real files: what runs, what is skipped, what is refused and why."""

from __future__ import annotations

import json

import pytest
from accelerate import Accelerator

from conftest import VALID_TEXT
from distill.config import config_from_dict
from distill.errors import DistillError
from distill.io import read_json, write_json
from distill.pipeline import Pipeline, Stage


def _writer(name):
    def run(ctx):
        (ctx.work_dir / f"{name}.txt").write_text(name)
        return {"wrote": name}
    return run


STAGES = [
    Stage("first", ("data.block_size",), (), _writer("first"), depends_on_precision=lambda config: True),
    Stage("second", ("train.lr",), ("first",), _writer("second")),
    Stage("third", ("eval",), ("first", "second"), _writer("third")),
]


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True, mixed_precision="no")


def make_pipeline(tmp_path, accelerator, **overrides):
    raw = {"run": {"name": "plan", "output_dir": str(tmp_path)},
           "data": {"sources": [{"name": "wiki", "kind": "files", "files": [str(VALID_TEXT)]}]}}
    config = config_from_dict(raw, [f"{key}={value}" for key, value in overrides.items()])
    return Pipeline(config, accelerator, STAGES)


def actions(pipeline, forced=()):
    return [(stage.name, action, reason) for stage, action, reason in pipeline.plan(STAGES, set(forced))]


def test_a_new_run_dir_runs_everything_and_a_finished_one_skips_everything(tmp_path, accelerator):
    pipeline = make_pipeline(tmp_path, accelerator)
    assert [action for _, action, _ in actions(pipeline)] == ["running"] * 3
    pipeline.run()
    for name in ("first", "second", "third"):
        assert (tmp_path / "plan" / name / f"{name}.txt").read_text() == name
        assert not (tmp_path / "plan" / f"{name}.partial").exists()
    assert [action for _, action, _ in actions(make_pipeline(tmp_path, accelerator))] == ["skip"] * 3
    manifest = read_json(tmp_path / "plan" / "first" / "manifest.json")
    assert manifest["inputs"]["precision"] == "fp32" and manifest["summary"] == {"wrote": "first"}
    assert "precision" not in read_json(tmp_path / "plan" / "second" / "manifest.json")["inputs"]


def test_a_changed_key_reruns_its_stage_and_everything_downstream_naming_the_change(tmp_path, accelerator):
    make_pipeline(tmp_path, accelerator).run()
    plan = actions(make_pipeline(tmp_path, accelerator, **{"train.lr": 0.01}))
    assert plan[0] == ("first", "skip", "")
    assert plan[1] == ("second", "running again", "config.train.lr: 0.0003 -> 0.01")
    assert plan[2] == ("third", "running again", "stage 'second' runs again")
    only = actions(make_pipeline(tmp_path, accelerator), forced={"third"})
    assert only[2] == ("third", "running again", "asked for") and only[0][1] == only[1][1] == "skip"


def test_an_unfinished_stage_resumes_only_with_its_own_inputs(tmp_path, accelerator):
    pipeline = make_pipeline(tmp_path, accelerator)
    partial = tmp_path / "plan" / "first.partial"
    partial.mkdir(parents=True)
    inputs = pipeline.inputs(STAGES[0])
    write_json(partial / "inputs.json", {"fingerprint": "unused", "inputs": inputs})
    assert actions(pipeline)[0] == ("first", "resuming the unfinished run", str(partial))

    with pytest.raises(DistillError, match=r"made with other inputs \(config.data.block_size: 128 -> 64\)"):
        actions(make_pipeline(tmp_path, accelerator, **{"data.block_size": 64}))

    write_json(partial / "inputs.json", {"fingerprint": "unused", "inputs": {**inputs, "precision": "bf16"}})
    with pytest.raises(DistillError) as refusal:
        actions(pipeline)
    message = str(refusal.value)
    assert "computed in bf16 and this launch computes in fp32" in message
    assert "run.precision=bf16" in message and str(partial) in message and "\n" not in message


def test_a_run_dir_from_before_the_precision_key_still_matches(tmp_path, accelerator):
    make_pipeline(tmp_path, accelerator).run()
    path = tmp_path / "plan" / "first" / "manifest.json"
    manifest = read_json(path)
    manifest["inputs"]["accelerate.mixed_precision"] = "no"  # what earlier releases recorded
    del manifest["inputs"]["precision"]
    path.write_text(json.dumps(manifest))
    assert [action for _, action, _ in actions(make_pipeline(tmp_path, accelerator))] == ["skip"] * 3
    manifest["inputs"]["accelerate.mixed_precision"] = "bf16"
    path.write_text(json.dumps(manifest))
    assert actions(make_pipeline(tmp_path, accelerator))[0] == ("first", "running again", "precision: 'bf16' -> 'fp32'")


def test_a_second_launch_on_a_locked_run_dir_is_refused_naming_the_holder(tmp_path, accelerator):
    import os

    from distill.locking import RunDirLock

    pipeline = make_pipeline(tmp_path, accelerator)
    holder = RunDirLock(tmp_path / "plan")
    assert holder.try_acquire() is None
    with pytest.raises(DistillError, match=rf"run dir .*plan is in use by PID {os.getpid()} on host "):
        pipeline.run()
    assert not (tmp_path / "plan" / "first").exists()
    holder.release()  # the first launch ends
    pipeline.run()
    assert (tmp_path / "plan" / "third" / "manifest.json").is_file()
