import os
import re
import shutil

import pytest
import yaml

from conftest import REPO, launch, run_pipeline, tiny_config, write_config
from distill.run.config_file import load_config
from distill.errors import DistillError


def test_demo_config_loads_and_overrides_reach_nested_keys():
    config = load_config(REPO / "configs" / "demo.yaml",
                         ["train.steps=7", "train.loss.kd_weight=2", "data.sources.0.samples.num_sequences=3",
                          "eval.files=[a.txt,b.txt]", "train.lr=1e-3"])
    assert config.train.steps == 7
    assert config.train.loss.kd_weight == 2.0
    assert config.data.sources[0].samples.num_sequences == 3
    assert config.eval.files == ["a.txt", "b.txt"]
    assert config.train.lr == pytest.approx(1e-3)
    assert str(config.run_dir) == "runs/demo"


@pytest.mark.parametrize("text,overrides,message", [
    ("train: {steps: 3", [], "not valid YAML at line"),
    ("train: {stepz: 3}", [], "config key 'train.stepz'"),
    ("train: {steps: many}", [], "config key 'train.steps'"),
    ("prune: {n: 4, m: 4}", [], "N:M sparsity needs N < M, got 4:4"),
    ("prune: {criterion: best}", [], "'prune.criterion': 'best' is not one of"),
    ("data: {sources: [{name: a, kind: files}]}", [], "a files source needs at least one file"),
    ("data: {sources: [{name: a, kind: files, files: [x.txt], extra: 1}]}", [], "config key 'data.sources[0].extra'"),
    ("data: {sources: [{name: a, kind: files, files: [x.txt], streaming: true}]}", [],
     "config key 'data.sources[0].streaming': only a hub source streams"),
    ("{}", ["data.shard_blocks=0"], "'data.shard_blocks': 0 must be > 0"),
    ("{}", ["train.steps"], "is not of the form key=value"),
    ("{}", ["nosuch.key=1"], "config key 'nosuch'"),
    ("{}", ["train.global_batch_size=6"], "not a multiple of train.micro_batch_size"),
    ("- a list", [], "must hold a mapping"),
    ("train: {loss: {divergence: tv}}", [], "'train.loss.divergence': 'tv' is not one of"),
    ("{}", ["train.loss.jsd_beta=1.0"], "'train.loss.jsd_beta': 1.0 is not in (0, 1)"),
    ("train: {loss: {teacher_topk: 8, temperature: 2.0}}", [], "the cached teacher (train.loss.teacher_topk) is stored at temperature 1"),
    ("train: {loss: {teacher_topk: 8, hidden_weight: 1.0}}", [], "hidden-state matching needs the live teacher"),
    ("speed: {compile: sometimes}", [], "config key 'speed.compile'"),
    ("{}", ["train.checkpoint_every=7"], "'train.checkpoint_every': 7 is not a multiple of train.log_every (5)"),
    ("{}", ["run.collective_timeout_minutes=0"], "'run.collective_timeout_minutes': 0 must be > 0"),
    ("{}", ["train.masks.noise=-1"], "'train.masks.noise': -1.0 must be >= 0"),
    ("{}", ["activations.target=1.5"], "'activations.target': 1.5 is not in [0, 1)"),
    ("{}", ["activations.allocation=best"], "'activations.allocation': 'best' is not one of uniform, greedy"),
    ("{}", ["activations.ramp_steps=20"], "'activations.ramp_steps': the ramp moves the thresholds when they are re-calibrated"),
    ("{}", ["eval.activation_levels=[0.5,1.0]"], "'eval.activation_levels': 1.0 is not in [0, 1)"),
    ("{}", ["train.masks.mode=sometimes"], "'train.masks.mode': 'sometimes' is not one of fixed, dynamic, learnable"),
    ("data: {sources: [{name: a, kind: web, files: [x.txt]}]}", [], "'data.sources[0].kind': 'web' is not one of files, hub, teacher"),
    ("{}", ["prune.pattern=nm", "train.masks.mode=learnable", "prune.pattern=block"],
     "'train.masks.mode': learnable masks choose among N:M patterns, not 'block'"),
    ("data: {sources: [{name: a, kind: files, files: [x.txt], heldout_fraction: lots}]}", [],
     "config key 'data.sources[0].heldout_fraction'"),
    ("{}", ["run.name=" + "n" * 300], "'run.name': 300 bytes is longer than the 249"),
    ("{}", ["run.name=a/b"], "'run.name': 'a/b' is not a directory name"),
    ("{}", ["train.betas=[0.9,1.0]"], "'train.betas[1]': 1.0 is not in [0, 1)"),
    ("{}", ["train.lr=.nan"], "'train.lr': nan is not a finite number"),
    ("{}", ["train.max_grad_norm=.inf"], "'train.max_grad_norm': inf is not a finite number"),
    ("{}", ["train.masks.noise=.nan"], "'train.masks.noise': nan is not a finite number"),
    ("{}", ["speed.peak_tflops=.inf"], "'speed.peak_tflops': inf is not a finite number"),
    ("{}", ["eval.activation_levels=[0.5,.nan]"], "'eval.activation_levels[1]': nan is not a finite number"),
    ("{}", ["data.sources.0.samples.temperature=-.inf"], "'data.sources[0].samples.temperature': -inf is not a finite number"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, overrides, message):
    path = tmp_path / "bad.yaml"
    parsed = yaml.safe_load(text) if "{steps: 3\n" not in text + "\n" else None
    if isinstance(parsed, dict) and "data" not in parsed:  # a valid data section, so only the tested key is wrong
        parsed["data"] = {"sources": [{"name": "a", "kind": "files", "files": ["x.txt"]}]}
        text = yaml.safe_dump(parsed)
    path.write_text(text)
    with pytest.raises(DistillError, match=re.escape(message)) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)


def test_every_float_key_refuses_nan():
    """No float of the schema takes nan: each has a range, and nan passes every comparison-based check."""
    from distill.run.config_file import config_from_dict

    sources = {"data": {"sources": [{"name": "a", "kind": "files", "files": ["x.txt"]}]}}
    floats = float_keys(config_from_dict(sources), "")
    assert "train.lr" in floats and "data.sources[0].heldout_fraction" in floats
    for key in floats:
        config = config_from_dict(sources)
        set_key(config, key, float("nan"))
        with pytest.raises(DistillError, match=re.escape(f"config key '{key}': nan is not a finite number")):
            config.validate()


def float_keys(section, where: str) -> list[str]:
    import dataclasses

    keys = []
    for item in dataclasses.fields(section):
        value, path = getattr(section, item.name), f"{where}.{item.name}".lstrip(".")
        if dataclasses.is_dataclass(value):
            keys += float_keys(value, path)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            keys += [key for index, element in enumerate(value) for key in float_keys(element, f"{path}[{index}]")]
        elif isinstance(value, float):
            keys.append(path)
    return keys


def set_key(config, key: str, value) -> None:
    *parents, last = key.replace("[", ".").replace("]", "").split(".")
    for part in parents:
        config = config[int(part)] if part.isdigit() else getattr(config, part)
    setattr(config, last, value)


def test_a_config_file_that_is_not_utf8_text(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"train:\n  steps: \xff\xfe\n")
    with pytest.raises(DistillError, match=re.escape(f"config file {path} is not a YAML text file: not UTF-8 (byte offset 16)")):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(DistillError, match="config file not found: nowhere.yaml"):
        load_config("nowhere.yaml")


def test_cli_reports_bad_input_in_one_line_and_exits_non_zero(tmp_path, tiny_teacher):
    cases = {
        "unknown key": (["train.nope=1"], "config key 'train.nope'"),
        "wrong type": (["train.steps=abc"], "config key 'train.steps'"),
        "n >= m": (["prune.n=4"], "N < M"),
        "missing data": (["data.sources.0.files=[/no/such/file.txt]"], "file not found: /no/such/file.txt"),
        "missing teacher": (["teacher.source=/no/such/teacher"], "teacher.source not found: /no/such/teacher"),
        "missing eval file": (["eval.files=[/no/such/eval.txt]"], "file not found: /no/such/eval.txt"),
        "empty data file": ([f"data.sources.0.files=[{tmp_path / 'empty.txt'}]"], "holds no text"),
        "binary eval file": ([f"eval.files=[{tmp_path / 'binary.txt'}]"], "is binary, not text (a NUL byte at offset 4)"),
        "latin-1 eval file": ([f"eval.files=[{tmp_path / 'latin1.txt'}]"], "is not UTF-8 text (byte offset 3)"),
        "corrupt teacher": ([f"teacher.source={tmp_path / 'corrupt_teacher'}"],
                            "could not load teacher"),
        "read-only output dir": ([f"run.output_dir={tmp_path / 'readonly' / 'runs'}"], "Permission denied"),
    }
    (tmp_path / "empty.txt").write_text(" \n\n")
    (tmp_path / "binary.txt").write_bytes(b"ELF\x01\x00\x00garbage")
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 au lait".encode("latin-1"))
    corrupt = tmp_path / "corrupt_teacher"
    shutil.copytree(tiny_teacher, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (tmp_path / "readonly").mkdir()
    (tmp_path / "readonly").chmod(0o500)
    if os.access(tmp_path / "readonly", os.W_OK):  # root writes anywhere: no permission error to provoke
        del cases["read-only output dir"]
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, tiny_teacher))
    for index, (case, (overrides, message)) in enumerate(cases.items()):
        result = run_pipeline(config, f"run.name=case{index}", *overrides, check=False)  # a run dir each
        assert result.returncode == 2, case
        lines = [line for line in result.stderr.splitlines() if line.startswith("distill: error:")]
        assert len(lines) == 1 and message in lines[0], (case, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, case
    assert not list(tmp_path.glob("runs/*/teacher")), "bad input must not produce stage output"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.run.name and config.train.steps > 0


def test_overrides_may_follow_the_stage_flags():
    """launch.sh --accelerate fsdp appends train.sharding=fsdp after whatever the user typed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_entry", REPO / "pipelines" / "run.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    args = entry.parse_args(["c.yaml", "train.steps=3", "--only", "distill", "train.sharding=fsdp"])
    assert (args.config, args.only, args.overrides) == ("c.yaml", "distill", ["train.steps=3", "train.sharding=fsdp"])
    args = entry.parse_args(["--restart", "c.yaml", "train.sharding=fsdp"])
    assert args.restart and args.overrides == ["train.sharding=fsdp"]


@pytest.mark.slow  # two launches through launch.sh and accelerate launch
def test_launch_says_the_precision_and_why_in_its_first_line(tmp_path, tiny_teacher):
    from distill.precision import choose_precision

    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, tiny_teacher))
    expected = f"distill: {choose_precision('auto', 'cpu').describe()}"
    # --only evaluate on a new run dir stops right after the launch line, with its one-line refusal
    for overrides, first_line in (([], expected), (["run.precision=fp32"], "distill: precision fp32 (forced by run.precision)")):
        result = launch(config, "--only", "evaluate", *overrides, check=False)
        assert result.returncode == 2 and "needs stage 'teacher' finished first" in result.stderr
        assert result.stdout.splitlines()[0] == first_line, result.stdout[:500]
