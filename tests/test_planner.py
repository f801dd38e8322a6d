"""The stage runner's decisions (Pipeline.plan and run), in process, on three small stages that
write real files: what runs, what is skipped, what is refused and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from accelerate import Accelerator

from conftest import VALID_TEXT
from distill.run.config_file import config_from_dict
from distill.errors import DistillError
from distill.io import read_json, write_json
from distill.run.pipeline import Pipeline, Stage


def _writer(name):
    def run(ctx):
        (ctx.work_dir / f"{name}.txt").write_text(name)
        return {"wrote": name}
    return run


def _reader_of_eval_files(ctx):
    """Reads every eval file the way a stage would, failing on one that is not text."""
    for path in ctx.config.eval.files:
        if "\0" in Path(path).read_text(errors="replace"):
            raise DistillError(f"eval file {path} is not text")
    return _writer("third")(ctx)


STAGES = [
    Stage("first", ("data.block_size",), (), _writer("first"), depends_on_precision=lambda config: True),
    Stage("second", ("train.lr",), ("first",), _writer("second")),
    Stage("third", ("eval",), ("first", "second"), _reader_of_eval_files, input_files=lambda config: config.eval.files),
]


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True, mixed_precision="no")


def make_pipeline(tmp_path, accelerator, discard=(), **overrides):
    raw = {"run": {"name": "plan", "output_dir": str(tmp_path)},
           "data": {"sources": [{"name": "wiki", "kind": "files", "files": [str(VALID_TEXT)]}]}}
    config = config_from_dict(raw, [f"{key}={value}" for key, value in overrides.items()])
    return Pipeline(config, accelerator, STAGES, discard=discard)


def actions(pipeline, forced=()):
    return [(decision.stage.name, decision.action, decision.reason) for decision in pipeline.plan(STAGES, set(forced))]


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


def test_a_run_dir_written_by_another_distill_runs_again_naming_both_versions(tmp_path, accelerator):
    """No upgrade of older run dirs: their stages run again, from the first one, saying why."""
    from distill import __version__

    make_pipeline(tmp_path, accelerator).run()
    path = tmp_path / "plan" / "first" / "manifest.json"
    manifest = read_json(path)
    manifest["inputs"]["distill.version"] = "0.1.0"
    path.write_text(json.dumps(manifest))
    assert actions(make_pipeline(tmp_path, accelerator))[0] == (
        "first", "running again", f"written by distill 0.1.0, this is distill {__version__}")


def test_a_second_launch_on_a_locked_run_dir_is_refused_naming_the_holder(tmp_path, accelerator):
    import os

    from distill.run.locking import RunDirLock

    pipeline = make_pipeline(tmp_path, accelerator)
    holder = RunDirLock(tmp_path / "plan")
    assert holder.try_acquire() is None
    with pytest.raises(DistillError, match=rf"run dir .*plan is in use by PID {os.getpid()} on host "):
        pipeline.run()
    assert not (tmp_path / "plan" / "first").exists()
    holder.release()  # the first launch ends
    pipeline.run()
    assert (tmp_path / "plan" / "third" / "manifest.json").is_file()


def test_a_failed_stage_leaves_config_yaml_and_its_finished_output_and_going_back_works(tmp_path, accelerator):
    """The lockout of issue #13: a finished run, a new eval file that fails, then back to the old config."""
    make_pipeline(tmp_path, accelerator).run()
    run_dir = tmp_path / "plan"
    config_yaml, third = (run_dir / "config.yaml").read_text(), (run_dir / "third" / "manifest.json").read_text()
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(b"\0\1\2" * 100)
    with pytest.raises(DistillError, match="is not text"):
        make_pipeline(tmp_path, accelerator, **{"eval.files": f"[{garbage}]"}).run()
    assert (run_dir / "third.partial").is_dir(), "the failed attempt is kept"
    assert (run_dir / "config.yaml").read_text() == config_yaml, "a failed stage never changes config.yaml"
    assert (run_dir / "third" / "manifest.json").read_text() == third

    # the new config again: refused, naming the real difference and the way out
    with pytest.raises(DistillError) as refusal:
        actions(make_pipeline(tmp_path, accelerator, **{"eval.files": f"[{tmp_path / 'other.txt'}]"}))
    message = str(refusal.value)
    assert f"input file {garbage} removed" in message and f"input file {tmp_path / 'other.txt'} added" in message
    assert "--discard-partial third" in message and "changed" not in message

    # back to the config of the finished stages: nothing runs, the unfinished attempt is kept
    back = actions(make_pipeline(tmp_path, accelerator))
    assert [action for _, action, _ in back] == ["skip"] * 3
    assert "was made with other inputs and is kept" in back[2][2] and "--discard-partial third" in back[2][2]
    make_pipeline(tmp_path, accelerator).run()
    assert (run_dir / "third.partial").is_dir() and (run_dir / "third" / "manifest.json").read_text() == third

    # --only (and --from) drop the stage's unfinished run and run it again; --discard-partial just drops it
    only = make_pipeline(tmp_path, accelerator)
    assert only.plan(STAGES, {"third"})[2].discard
    only.run(only="third")
    assert not (run_dir / "third.partial").exists() and (run_dir / "third" / "manifest.json").read_text() != third
    (run_dir / "third.partial").mkdir()
    write_json(run_dir / "third.partial" / "inputs.json", {"inputs": {"config.eval.batch_size": 99}})
    finished = (run_dir / "third" / "manifest.json").read_text()
    make_pipeline(tmp_path, accelerator, discard=("third",)).run()
    assert not (run_dir / "third.partial").exists() and (run_dir / "third" / "manifest.json").read_text() == finished


def test_a_manifest_of_the_wrong_shape_is_refused_in_one_line_and_from_recovers(tmp_path, accelerator):
    make_pipeline(tmp_path, accelerator).run()
    path = tmp_path / "plan" / "second" / "manifest.json"
    path.write_text(json.dumps(["valid", "json", "wrong", "shape"]))
    with pytest.raises(DistillError) as refusal:
        make_pipeline(tmp_path, accelerator).run()
    message = str(refusal.value)
    assert f"corrupt file {path}: expected a JSON object, found list" in message and "--from second" in message
    assert "\n" not in message
    make_pipeline(tmp_path, accelerator).run(start_from="second")
    assert read_json(path)["stage"] == "second"


def test_what_a_killed_launch_left_is_cleaned_up_or_finished(tmp_path, accelerator):
    make_pipeline(tmp_path, accelerator).run()
    run_dir = tmp_path / "plan"
    stale = [run_dir / ".config.yaml.tmp4242", run_dir / "second" / ".manifest.json.tmp17"]
    for path in stale:
        path.write_text("half written")
    (run_dir / "third" / ".step_00000004.tmp").mkdir()
    # killed while landing: the finished output was still in third.partial, manifest written
    (run_dir / "third").rename(run_dir / "third.partial")
    completion = read_json(run_dir / "third.partial" / "manifest.json")["completion"]
    plan = make_pipeline(tmp_path, accelerator)
    plan.run()
    assert not any(path.exists() for path in stale) and not (run_dir / "third" / ".step_00000004.tmp").exists()
    assert not (run_dir / "third.partial").exists()
    assert read_json(run_dir / "third" / "manifest.json")["completion"] == completion, "landed, not run again"


def test_input_files_are_stamped_by_content_not_by_mtime(tmp_path, accelerator):
    """A re-provisioned copy of the same bytes (a new mtime) runs nothing again; new bytes of the
    same size do; a damaged hash cache is rebuilt, not trusted."""
    import os

    from distill.run.file_stamps import CACHE_FILE

    text = tmp_path / "eval.txt"
    text.write_text("the same bytes\n" * 50)
    files = {"eval.files": f"[{text}]"}
    make_pipeline(tmp_path, accelerator, **files).run()
    run_dir = tmp_path / "plan"
    cache = read_json(run_dir / CACHE_FILE)
    assert cache[str(text)]["sha256"] == read_json(run_dir / "third" / "manifest.json")["inputs"][f"file:{text}"]["sha256"]

    stat = text.stat()
    os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert [action for _, action, _ in actions(make_pipeline(tmp_path, accelerator, **files))] == ["skip"] * 3
    (run_dir / CACHE_FILE).write_text("{not json")
    assert [action for _, action, _ in actions(make_pipeline(tmp_path, accelerator, **files))] == ["skip"] * 3

    stat = text.stat()

    text.write_text("other bytes, same size\n"[:15] * 50)
    assert text.stat().st_size == stat.st_size
    assert actions(make_pipeline(tmp_path, accelerator, **files))[2] == ("third", "running again", f"input file {text} changed")
