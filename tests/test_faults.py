"""Fault injection on the whole pipeline (tiny teacher, real processes and launches): SIGKILLs at seeded random
points of every stage, a config change whose stage fails and is then taken back, a full disk.
Each case ends in a non-zero exit with one line, or recovers; no finished stage or good checkpoint
is lost, and a recovered run is bitwise the run that was never interrupted."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import launch, launch_command, run_pipeline, start_pipeline, tiny_config, write_config

STAGES = ["teacher", "teacher_logits", "prune", "distill", "export", "evaluate"]
# enough work in every stage that a kill can land inside it: teacher samples, a cached top-k, checkpoints
TRAIN = {"steps": 16, "checkpoint_every": 4, "log_every": 2, "global_batch_size": 4, "micro_batch_size": 2,
         "loss": {"teacher_topk": 8}}
DATA_WITH_SAMPLES = {"name": "samples", "kind": "teacher", "samples": {"num_sequences": 8, "max_new_tokens": 48, "batch_size": 4}}


def faulty_config(tmp_path: Path, teacher: Path, name: str, output_dir: Path | None = None) -> Path:
    config = tiny_config(tmp_path, teacher, name=name, train=TRAIN)
    config["data"]["sources"].append(DATA_WITH_SAMPLES)
    if output_dir is not None:
        config["run"]["output_dir"] = str(output_dir)
    return write_config(tmp_path / f"{name}.yaml", config)


def outputs(run_dir: Path) -> dict[str, bytes]:
    """The bytes users keep: the distilled student, both exports."""
    files = [run_dir / "distill" / "student" / "model.safetensors", run_dir / "export" / "hf" / "model.safetensors",
             run_dir / "export" / "packed" / "model.safetensors"]
    return {str(path.relative_to(run_dir)): path.read_bytes() for path in files}


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("distill: error:")]


def files(run_dir: Path) -> list[str]:
    return sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*"))


def kill_once_in_every_stage(config: Path, run_dir: Path, rng: random.Random) -> list[str]:
    """Start a run, SIGKILL it at a random moment once a stage's work dir exists, start again, for
    each stage in turn; the stages the kills landed in. The runs are plain processes (killing a
    launcher takes its workers with it: tests/test_pipeline.py's kill tests check that)."""
    landed = []
    for stage in STAGES:
        if (run_dir / stage / "manifest.json").is_file():
            continue  # a previous run got past it before its kill
        process = start_pipeline(config)
        deadline = time.time() + 300
        while not ((run_dir / f"{stage}.partial").is_dir() or (run_dir / stage / "manifest.json").is_file()):
            assert process.poll() is None, f"the run ended before its kill in {stage}:\n{process.error_output()[-3000:]}"
            assert time.time() < deadline, f"stage {stage} never started"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))
        if process.poll() is not None:  # finished first: nothing left to kill
            break
        process.kill()
        landed.append(stage)
    return landed


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_teacher) -> Path:
    """The run dir of one uninterrupted run of the faulty config, shared by this module's tests (run.name
    and run.output_dir are not part of any stage's inputs, so a copy of it is a finished run anywhere)."""
    where = tmp_path_factory.mktemp("faults_reference")
    run_pipeline(faulty_config(where, tiny_teacher, "reference"))  # the launches under test go through launch.sh
    return where / "runs" / "reference"


@pytest.mark.slow  # a reference run plus one run per kill
def test_seeded_random_kills_across_every_stage_recover_to_the_bitwise_same_run(tmp_path, tiny_teacher, reference_run):
    expected = outputs(reference_run)
    expected_files = files(reference_run)

    config = faulty_config(tmp_path, tiny_teacher, "killed")
    run_dir = tmp_path / "runs" / "killed"
    rng = random.Random(13)
    # a round is a kill in every stage, then a launch that finishes; DISTILL_KILL_ROUNDS=5: 30 kills
    for _ in range(int(os.environ.get("DISTILL_KILL_ROUNDS", "1"))):
        shutil.rmtree(run_dir, ignore_errors=True)
        landed = kill_once_in_every_stage(config, run_dir, rng)
        assert len(landed) >= 4, f"the kills landed in too few stages: {landed}"

        finished = run_pipeline(config)  # the killed launches went through launch.sh; this one need not
        assert "Traceback" not in finished.stderr
        assert all((run_dir / stage / "manifest.json").is_file() for stage in STAGES)
        # no partial dir, temp file, `.STAGE.old` or stray inputs.json: the files of the run never killed
        assert files(run_dir) == expected_files, f"after kills in {landed}"
        actual = outputs(run_dir)
        for name in expected:
            assert actual[name] == expected[name], f"{name} differs from the uninterrupted run after kills in {landed}"


@pytest.mark.slow  # launches on a finished run
def test_a_failing_new_eval_file_locks_nothing_and_going_back_skips_everything(tmp_path, tiny_teacher, reference_run):
    config = faulty_config(tmp_path, tiny_teacher, "lockout")
    run_dir = tmp_path / "runs" / "lockout"
    shutil.copytree(reference_run, run_dir)  # the finished run, under this config's name
    config_yaml, evaluate = (run_dir / "config.yaml").read_text(), (run_dir / "evaluate" / "manifest.json").read_text()

    # text for its first MiB (so the launch's early check passes), then bytes no reader accepts
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"plain text line\n" * 70_000 + b"\xff\xfe\x00\x81" * 64)
    failed = launch(config, f"eval.files=[{bad}]", check=False)
    assert failed.returncode == 2 and len(errors(failed)) == 1 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert str(bad) in errors(failed)[0]
    assert (run_dir / "config.yaml").read_text() == config_yaml
    assert (run_dir / "evaluate" / "manifest.json").read_text() == evaluate

    # the launcher is under test above; the runs after it are plain processes
    back = run_pipeline(config)
    assert back.stdout.count("up to date, skipped") == len(STAGES), back.stdout
    assert "was made with other inputs and is kept" in back.stdout
    again = run_pipeline(config, "--only", "evaluate")
    assert "[evaluate] discarding the unfinished run" in again.stdout and not (run_dir / "evaluate.partial").exists()

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    refused = run_pipeline(config, f"eval.files=[{empty}]", check=False)
    assert refused.returncode == 2 and errors(refused) == [
        f"distill: error: config key 'eval.files': data file {empty} holds no text (it is empty or only whitespace)"]


def _can_mount_a_small_filesystem() -> str | None:
    """None when this process can mount a size-limited tmpfs in its own user and mount namespace."""
    if not shutil.which("unshare"):
        return "no unshare command"
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d && rmdir $d"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs here: {probe.stderr.strip()[:200]}"


@pytest.mark.slow  # a pipeline run on a filesystem that fills up
def test_a_full_disk_stops_in_one_line_keeps_the_last_good_state_and_the_same_command_then_finishes(tmp_path, tiny_teacher):
    reason = _can_mount_a_small_filesystem()
    if reason:
        pytest.skip(reason)
    small = tmp_path / "small"
    small.mkdir()
    config = faulty_config(tmp_path, tiny_teacher, "full", output_dir=small / "runs")
    command = " ".join(f"'{part}'" for part in launch_command(config))
    report = tmp_path / "report"
    report.mkdir()
    # Inside a private mount namespace: a tmpfs big enough for the teacher and prune stages but not
    # for distill's checkpoints; run; record; "free space" (grow the tmpfs); run the same command.
    script = f"""
        set -u
        mount -t tmpfs -o size=40m tmpfs {small}
        {command} > {report}/first.out 2> {report}/first.err; echo $? > {report}/first.rc
        ls -a {small}/runs/full > {report}/after_first.ls
        find {small}/runs -name '.*.tmp*' -o -name '.tmp*' > {report}/temporaries.ls
        cp {small}/runs/full/prune/manifest.json {report}/prune_manifest.json 2>/dev/null
        mount -o remount,size=2g {small}
        {command} > {report}/second.out 2> {report}/second.err; echo $? > {report}/second.rc
        ls {small}/runs/full > {report}/after_second.ls
    """
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script], check=True,
                   env={**os.environ, "PYTHON": sys.executable}, timeout=900)
    first_err = (report / "first.err").read_text()
    assert (report / "first.rc").read_text().strip() == "2", first_err[-3000:]
    lines = [line for line in first_err.splitlines() if line.startswith("distill: error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "run the same command again" in lines[0], first_err[-3000:]
    assert "Traceback" not in first_err
    assert (report / "temporaries.ls").read_text().strip() == "", "temp files are cleaned on the way out"
    assert (report / "prune_manifest.json").is_file(), "the finished stages are kept"
    assert (report / "second.rc").read_text().strip() == "0", (report / "second.err").read_text()[-3000:]
    second = (report / "second.out").read_text()
    assert "[prune] up to date, skipped" in second and "[evaluate] finished" in second
    assert set(STAGES) <= set((report / "after_second.ls").read_text().split())
