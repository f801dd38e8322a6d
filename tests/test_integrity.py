"""Nothing silently wrong: every byte a finished stage wrote is checked before a launch uses it, a run
dir is recognised before anything in it is deleted, a killed launch leaves nothing behind, and a
diverged student is refused rather than finished.

Most launches here call the entry point in this process (pipelines/run.py's `main`, the function a
launch runs), so that every file of a real run can be damaged in turn in seconds; one goes through
launch.sh to check what a user's terminal shows."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import shutil
from pathlib import Path

import pytest

from conftest import REPO, launch, run_pipeline, tiny_config, write_config
from distill.data.teacher_cache import TeacherCache
from distill.data.token_blocks import StoredBlocks
from distill.errors import DistillError

STAGES = ["teacher", "teacher_logits", "prune", "distill", "export", "evaluate"]


def _entry_point():
    spec = importlib.util.spec_from_file_location("distill_run", REPO / "pipelines" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_teacher):
    """A finished tiny run whose every stage wrote files (teacher_logits its cached top-k)."""
    tmp_path = tmp_path_factory.mktemp("integrity")
    config = tiny_config(tmp_path, tiny_teacher, name="intact", run={"precision": "fp32"},
                         train={"steps": 4, "checkpoint_every": 2, "log_every": 2, "loss": {"teacher_topk": 8}})
    path = write_config(tmp_path / "intact.yaml", config)
    run_pipeline(path)
    return path, tmp_path / "runs" / "intact"


@pytest.fixture
def launch_here(capsys):
    """Launch the pipeline in this process: (exit code, its `distill: error:` lines, stdout)."""
    from accelerate.state import AcceleratorState

    main = _entry_point()

    def run(*argv: str) -> tuple[int, list[str], str]:
        try:
            code = main([str(arg) for arg in argv])
        finally:  # the next launch builds its own Accelerator, as a new process would
            AcceleratorState._reset_state(reset_partial_state=True)
        out, err = capsys.readouterr()
        return code, [line for line in err.splitlines() if "error:" in line], out

    return run


def _recorded(run_dir: Path, stage: str) -> dict[str, dict]:
    return json.loads((run_dir / stage / "manifest.json").read_text())["files"]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _read_whole_and_refuse(stage: str, path: Path) -> None:
    if stage == "teacher_logits":
        with pytest.raises(DistillError, match=f"corrupt teacher cache shard {path}"):
            cache = TeacherCache(path.parent)
            cache.blocks(range(cache.layout.blocks))
    else:
        with pytest.raises(DistillError, match=f"corrupt token block shard {path}"):
            StoredBlocks(path.parents[1]).train[:]


@pytest.mark.slow  # a pipeline run of its own (shared by this module)
def test_every_file_of_every_finished_stage_flipped_or_truncated_is_named_and_never_used(finished, launch_here):
    config, run_dir = finished
    checked = 0
    for stage in ("teacher", "teacher_logits"):
        assert any(entry.get("checked_by_reader") for entry in _recorded(run_dir, stage).values())
    for stage in STAGES:
        files = _recorded(run_dir, stage)
        assert files, f"stage {stage} recorded no files"
        for name, entry in files.items():
            path = run_dir / stage / name
            intact = path.read_bytes()
            for harm in ("flip", "truncate"):
                _flip(path) if harm == "flip" else path.write_bytes(intact[: len(intact) // 2])
                if harm == "flip" and entry.get("checked_by_reader"):
                    # recorded by size alone (a shard of token blocks or of the teacher cache): the
                    # reader's per-block CRC finds it
                    _read_whole_and_refuse(stage, path)
                    path.write_bytes(intact)
                    checked += 1
                    continue
                code, errors, out = launch_here(config)
                path.write_bytes(intact)
                assert code == 2 and len(errors) == 1, (stage, name, harm, errors)
                assert f"stage '{stage}' is damaged: {path}" in errors[0] and f"--from {stage}" in errors[0], errors[0]
                assert "skipped" not in out and "running" not in out, "nothing runs or is skipped past a damaged stage"
                checked += 1
    assert checked >= 40  # tokenizer, data, top-k, students, both exports, the report ...
    code, errors, out = launch_here(config)
    assert code == 0 and out.count("up to date, skipped") == len(STAGES), errors


@pytest.mark.slow  # a pipeline run of its own (shared by this module)
def test_a_stage_that_reads_a_damaged_upstream_stage_refuses_and_from_that_stage_repairs_it(finished, launch_here):
    config, run_dir = finished
    packed = run_dir / "export" / "packed" / "model.safetensors"
    intact = packed.read_bytes()
    _flip(packed)
    code, errors, _ = launch_here(config, "--only", "evaluate")
    assert code == 2 and len(errors) == 1 and f"stage 'export' is damaged: {packed}" in errors[0], errors
    code, errors, out = launch_here(config, "--from", "export")
    assert code == 0 and "[export] running again" in out, errors
    assert packed.read_bytes() == intact, "the export is deterministic: running it again restores the bytes"


@pytest.mark.slow  # a pipeline run of its own (shared by this module)
def test_a_damaged_stage_through_launch_sh_is_one_line_and_no_traceback(finished):
    config, run_dir = finished
    student = run_dir / "distill" / "student" / "model.safetensors"
    intact = student.read_bytes()
    _flip(student)
    try:
        result = launch(config, "--only", "export", check=False)
    finally:
        student.write_bytes(intact)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert errors[0].startswith(f"distill: error: stage 'distill' is damaged: {student} does not match the sha256")


@pytest.mark.slow  # a pipeline run of its own (shared by this module)
def test_a_killed_launch_leaves_nothing_the_next_one_keeps(finished, launch_here, tmp_path):
    config, run_dir = finished
    copy = tmp_path / "runs" / "intact"
    shutil.copytree(run_dir, copy)
    expected = sorted(str(path.relative_to(copy)) for path in copy.rglob("*"))
    # what a SIGKILL can leave: a safetensors temp inside a stage, ours, and the rename's remains
    (copy / "export" / "hf" / ".tmpQx81Ab").write_bytes(b"half a model")
    (copy / "distill" / ".model.safetensors.tmp4242").write_bytes(b"half")
    shutil.copytree(copy / "distill", copy / ".distill.old")
    (copy / "distill" / "inputs.json").write_text("{}")
    code, errors, out = launch_here(config, f"run.output_dir={tmp_path / 'runs'}")
    assert code == 0 and out.count("up to date, skipped") == len(STAGES), errors
    assert sorted(str(path.relative_to(copy)) for path in copy.rglob("*")) == expected


@pytest.mark.slow  # a pipeline run of its own (shared by this module)
def test_restart_from_and_discard_delete_nothing_in_a_dir_distill_did_not_make(finished, launch_here, tmp_path):
    config, _ = finished
    victim = tmp_path / "elsewhere" / "victim"
    victim.mkdir(parents=True)
    (victim / "important.txt").write_text("keep me")
    (victim / ".notes.tmp1").write_text("keep me too")  # looks like a temp file of ours
    place = [f"run.output_dir={victim.parent}", "run.name=victim"]
    for flags in (["--restart"], ["--from", "prune"], ["--discard-partial", "distill"], []):
        code, errors, _ = launch_here(config, *place, *flags)
        assert code == 2 and len(errors) == 1 and f"not a distill run dir: {victim}" in errors[0], (flags, errors)
    assert sorted(path.name for path in victim.iterdir()) == [".notes.tmp1", "important.txt"]
    # an empty dir is taken (and marked), as a missing one is made
    empty = tmp_path / "elsewhere" / "empty"
    empty.mkdir()
    code, errors, _ = launch_here(config, f"run.output_dir={empty.parent}", "run.name=empty", "--only", "teacher")
    assert code == 0 and (empty / ".distill-run").is_file(), errors


@pytest.mark.slow  # a pipeline run of its own (shared by this module)
def test_trackers_write_inside_the_run_dir(finished, launch_here, tmp_path):
    config, _ = finished
    code, errors, _ = launch_here(config, "tracking.backend=tensorboard", "tracking.project=../../../../escape")
    assert code == 2 and len(errors) == 1 and "'tracking.project'" in errors[0] and ".." in errors[0], errors
    # wandb offline, started elsewhere with no WANDB_DIR: its files go under the run dir's logs/. In a
    # process of its own: wandb leaves its service running in the process that starts it, and every
    # later launch from this one would share it
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    output = tmp_path / "runs"
    result = subprocess.run([sys.executable, str(REPO / "pipelines" / "run.py"), str(config), f"run.output_dir={output}",
                             "run.name=tracked", "tracking.backend=wandb", "train.steps=2"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((output / "tracked" / "logs" / "wandb").glob("offline-run-*"))
    assert not (tmp_path / "wandb").exists()


@pytest.mark.slow  # a pipeline run of its own (shared by this module)
def test_a_student_whose_loss_never_recovered_is_not_finished(finished, launch_here, tmp_path):
    config, run_dir = finished
    copy = tmp_path / "runs" / "intact"
    shutil.copytree(run_dir, copy)
    student = (copy / "distill" / "student" / "model.safetensors").read_bytes()
    code, errors, _ = launch_here(config, f"run.output_dir={tmp_path / 'runs'}", "train.lr=1e12",
                                  "train.on_nonfinite=skip", "train.steps=6")
    assert code == 2 and len(errors) == 1 and "the loss never recovered" in errors[0], errors
    assert (copy / "distill" / "student" / "model.safetensors").read_bytes() == student, "the finished student stays"
    assert not (copy / "distill.partial" / "student").exists()


def test_a_diverged_perplexity_is_reported_as_inf():
    from distill.eval.scoring import perplexity

    assert perplexity(math.log(25.0)) == pytest.approx(25.0)
    assert perplexity(1e4) == math.inf
