"""Bad input ends in one line, `distill: error: ...` (or `launch.sh: error: ...`), exit code 2, no
traceback: through the real commands, `bash launch.sh` and `python pipelines/run.py`."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, launch, run_pipeline, tiny_config, write_config

# torch elastic's log lines: a level letter, the date and time, the pid, the file
ELASTIC_LOG_LINE = re.compile(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d")


def assert_refused(result: subprocess.CompletedProcess, *expected: str, prefix: str = "distill: error:") -> str:
    """Exit code 2 and exactly one error line, which says every one of `expected`; no traceback, and
    nothing after it."""
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(prefix), result.stderr[-3000:]
    assert all(text in errors[0] for text in expected), errors[0]
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0], "nothing may follow the error line"
    return errors[0]


def launch_sh(*args: str) -> subprocess.CompletedProcess:
    """launch.sh with exactly these arguments (the conftest helper adds --accelerate cpu first)."""
    return subprocess.run(["bash", str(REPO / "launch.sh"), *args], capture_output=True, text=True)


@pytest.fixture
def config(tmp_path, tiny_teacher):
    return write_config(tmp_path / "c.yaml", tiny_config(tmp_path, tiny_teacher))


def test_a_binary_config_file(tmp_path):
    binary = tmp_path / "random.yaml"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    assert_refused(launch(binary, check=False), f"config file {binary} is not a YAML text file: not UTF-8")


@pytest.fixture(scope="module")
def small_vocab_teacher(tmp_path_factory, demo_teacher_dir):
    """The tiny teacher's shape with 1000 embedding rows, saved with the demo's 49152-token tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(demo_teacher_dir)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("small_vocab_teacher")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow  # a pipeline launch in a process of its own
def test_a_tokenizer_larger_than_the_teacher_vocabulary(tmp_path, small_vocab_teacher):
    from transformers import AutoTokenizer

    tokens = len(AutoTokenizer.from_pretrained(small_vocab_teacher))
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, small_vocab_teacher))
    assert_refused(run_pipeline(config, check=False), f"teacher '{small_vocab_teacher}'",
                   f"tokenizer has {tokens} token ids", "has only 1000 rows")


@pytest.mark.slow  # a pipeline launch in a process of its own
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-evaluation-harness (extra [eval])")
def test_an_unknown_lm_eval_task_is_refused_before_any_stage(tmp_path, config):
    result = run_pipeline(config, "eval.lm_eval.tasks=[nosuchtask]",
                          f"eval.lm_eval.include_path={REPO / 'configs' / 'lm_eval'}", check=False)
    assert_refused(result, "config key 'eval.lm_eval.tasks': unknown lm-eval task 'nosuchtask'", "lm-eval ls tasks",
                   "eval.lm_eval.include_path")
    assert not list(tmp_path.glob("runs/*/teacher*")), "refused before the first stage"


@pytest.mark.slow  # a pipeline launch in a process of its own
def test_a_json_data_file_of_the_wrong_shape(tmp_path, config):
    numbers = tmp_path / "numbers.json"
    numbers.write_text("[1, 2, 3]\n")
    result = run_pipeline(config, f"data.sources.0.files=[{numbers}]", check=False)
    assert_refused(result, f"data file {numbers}", "holds int values, not strings")


@pytest.mark.parametrize("betas,key,value", [("[2,3]", "train.betas[0]", "2.0"), ("[0.9,1.0]", "train.betas[1]", "1.0"),
                                             ("[-0.1,0.9]", "train.betas[0]", "-0.1")])
def test_adam_betas_outside_0_to_1(config, betas, key, value):
    assert_refused(launch(config, f"train.betas={betas}", check=False), f"config key '{key}': {value} is not in [0, 1)")


@pytest.mark.parametrize("override,message", [
    ("train.lr=.nan", "config key 'train.lr': nan is not a finite number"),
    ("train.lr=.inf", "config key 'train.lr': inf is not a finite number"),
    ("train.lr=-.inf", "config key 'train.lr': -inf is not a finite number"),
    ("train.lr=0", "config key 'train.lr': 0.0 must be > 0"),
    ("train.lr=-1e-3", "config key 'train.lr': -0.001 must be > 0"),
    ("train.loss.temperature=.inf", "config key 'train.loss.temperature': inf is not a finite number"),
    ("data.sources.0.heldout_fraction=.nan", "config key 'data.sources[0].heldout_fraction': nan is not a finite number"),
])
def test_a_float_that_is_not_a_finite_number_in_range(config, override, message):
    assert_refused(launch(config, override, check=False), message)


def test_an_unknown_flag_to_run_py(config):
    assert_refused(run_pipeline(config, "--bogus", check=False), "unrecognized arguments: --bogus")


def test_an_unknown_flag_through_launch_sh(config):
    assert_refused(launch(config, "--bogus", check=False), "unrecognized arguments: --bogus")


@pytest.mark.parametrize("flag", ["--accelerate", "--num-processes"])
def test_a_launch_flag_without_its_value(flag, config):
    assert_refused(launch_sh(flag), f"{flag} needs a value", prefix="launch.sh: error:")
    assert_refused(launch_sh(str(config), flag), f"{flag} needs a value", prefix="launch.sh: error:")


@pytest.mark.slow  # two torch processes under the torch launcher
def test_a_refusal_on_two_ranks_is_one_line(config):
    """--only export on a fresh run dir passes the config check and is refused inside the pipeline,
    on both ranks: one line, no torch elastic log lines, no launcher summary."""
    result = launch_sh("--accelerate", "cpu", "--num-processes", "2", str(config), "--only", "export")
    assert_refused(result, "stage 'export' needs stage 'distill' finished first")
    assert not [line for line in result.stderr.splitlines() if ELASTIC_LOG_LINE.match(line) or line.startswith("launch:")]


def load_launcher():
    spec = importlib.util.spec_from_file_location("launcher", REPO / "pipelines" / "launch.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    return launcher


def test_the_launcher_prints_one_refusal_or_else_a_summary(tmp_path, capsys):
    launcher = load_launcher()
    (tmp_path / "1.txt").write_text("distill: error: from rank one\n")
    (tmp_path / "0.txt").write_text("distill: error: from rank zero\n")
    assert launcher.report_failure(tmp_path, -15, [-15, 2]) == 2
    assert capsys.readouterr().err == "distill: error: from rank zero\n"
    for path in tmp_path.iterdir():
        path.unlink()
    # no process said why (killed by a signal, or a crash with its own traceback): the exit codes
    assert launcher.report_failure(tmp_path, -9, [-9, -15]) == 128 + 9
    assert capsys.readouterr().err == "launch: 2 process(es) failed with exit code [-15, -9]\n"


def test_a_killed_launchers_refusal_dir_is_removed_by_the_next_launcher(tmp_path):
    launcher = load_launcher()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f"{launcher.REFUSALS_PREFIX}{dead.stdout.strip()}-x1y2"
    alive = tmp_path / f"{launcher.REFUSALS_PREFIX}{os.getpid()}-a3b4"
    unrelated = tmp_path / "distill-refusals-notes"
    for path in (abandoned, alive, unrelated):
        path.mkdir()
    launcher.remove_abandoned_refusal_dirs(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([alive.name, unrelated.name])


def torch_loaded_by(code: str) -> bool:
    result = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print('torch' in sys.modules)"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1] == "True"


def test_the_config_check_loads_no_torch(config):
    """launch.sh checks the config before it probes CUDA or starts accelerate: a bad key is refused in
    a fraction of a second, not after the seconds torch takes to import."""
    assert not torch_loaded_by("import distill.config, distill.errors")
    check = ("import runpy, sys\nsys.argv = ['run.py', '--check-config', {config!r}{extra}]\n"
             "try:\n    runpy.run_path('pipelines/run.py', run_name='__main__')\nexcept SystemExit as done:\n"
             "    assert done.code == {code}, done.code\n")
    assert not torch_loaded_by(check.format(config=str(config), extra="", code=0))  # a good config, checked
    assert not torch_loaded_by(check.format(config=str(config), extra=", 'bogus.key=1'", code=2))


def test_the_launch_refuses_a_bad_key_before_probing_cuda(config, tmp_path):
    """With a `python` on PATH that says when it is asked to import torch, the refusal of a bad key
    never asks."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text(f'#!/bin/sh\ncase "$*" in *torch*) echo "torch probed" >&2;; esac\n'
                                     f'exec {sys.executable} "$@"\n')
    (fake_bin / "python").chmod(0o755)
    result = subprocess.run(["bash", str(REPO / "launch.sh"), str(config), "bogus.key=1"], capture_output=True,
                            text=True, env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"})
    assert_refused(result, "config key 'bogus'")
    assert "torch probed" not in result.stderr


def marked_run_dir(path):
    """An empty run dir as distill makes it (its marker), so the pipeline may delete inside it."""
    path.mkdir(parents=True)
    (path / ".distill-run").write_text('{"made_by": "distill"}\n')
    return path


@pytest.mark.slow  # a pipeline launch in a process of its own
def test_a_stage_partial_dir_that_is_a_symlink(tmp_path, config):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    partial = marked_run_dir(tmp_path / "runs" / "tiny") / "teacher.partial"
    partial.symlink_to(elsewhere)
    result = run_pipeline(config, "--discard-partial", "teacher", check=False)
    assert_refused(result, f"{partial} is a symbolic link (to {elsewhere})", "remove the link")
    assert elsewhere.is_dir(), "what the link points to is kept"


@pytest.mark.slow  # a pipeline launch in a process of its own
def test_a_run_dir_that_is_a_symlink_on_restart(tmp_path, config):
    real = marked_run_dir(tmp_path / "real")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(real)
    result = run_pipeline(config, "--restart", check=False)
    assert_refused(result, f"{tmp_path / 'runs' / 'tiny'} is a symbolic link (to {real})")
    assert (real / ".distill-run").is_file(), "nothing was deleted through the link"
