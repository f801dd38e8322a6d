"""The whole pipeline on a tiny random Llama: outputs, skipping, re-running, resuming after a kill,
refusing stale checkpoints, two processes against one, and wandb offline logging."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import (REPO, TEST_TEXT, ForkedRun, free_port, launch, launch_command, pipeline_processes, run_pipeline,
                      start_pipeline, tiny_config, write_config)
from distill.data.teacher_cache import TeacherCache
from distill.eval.report import RUNTIME
from distill.run.artifacts import read_distill_record, read_prune_record, read_token_blocks
from distill.sparsity.spec import read_sparsity_spec
from distill.runtime import load_sparse_model
from distill.sparsity.masks import nm_violations
from distill.train.throughput import flops_per_token
from wandb_offline import history

STAGES = ["teacher", "teacher_logits", "prune", "distill", "export", "evaluate"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]


def student_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "distill" / "student" / "model.safetensors")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_teacher):
    """One complete pipeline run, with wikitext-2 test added as an evaluation file, the MLP channels
    permuted for 2:4 before pruning, half of the projection inputs zeroed by thresholds (greedy), and
    half of the KV heads streaming, chosen by gates trained against the teacher; the recovery curve
    measured every 4 steps."""
    tmp_path = tmp_path_factory.mktemp("finished")
    config = tiny_config(tmp_path, tiny_teacher, train={"eval_every": 4}, data={"block_size": 32, "max_heldout_blocks": 8, "sources": [
        {"name": "wiki", "kind": "files", "files": [str(REPO.parent / "shared/data/wikitext-2/valid.txt")],
         "heldout_fraction": 0.1, "max_blocks": 160},
        {"name": "samples", "kind": "teacher", "samples": {"num_sequences": 8, "max_new_tokens": 40, "batch_size": 4}},
    ]}, prune={"permute": True, "permute_sweeps": 10}, activations={"target": 0.5, "allocation": "greedy"},
        attention={"streaming_fraction": 0.5, "sink": 2, "window": 8, "select": "distill", "gate_steps": 3},
        eval={"block_size": 64, "max_blocks": 4, "batch_size": 4, "activation_levels": [0.0, 0.5], "speed_repeats": 1,
              "lm_eval": {"tasks": ["wikitext_cloze"], "include_path": str(REPO / "configs" / "lm_eval"), "limit": 8}})
    path = write_config(tmp_path / "tiny.yaml", config)
    result = run_pipeline(path, f"eval.files=[{TEST_TEXT}]", fresh=True)  # its console is checked, imports included
    return path, tmp_path / "runs" / "tiny", result


def test_pipeline_writes_every_stage_and_a_complete_report(finished_run):
    _, run_dir, result = finished_run
    for stage in STAGES:
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage and len(manifest["fingerprint"]) == 16
        assert not (run_dir / f"{stage}.partial").exists()
    assert (run_dir / "config.yaml").is_file()
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert set(report["sources"]) == {"wiki", "samples", "test"}
    for name, scores in report["sources"].items():
        assert scores["teacher"]["ppl"] > 1 and scores["oneshot"]["ppl"] > 1 and scores["student"]["ppl"] > 1, name
        assert scores["oneshot"]["kl"] > 0 and scores["student"]["kl"] > 0, name
    assert report["export"]["verified"] is True
    assert len(report["sparsity"]) == 14  # 7 projections x 2 layers
    assert all(value == pytest.approx(0.5, abs=1e-6) for value in report["sparsity"].values())
    assert (run_dir / "evaluate" / "report.png").stat().st_size > 10_000
    pruned = read_prune_record(run_dir / "prune")
    assert len(pruned.targets) == 14 and pruned.coverage == report["coverage"]
    gains = pruned.permutation_gain
    assert len(gains) == 2 and all(gain >= 0 for gain in gains.values()) and max(gains.values()) > 0
    assert "| test |" in (run_dir / "evaluate" / "report.md").read_text()
    assert "| test |" in result.stdout  # the table is printed last
    # decode and prefill timed on this machine, the student as it runs against the teacher
    speed = report["speed"]
    assert speed["repeats"] == 1 and set(speed["ratios"]) == {RUNTIME}
    assert all(speed["ratios"][RUNTIME][key] > 0 for key in ("decode", "prefill", "bytes_projections"))
    assert "vs teacher: decode" in result.stdout


def test_the_report_holds_the_recovery_curve_and_per_layer_error_and_plots_nothing_constant(finished_run):
    _, run_dir, _ = finished_run
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    logged = [row for row in metrics(run_dir) if "heldout_kl" in row]
    assert [row["step"] for row in logged] == [4, 8, 12] and all("heldout_ppl" in row for row in logged)
    recovery = report["recovery"]
    assert recovery["steps"] == [4, 8, 12] and recovery["blocks"] == 8  # train.eval_blocks of wiki's 8 + samples'
    assert recovery["heldout_kl"] == [row["heldout_kl"] for row in logged] and len(recovery["heldout_ppl"]) == 3
    assert all(kl > 0 for kl in recovery["heldout_kl"]) and recovery["oneshot_kl"] > 0
    assert recovery["teacher_ppl"] > 1 and recovery["oneshot_ppl"] > 1
    errors = report["layer_errors"]
    assert errors["blocks"] == 8 and len(errors["oneshot"]) == len(errors["student"]) == 2  # 2 decoder layers
    assert all(error > 0 for error in errors["oneshot"] + errors["student"])
    drawn = report["plot"]
    assert all(len(series["values"]) > 1 and len(set(series["values"])) > 1 for series in drawn["series"]), drawn
    titles = " | ".join(drawn["panels"])
    for panel in ("held-out KL", "held-out perplexity", "perplexity per held-out source", "layer output error"):
        assert panel in titles, titles
    assert {line["label"] for line in drawn["references"]} == {"teacher", "one-shot"}
    # the teacher's projection inputs hold no exact zeros: a line of report.md, not a flat line in the plot
    text = (run_dir / "evaluate" / "report.md").read_text()
    assert any("zeros in projection inputs" in line and "teacher" in line for line in drawn["omitted"])
    assert all(line in text for line in drawn["omitted"]) and "## Where the damage is" in text


# a tqdm bar: "desc:  48%|████▊     | 23/48 [04:56<01:43, 4.14s/it]"
PROGRESS_BAR = re.compile(r"\d+%\|[^|]*\| *\d+/\d+ \[|: \d+ tokens \[\d+:\d+")  # a bar, or a count with no total


def test_the_console_holds_only_the_projects_lines_and_progress_bars(finished_run):
    """No third-party warning on the way: the tiny run exercises every stage, lm-eval included."""
    _, _, result = finished_run
    foreign = [line for line in re.split(r"[\r\n]", result.stderr)
               if line.strip() and not line.startswith("distill:") and not PROGRESS_BAR.search(line)]
    assert not foreign, foreign[:10]


def test_activation_sparsity_is_measured_trained_under_and_exported(finished_run):
    from distill.runtime import load_sparse_model
    from distill.sparsity.activations import thresholded
    from distill.student import apply_runtime_sparsity

    _, run_dir, _ = finished_run
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    activations = report["activations"]
    for name, scores in report["sources"].items():  # the student both ways
        assert scores["student_runtime"]["ppl"] > 1 and scores["student_runtime"]["ppl"] != scores["student"]["ppl"]
        curve = activations["teacher_training_free"][name]
        assert curve["0"] == pytest.approx(scores["teacher"]["ppl"], rel=1e-9) and curve["0.5"] != curve["0"]
    tables = activations["inputs"]
    assert {row["input"] for row in tables["teacher"]} == {"self_attn.q_proj+k_proj+v_proj", "self_attn.o_proj",
                                                         "mlp.gate_proj+up_proj", "mlp.down_proj"}
    assert all(row["zero_fraction"] == 0 and row["q0.5"] > 0 for row in tables["teacher"])
    assert sum(row["zero_fraction"] for row in tables["oneshot"]) / len(tables["oneshot"]) > 0.2
    zeroed = activations["zeroed"]  # weighted by the weights each input multiplies
    assert zeroed["teacher"] == 0 and 0.3 < zeroed["oneshot"] < 0.7 and 0 < zeroed["student"] < 1
    weights = {row["input"]: row["weights"] for row in tables["oneshot"] if row["layer"] == 0}
    assert weights["mlp.gate_proj+up_proj"] == 2 * weights["mlp.down_proj"] > 0
    assert f"| all, weighted by the weights each input multiplies | 0.000 | {zeroed['oneshot']:.3f} |" in (
        run_dir / "evaluate" / "report.md").read_text()
    assert "## Activation sparsity" in (run_dir / "evaluate" / "report.md").read_text()
    # the packed export carries the thresholds and the runtime applies them; hf/ runs without them
    spec = read_sparsity_spec(run_dir / "export" / "packed")
    assert spec.layout.value == "nm_packed.v2" and len(spec.input_thresholds) == 14
    assert spec.input_thresholds == read_sparsity_spec(run_dir / "distill" / "student").input_thresholds
    # the allocation the thresholds were calibrated to travels with them, one fraction per input
    assert len(spec.input_allocation) == 8 and spec.input_allocation == read_sparsity_spec(
        run_dir / "prune" / "student").input_allocation
    sparse = load_sparse_model(run_dir / "export" / "packed")
    assert thresholded(sparse) == pytest.approx(spec.input_thresholds)
    plain = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "hf").eval()
    assert thresholded(plain) == {}
    apply_runtime_sparsity(plain, spec)  # the thresholds, and the streaming heads of this run
    ids = torch.randint(0, plain.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(sparse(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_attention_sparsity_is_chosen_measured_exported_and_decoded_with_a_bounded_cache(finished_run):
    from transformers import DynamicCache

    from distill.runtime import StreamingCache, load_sparse_model
    from distill.sparsity.attention import streaming_heads

    _, run_dir, _ = finished_run
    summary = read_prune_record(run_dir / "prune").head_selection
    assert summary["select"] == "distill" and len(summary["gate_history"]) == 3
    spec = read_sparsity_spec(run_dir / "distill" / "student")
    assert spec.streaming.count() == 2 and (spec.streaming.sink, spec.streaming.window) == (2, 8)  # half of 2 x 2
    assert read_sparsity_spec(run_dir / "export" / "packed").streaming == spec.streaming
    # the two lowest gates stream
    gates = sorted((gate, name, head) for name, values in summary["scores"].items() for head, gate in enumerate(values))
    assert {(name, head) for _, name, head in gates[:2]} == {(name, head) for name, heads in spec.streaming.heads.items()
                                                             for head in heads}
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    attention = report["attention"]
    assert set(attention["heads"]) == {"teacher", "oneshot", "student"}
    for model, modules in attention["heads"].items():
        assert len(modules) == 2 and all(len(stats["local_mass"]) == 2 for stats in modules.values())
    for name, heads in spec.streaming.heads.items():  # the students' streaming heads keep all their mass inside
        assert all(attention["heads"]["student"][name]["local_mass"][head] == pytest.approx(1.0) for head in heads)
        assert all(attention["heads"]["teacher"][name]["local_mass"][head] < 1 for head in heads)
    kv = attention["kv_cache"]  # at the eval block size, 64: two of four heads keep 2 + 8 positions
    assert kv["context"] == 64 and kv["ratio"] == pytest.approx((2 * 64 + 2 * 10) / (4 * 64))
    assert "## Attention sparsity" in (run_dir / "evaluate" / "report.md").read_text()
    # the runtime decodes with the bounded cache, token for token as with the full one
    model = load_sparse_model(run_dir / "export" / "packed")
    assert streaming_heads(model) == spec.streaming.heads
    prompt = read_token_blocks(run_dir / "teacher").train[:1, :10]
    with torch.no_grad():
        full = model.generate(prompt, max_new_tokens=30, min_new_tokens=30, do_sample=False, cache=DynamicCache())
        out = model.generate(prompt, max_new_tokens=30, min_new_tokens=30, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, StreamingCache) and torch.equal(out.sequences, full)


def test_the_report_scores_every_model_with_lm_eval(finished_run):
    _, run_dir, _ = finished_run
    zero_shot = json.loads((run_dir / "evaluate" / "report.json").read_text())["zero_shot"]
    assert set(zero_shot) == {"teacher", "oneshot", "student"}
    for model, tasks in zero_shot.items():
        scores = tasks["wikitext_cloze"]
        assert scores["samples"] == 8 and 0 <= scores["acc"] <= 1 and scores["acc_stderr"] > 0, model
    assert "| wikitext_cloze |" in (run_dir / "evaluate" / "report.md").read_text()


def test_both_export_dirs_have_a_model_card_with_the_report(finished_run):
    from huggingface_hub import ModelCard

    _, run_dir, _ = finished_run
    for form in ("hf", "packed"):
        card = ModelCard.load(run_dir / "export" / form / "README.md")
        assert card.data.pipeline_tag == "text-generation" and "2:4-sparsity" in card.data.tags
        text = card.text
        assert "2:4-sparse student of" in text and "12 steps (1,536 tokens)" in text  # 12 steps of 4 x 32
        assert "| test |" in text and "| wikitext_cloze |" in text and "![report](report.png)" in text
        assert "KV heads attend to the first 2 and last 8 tokens only" in text
        assert "its card does not say which" in text  # the tiny teacher has no card, so no license to inherit
        assert (run_dir / "export" / form / "report.png").stat().st_size > 10_000
    assert "import distill" in (run_dir / "export" / "packed" / "README.md").read_text()


def test_a_failed_upload_is_one_line_and_keeps_the_finished_export(finished_run, tmp_path):
    path, run_dir, _ = finished_run
    copy = run_dir.parent / "upload"
    shutil.copytree(run_dir, copy)
    manifest = (copy / "export" / "manifest.json").read_text()
    result = run_pipeline(path, "run.name=upload", f"eval.files=[{TEST_TEXT}]", "export.push_to_hub=nobody/student",
                          check=False, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if "export.push_to_hub" in line]
    assert len(error) == 1 and "nobody/student" in error[0] and "the run dir is intact" in error[0]
    assert (copy / "export" / "manifest.json").read_text() == manifest and (copy / "distill" / "student").is_dir()
    shutil.rmtree(copy)


def test_exported_model_loads_with_transformers_and_is_2_4(finished_run):
    _, run_dir, _ = finished_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "hf")
    projections = [(name, module) for name, module in model.named_modules() if name.endswith(("q_proj", "down_proj"))]
    assert projections
    for name, module in projections:
        assert nm_violations(module.weight, 2, 4) == 0, name
        assert float((module.weight == 0).float().mean()) == pytest.approx(0.5), name
    packed = load_sparse_model(run_dir / "export" / "packed", sparse=False, runtime_sparsity=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, packed.state_dict()[name]), name
    # the student learned: its weights moved away from the one-shot student's
    oneshot = load_file(run_dir / "prune" / "student" / "model.safetensors")
    trained = load_file(run_dir / "distill" / "student" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(oneshot[name], trained[name])
    assert torch.equal(oneshot[name] == 0, trained[name] == 0), "the mask must not change under fixed masks"


@pytest.mark.slow  # runs stages of the pipeline again
def test_second_run_skips_every_stage_and_changed_keys_rerun_downstream(finished_run):
    path, run_dir, _ = finished_run
    again = run_pipeline(path, f"eval.files=[{TEST_TEXT}]", "speed.compile=true")  # speed never invalidates
    assert all(f"[{stage}] up to date, skipped" in again.stdout for stage in STAGES), again.stdout
    student_before = student_tensors(run_dir)

    changed = run_pipeline(path, f"eval.files=[{TEST_TEXT}]", "eval.max_blocks=2")
    assert "[distill] up to date, skipped" in changed.stdout
    assert "[evaluate] running again (config.eval.max_blocks: 4 -> 2)" in changed.stdout
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert report["sources"]["test"]["tokens"] == 2 * 64

    changed = run_pipeline(path, f"eval.files=[{TEST_TEXT}]", "eval.max_blocks=2", "train.lr=0.002")
    assert "[prune] up to date, skipped" in changed.stdout
    assert "[distill] running again (config.train.lr: 0.001 -> 0.002)" in changed.stdout
    assert "[export] running again (stage 'distill' runs again)" in changed.stdout
    assert "[evaluate] running again (stage 'export' runs again)" in changed.stdout
    assert not torch.equal(student_tensors(run_dir)["model.layers.1.self_attn.q_proj.weight"],
                           student_before["model.layers.1.self_attn.q_proj.weight"])


def test_a_failing_stage_leaves_the_finished_one_intact(tmp_path, finished_run):
    path, run_dir, _ = finished_run
    export_manifest = (run_dir / "export" / "manifest.json").read_text()
    weights = run_dir / "distill" / "student" / "model.safetensors"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[: len(original) // 3])  # a corrupt upstream output
        result = run_pipeline(path, f"eval.files=[{TEST_TEXT}]", "eval.max_blocks=2", "train.lr=0.002",
                              "--only", "export", check=False)
        assert result.returncode == 2
        assert f"distill: error: stage 'distill' is damaged: {weights} is" in result.stderr
        assert (run_dir / "export" / "manifest.json").read_text() == export_manifest
        assert (run_dir / "export" / "hf" / "model.safetensors").is_file()
    finally:
        weights.write_bytes(original)


def _start(config: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(launch_command(config, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _start_nodes(config: Path, *args: str) -> list[subprocess.Popen]:
    """Two launches of launch.sh acting as two machines of one process each (rendezvous on this host),
    as the README's multi-node commands run on two real machines."""
    port = str(free_port())
    return [_start(config, "--num-processes", "2", *args,
                   env={"NUM_MACHINES": "2", "MACHINE_RANK": str(rank), "MAIN_PROCESS_IP": "127.0.0.1",
                        "MAIN_PROCESS_PORT": port}) for rank in (0, 1)]


def _launch_nodes(config: Path, *args: str) -> list[tuple[str, str]]:
    """(stdout, stderr) of each node of a two-node launch, both required to succeed."""
    outputs = []
    for process in _start_nodes(config, *args):
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"a node failed ({process.returncode}):\n{stderr[-4000:]}"
        outputs.append((stdout, stderr))
    return outputs


def _kill_after_first_checkpoint(process: subprocess.Popen, checkpoints: Path, config: Path, timeout: float = 300) -> None:
    _kill_when(process, lambda: (checkpoints / "latest.json").is_file(), config, timeout)


def _kill_when(process: subprocess.Popen | ForkedRun, ready, config: Path, timeout: float = 300) -> None:
    """SIGKILL the run as soon as `ready()` holds; of a launch, the launcher, and check that its
    workers died with it."""
    deadline = time.time() + timeout
    while not ready():
        if process.poll() is not None:
            output = process.error_output() if isinstance(process, ForkedRun) else process.stderr.read()
            raise AssertionError(f"the run ended before it was due to be killed:\n{output[-3000:]}")
        assert time.time() < deadline, "the run did not get there in time"
        time.sleep(0.05)
    if isinstance(process, ForkedRun):
        process.kill()
        return
    process.send_signal(signal.SIGKILL)  # the launcher; its worker must die with it
    process.wait()
    assert not pipeline_processes(config, wait=10), "a worker outlived the killed launcher"


@pytest.mark.slow  # several processes or a kill and resume
@pytest.mark.parametrize("mask_mode,sharding,processes,activations", [  # every mask mode, both shardings
    ("learnable", "ddp", 1, False), ("dynamic", "ddp", 2, True), ("fixed", "fsdp", "nodes", True)])
def test_kill_in_distill_then_resume_gives_the_bitwise_same_student(tmp_path, tiny_teacher, mask_mode, sharding,
                                                                     processes, activations):
    """Every mask mode, each in one case: learnable masks in one process (which also checks what a
    launch must refuse), dynamic masks on two DDP gloo ranks, and fixed masks with the student
    sharded (fsdp trains fixed masks only) over two machines (two launches on this host, one process
    each), resumed from the gathered checkpoint: killing one machine's launch stops the other's with
    one line, and starting both again resumes. The two-rank cases add activation thresholds, re-calibrated every 3 steps (to the greedy allocation of the
    prune stage under fsdp), straight-through, and half of the KV heads streaming; under ddp the
    thresholds ramp up to the allocation over 6 steps, from none zeroed."""
    train = {"steps": 16, "checkpoint_every": 4, "log_every": 1, "global_batch_size": 8, "micro_batch_size": 4,
             "masks": {"mode": mask_mode, "update_every": 3, "init_logit": 0.02, "lr": 0.05}, "sharding": sharding,
             # the sharded case keeps AdamW's moments in bf16: sharded, checkpointed and resumed like fp32 ones
             "optimizer_state": "bf16" if sharding == "fsdp" else "fp32"}
    sections = {"train": train}
    if activations:
        sections["activations"] = {"target": 0.5, "recalibrate_every": 3, "straight_through": True,
                                   "allocation": "greedy" if sharding == "fsdp" else "uniform",
                                   "ramp_steps": 6 if sharding == "ddp" else 0}
        sections["attention"] = {"streaming_fraction": 0.5, "sink": 2, "window": 8}
    nodes = processes == "nodes"
    ranks = ["--num-processes", str(processes)] if not nodes and processes > 1 else []

    def run_to_the_end(config: Path, *overrides: str) -> str:
        """The reference, or the resume: the stdout of the (first machine's) run. Forked processes or
        ranks on one machine (the launcher under test is the killed run's); two launches as nodes."""
        if nodes:
            return _launch_nodes(config)[0][0]
        return run_pipeline(config, *overrides, processes=processes).stdout

    reference = write_config(tmp_path / "reference.yaml", tiny_config(tmp_path, tiny_teacher, name="reference", **sections))
    run_to_the_end(reference)

    killed = write_config(tmp_path / "killed.yaml", tiny_config(tmp_path, tiny_teacher, name="killed", **sections))
    run_dir = tmp_path / "runs" / "killed"
    if nodes:  # the second machine's launch is killed; the first's stops by itself, in one line
        first, second = _start_nodes(killed)
        _kill_when(second, lambda: (run_dir / "distill.partial" / "checkpoints" / "latest.json").is_file(), killed)
        killed_at = time.time()
        _, stderr = first.communicate(timeout=120)
        assert time.time() - killed_at < 60 and first.returncode != 0
        refusals = [line for line in stderr.splitlines() if line.startswith("distill: error:")]
        assert len(refusals) == 1 and "lost contact with the others" in refusals[0], stderr[-3000:]
        assert "Traceback" not in stderr
        assert not pipeline_processes(killed, wait=10)
    else:
        process = _start(killed, *ranks)
        _kill_after_first_checkpoint(process, run_dir / "distill.partial" / "checkpoints", killed)
        assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "distill").exists(), "the kill must land in the middle of distill"
    latest = json.loads((run_dir / "distill.partial" / "checkpoints" / "latest.json").read_text())

    first_case = processes == 1
    if first_case:  # what a launch refuses does not depend on the mask mode or the process count
        # a changed training config must not silently continue from these checkpoints
        refused = run_pipeline(killed, "train.lr=0.005", check=False)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert "config.train.lr: 0.001 -> 0.005" in refused.stderr and "--discard-partial distill" in refused.stderr
        assert (run_dir / "distill.partial" / "checkpoints" / latest["name"]).is_dir(), "nothing may be lost"
        # so must a change upstream, before the upstream stage is replaced
        prune_manifest = (run_dir / "prune" / "manifest.json").read_text()
        refused = run_pipeline(killed, "prune.criterion=magnitude", check=False)
        assert refused.returncode != 0 and "stage 'prune' runs again" in refused.stderr
        assert (run_dir / "prune" / "manifest.json").read_text() == prune_manifest

    # speed options may change on resume (no fingerprint holds them) and compute the same student
    speed = ["speed.activation_checkpointing=true", "speed.peak_tflops=0.5"] if first_case else []
    resumed_stdout = run_to_the_end(killed, *speed)
    assert "[distill] resuming the unfinished run" in resumed_stdout
    assert "resumed from" in resumed_stdout and f"at step {latest['step']}" in resumed_stdout
    expected, actual = student_tensors(tmp_path / "runs" / "reference"), student_tensors(run_dir)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert [row["loss"] for row in metrics(run_dir)] == [row["loss"] for row in metrics(tmp_path / "runs" / "reference")]
    if speed:  # MFU is logged once a peak is known: tokens/s x FLOP per token / peak (student = teacher's shape)
        model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
        per_token = flops_per_token(model, model, context=32)  # the student has the teacher's shape
        resumed_rows = [row for row in metrics(run_dir) if row["step"] > latest["step"]]
        assert resumed_rows and all(0 < row["mfu"] == pytest.approx(row["tokens_per_s"] * per_token / 0.5e12)
                                    for row in resumed_rows)
    oneshot = load_file(tmp_path / "runs" / "killed" / "prune" / "student" / "model.safetensors")
    masks = [name for name in actual if name.endswith(".mask")]
    moved = sum(not torch.equal(actual[name], oneshot[name]) for name in masks)
    assert (moved > 0) == (mask_mode != "fixed"), "dynamic and learnable masks move, fixed ones do not"
    spec, reference_spec, oneshot_spec = (read_sparsity_spec(path / "student") for path in (
        run_dir / "distill", tmp_path / "runs" / "reference" / "distill", run_dir / "prune"))
    assert spec.input_thresholds == reference_spec.input_thresholds
    assert bool(spec.input_thresholds) == activations
    assert spec.streaming == reference_spec.streaming == oneshot_spec.streaming
    assert (spec.streaming is not None and spec.streaming.count() == 2) == activations
    if activations:  # re-calibrated to the moving student, and logged
        assert spec.input_thresholds != oneshot_spec.input_thresholds
        assert len({row["mean_input_threshold"] for row in metrics(run_dir)}) > 1
    if activations and sharding == "ddp":  # the ramp: none zeroed by steps 1-3, half the allocation by 4-6
        threshold = {row["step"]: row["mean_input_threshold"] for row in metrics(run_dir)}  # logged before re-calibrating
        assert threshold[1] == threshold[3] == 0 < threshold[4] < threshold[7]
    for name in masks:
        weight = actual[name.replace(".mask", ".weight")]
        assert bool((weight[~actual[name]] == 0).all()) and nm_violations(weight, 2, 4) == 0, name


@pytest.mark.slow  # several processes or a kill and resume
def test_a_damaged_latest_checkpoint_falls_back_to_an_older_one_or_is_refused(tmp_path, tiny_teacher):
    """Bytes changed in place (the size kept, so only the checksums can tell) in the latest
    checkpoint's model and the older one's optimizer state."""
    train = {"steps": 20, "checkpoint_every": 4, "log_every": 2, "global_batch_size": 8, "micro_batch_size": 4}
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, tiny_teacher, name="corrupt", train=train))
    run_dir = tmp_path / "runs" / "corrupt"
    process = start_pipeline(config)  # a plain process: killing a launcher is the kill tests' part
    checkpoints = run_dir / "distill.partial" / "checkpoints"
    _kill_when(process, lambda: (checkpoints / "step_00000008").is_dir() and (checkpoints / "latest.json").is_file()
               and "step_00000008" in (checkpoints / "latest.json").read_text(), config)
    older, latest = checkpoints / "step_00000004" / "optimizer.bin", checkpoints / "step_00000008" / "model.safetensors"
    intact = older.read_bytes()
    for path in (older, latest):
        data = bytearray(path.read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = os.urandom(64)
        path.write_bytes(bytes(data))
    damaged = latest.read_bytes()

    refused = run_pipeline(config, check=False)  # the killed run went through launch.sh; these need not
    assert refused.returncode == 2
    error = [line for line in refused.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(error) == 1 and f"step_00000008 is damaged: {latest} does not match the sha256" in error[0], refused.stderr[-2000:]
    assert "no older checkpoint is readable" in error[0] and f"delete {run_dir / 'distill.partial'}" in error[0]
    assert latest.read_bytes() == damaged, "the checkpoints are left for the user to inspect"

    older.write_bytes(intact)  # the older one whole again: the run resumes from it
    resumed = run_pipeline(config)
    assert f"step_00000008 is damaged: {latest}" in resumed.stdout
    assert "resuming from the older step_00000004 instead" in resumed.stdout
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    assert "[evaluate] finished" in resumed.stdout


def _ranks_config(tmp_path: Path, tiny_teacher: Path, name: str, teacher_topk: int, sharding: str = "ddp") -> Path:
    """The config of the process-count comparison."""
    # the recovery curve: held-out perplexity every 3 steps, on 5 blocks, which two ranks split 3 + 2
    # (in 2 and 1 micro-batches: under fsdp the short rank must still join the parameter gathers)
    train = {"steps": 6, "global_batch_size": 8, "micro_batch_size": 2, "log_every": 1, "eval_every": 3,
             "loss": {"teacher_topk": teacher_topk, "teacher_cache_shard": 7}, "sharding": sharding}
    data = tiny_config(tmp_path, tiny_teacher)["data"]
    # a second source of three pieces (teacher batches), which two ranks tokenize 2 + 1: the blocks
    # that span the pieces are the one-process run's
    samples = {"name": "samples", "kind": "teacher", "heldout_fraction": 0.0,
               "samples": {"num_sequences": 6, "max_new_tokens": 24, "batch_size": 2}}
    data = {**data, "max_heldout_blocks": 5, "sources": [*data["sources"], samples]}
    # fp32 on every CPU: the comparison is of process counts, at a tolerance fp32 rounding allows (under
    # bf16, fsdp's bf16 gathers and autocast's per-op casts differ by bf16 rounding)
    run = {"precision": "fp32"}
    return write_config(tmp_path / f"{name}.yaml", tiny_config(tmp_path, tiny_teacher, name=name, train=train, data=data,
                                                               run=run))


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory, tiny_teacher):
    """The one-process run of each teacher_topk, made once for every rank count it is compared with:
    (its run dir, its stdout)."""
    runs = {}

    def run(teacher_topk: int) -> tuple[Path, str]:
        if teacher_topk not in runs:
            tmp_path = tmp_path_factory.mktemp(f"one_process_topk{teacher_topk}")
            runs[teacher_topk] = (tmp_path / "runs" / "one",
                                  run_pipeline(_ranks_config(tmp_path, tiny_teacher, "one", teacher_topk)).stdout)
        return runs[teacher_topk]
    return run


@pytest.mark.slow  # several processes or a kill and resume
@pytest.mark.parametrize("teacher_topk,sharding,nodes", [(0, "ddp", False), (16, "ddp", True), (0, "fsdp", False)])
def test_two_processes_follow_the_same_loss_curve_as_one(tmp_path, tiny_teacher, one_process_runs, teacher_topk, sharding,
                                                         nodes):
    """Two gloo ranks against one process for the same global batch: with a live teacher, with the
    teacher's top-k cached by both ranks (then distill never loads the teacher) on two machines (two
    launches on this host, one process each, sharing the run dir), and with the student sharded by
    FSDP2 (parameters, gradients and optimizer state)."""
    one_dir, one_stdout = one_process_runs(teacher_topk)
    two = _ranks_config(tmp_path, tiny_teacher, "two", teacher_topk, sharding)
    if nodes:
        (stdout, _), (second_stdout, _) = _launch_nodes(two)
        assert second_stdout.count("[distill] finished") == 1, "each machine's first process reports"
    else:
        stdout = run_pipeline(two, processes=2).stdout
    assert stdout.count("[distill] finished") == 1, "only the main process prints"
    record = read_distill_record(tmp_path / "runs" / "two" / "distill")
    assert record.sharding == sharding and record.masked_weights_zero is True
    assert record.teacher_layers_sharded == (None if teacher_topk else sharding == "fsdp")
    not_loaded = "the teacher is not loaded"
    assert (not_loaded in one_stdout) == (not_loaded in stdout) == bool(teacher_topk)
    if teacher_topk:
        # each rank wrote its own shards of the token blocks (64 blocks each) and of the cache (7 blocks
        # each); the files are the one-process run's, byte for byte
        for stage, pattern in (("teacher", "blocks/*/shard-*"), ("teacher_logits", "topk/shard-*")):
            dir_one, dir_two = (run_dir / stage for run_dir in (one_dir, tmp_path / "runs" / "two"))
            shards = sorted(str(path.relative_to(dir_one)) for path in dir_one.glob(pattern))
            assert len(shards) >= 3 and shards == sorted(str(path.relative_to(dir_two)) for path in dir_two.glob(pattern))
            assert all((dir_one / name).read_bytes() == (dir_two / name).read_bytes() for name in shards)
        blocks = read_token_blocks(one_dir / "teacher").train
        cached = TeacherCache(one_dir / "teacher_logits" / "topk").blocks(range(len(blocks)))
        assert cached.logp.shape == cached.index.shape == (*blocks.shape, 16)
        assert bool((cached.index[..., 1:] > cached.index[..., :-1]).all()), "16 distinct ids per position, ascending"
        mass = cached.logp.exp().sum(-1)
        assert bool((mass > 0).all()) and bool((mass <= 1.01).all())
    assert record.processes == 2, "two ranks really trained"
    curve_one, curve_two = metrics(one_dir), metrics(tmp_path / "runs" / "two")
    assert [row["step"] for row in curve_one] == [row["step"] for row in curve_two] == list(range(1, 7))
    # the tiny random teacher is nearly uniform over 49k tokens, so its top-16 hold ~0.03% of the mass
    # and the cached-teacher loss is ~1e-6: a quantity that small carries more relative rounding
    loss_tolerance = 1e-3 if teacher_topk else 1e-4
    for a, b in zip(curve_one, curve_two):
        assert b["loss"] == pytest.approx(a["loss"], rel=loss_tolerance), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (a, b)
    assert curve_one[-1]["loss"] < curve_one[0]["loss"]
    assert [row["step"] for row in curve_one if "heldout_ppl" in row] == [3, 6]
    for a, b in zip(curve_one, curve_two):
        assert ("heldout_ppl" in a) == ("heldout_ppl" in b)
        if "heldout_ppl" in a:
            assert b["heldout_ppl"] == pytest.approx(a["heldout_ppl"], rel=1e-3)
            # KL to the teacher's log-probs, computed at setup (by a teacher loaded for it alone under the cache)
            assert b["heldout_kl"] == pytest.approx(a["heldout_kl"], rel=1e-3) and a["heldout_kl"] > 0
    # the last point is the finished student on the same held-out blocks the evaluate stage scores
    report_one = json.loads((one_dir / "evaluate" / "report.json").read_text())
    report_two = json.loads((tmp_path / "runs" / "two" / "evaluate" / "report.json").read_text())
    assert len(read_token_blocks(one_dir / "teacher").heldout["wiki"]) == 5
    for curve, report in ((curve_one, report_one), (curve_two, report_two)):
        assert curve[-1]["heldout_ppl"] == pytest.approx(report["sources"]["wiki"]["student"]["ppl"], rel=1e-4)
    assert report_two["sources"]["wiki"]["student"]["ppl"] == pytest.approx(report_one["sources"]["wiki"]["student"]["ppl"], rel=1e-3)


@pytest.mark.slow  # a pipeline run of its own
def test_wandb_offline_run_holds_the_logged_metrics(tmp_path, tiny_teacher):
    config = write_config(tmp_path / "w.yaml", tiny_config(tmp_path, tiny_teacher, name="tracked",
                                                           tracking={"backend": "wandb", "project": "distill-tests"}))
    run_pipeline(config, "train.steps=5", env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"),
                                               "WANDB_SILENT": "true"})
    run_dir = tmp_path / "runs" / "tracked"
    files = list((tmp_path / "wandb").rglob("run-*.wandb"))
    assert len(files) == 1, files
    run_id = (run_dir / "distill" / "wandb_run_id.txt").read_text().strip()
    assert run_id in files[0].name
    rows = [row for row in history(files[0]) if "train/loss" in row]
    logged = metrics(run_dir)
    assert [row["_step"] for row in rows] == [row["step"] for row in logged]
    for row, expected in zip(rows, logged):
        assert row["train/loss"] == pytest.approx(expected["loss"], rel=1e-6)
        assert row["train/lr"] == pytest.approx(expected["lr"], rel=1e-6)
        assert row["train/tokens_per_s"] > 0


@pytest.mark.slow  # several processes or a kill and resume
def test_a_killed_and_resumed_wandb_run_logs_every_step(tmp_path, tiny_teacher):
    """Killed after logging steps past its checkpoint: whatever the killed process's wandb file kept
    (a SIGKILL loses what wandb still buffered), the resumed run's offline file holds every step,
    the ones before the checkpoint sent again from metrics.jsonl, all with the metrics file's values."""
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true"}
    config = write_config(tmp_path / "w.yaml", tiny_config(
        tmp_path, tiny_teacher, name="tracked", train={"steps": 16, "checkpoint_every": 4, "log_every": 1},
        tracking={"backend": "wandb", "project": "distill-tests"}))
    partial = tmp_path / "runs" / "tracked" / "distill.partial"

    def logged_past_checkpoint() -> bool:
        latest, rows = partial / "checkpoints" / "latest.json", partial / "metrics.jsonl"
        if not (latest.is_file() and rows.is_file()):
            return False
        last_logged = json.loads(rows.read_text().splitlines()[-1])["step"]
        return last_logged > json.loads(latest.read_text())["step"]

    process = _start(config, env=env)
    _kill_when(process, logged_past_checkpoint, config)
    checkpoint_step = json.loads((partial / "checkpoints" / "latest.json").read_text())["step"]
    logged_before_kill = [json.loads(line)["step"] for line in (partial / "metrics.jsonl").read_text().splitlines()]
    assert max(logged_before_kill) > checkpoint_step
    resumed = launch(config, env=env)
    assert f"at step {checkpoint_step}" in resumed.stdout

    files = sorted((tmp_path / "wandb").rglob("run-*.wandb"))  # offline-run-<time>-<id>: oldest first
    assert len(files) == 2, files
    killed_rows, resumed_rows = ([row for row in history(path) if "train/loss" in row] for path in files)
    expected = {row["step"]: row for row in metrics(tmp_path / "runs" / "tracked")}
    assert [row["_step"] for row in resumed_rows] == sorted(expected) == list(range(1, 17))
    assert {row["_step"] for row in killed_rows} <= set(logged_before_kill)
    for row in killed_rows + resumed_rows:
        assert row["train/loss"] == pytest.approx(expected[row["_step"]]["loss"], rel=1e-6)


@pytest.mark.slow  # a pipeline run of its own
def test_a_pattern_no_kernel_runs_exports_dense_with_zeros_and_the_report_says_so(tmp_path, tiny_teacher):
    config = write_config(tmp_path / "block.yaml", tiny_config(
        tmp_path, tiny_teacher, name="block", train={"steps": 2},
        prune={"criterion": "taylor", "pattern": "block", "block": 16, "sparsity": 0.25}))
    run_pipeline(config)
    run_dir = tmp_path / "runs" / "block"
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert report["export"]["packed_dir"] is None
    assert "no sparse kernel runs this pattern" in report["export"]["note"]
    assert "16x16 blocks, 25% removed" in (run_dir / "evaluate" / "report.md").read_text()
    assert all(value == pytest.approx(0.25) for value in report["sparsity"].values())
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "hf")
    weight = model.get_submodule("model.layers.1.mlp.up_proj").weight  # [128, 64]: 8 x 4 tiles of 16 x 16
    tiles_zero = (weight.reshape(8, 16, 4, 16) == 0).all(3).all(1)
    assert int(tiles_zero.sum()) == 8  # a quarter of the 32 tiles, each entirely zero


@pytest.mark.slow  # a pipeline run of its own per pattern
@pytest.mark.parametrize("pattern,changed", [("mlp_channels", {"intermediate_size": (128, 64)}),
                                             ("heads", {"num_attention_heads": (4, 2), "num_key_value_heads": (2, 1)})])
def test_spanning_patterns_export_a_smaller_dense_model_that_the_report_scores(tmp_path, tiny_teacher, pattern, changed):
    """Whole MLP channels or head groups removed across their projections; export cuts them out, and
    evaluate scores the smaller model loaded with plain from_pretrained: the same perplexity as the
    distilled masked student."""
    config = write_config(tmp_path / f"{pattern}.yaml", tiny_config(
        tmp_path, tiny_teacher, name=pattern, train={"steps": 2}, prune={"criterion": "wanda", "pattern": pattern}))
    run_pipeline(config)
    run_dir = tmp_path / "runs" / pattern
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    for key, (before, after) in changed.items():
        assert report["export"]["shrunk"][key] == [before, after]
    assert "exported as a smaller dense model" in (run_dir / "evaluate" / "report.md").read_text()
    smaller = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "hf")
    for key, (_, after) in changed.items():
        assert getattr(smaller.config, key) == after
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in teacher.parameters())
    # the masked student from distill and the shrunk export compute the same function
    from distill.student import load_student

    masked = load_student(run_dir / "distill" / "student")
    ids = torch.randint(0, teacher.config.vocab_size, (2, 20))
    with torch.no_grad():
        expected, actual = masked(input_ids=ids).logits, smaller(input_ids=ids).logits
    assert float((actual - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.slow  # a pipeline run of its own
def test_a_diverging_run_stops_in_one_line_and_never_finishes_a_nan_student(tmp_path, tiny_teacher):
    train = {"lr": 1e12, "warmup_steps": 0, "max_grad_norm": 0.0}
    config = write_config(tmp_path / "nan.yaml", tiny_config(tmp_path, tiny_teacher, name="nan", train=train))
    result = run_pipeline(config, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(errors) == 1 and "is not finite within steps" in errors[0] and "Traceback" not in result.stderr
    run_dir = tmp_path / "runs" / "nan"
    assert (run_dir / "prune" / "manifest.json").is_file() and not (run_dir / "distill").exists()
    assert not (run_dir / "export").exists()
    assert f"delete {run_dir / 'distill.partial'} to start distill over" in errors[0]
    shutil.rmtree(run_dir / "distill.partial")  # as the message says

    # skip: the non-finite steps are dropped and counted. With clipping, the first step's update is
    # finite but huge and every later loss overflows and is skipped: the weights stay finite, but the
    # loss never recovered, so the student is refused rather than finished
    skipped = run_pipeline(config, "train.on_nonfinite=skip", "train.max_grad_norm=1.0", "--only", "distill",
                           check=False)
    errors = [line for line in skipped.stderr.splitlines() if line.startswith("distill: error:")]
    assert skipped.returncode == 2 and len(errors) == 1 and "the loss never recovered" in errors[0], skipped.stderr[-2000:]
    assert not (run_dir / "distill").exists()
    rows = [json.loads(line) for line in (run_dir / "distill.partial" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] > 0 and all(row["loss"] == row["loss"] for row in rows if "loss" in row)


@pytest.mark.slow  # two launches at once
def test_two_launches_on_one_run_dir_the_second_is_refused_and_the_first_finishes(tmp_path, tiny_teacher):
    config = write_config(tmp_path / "twice.yaml", tiny_config(tmp_path, tiny_teacher, name="twice"))
    run_dir = tmp_path / "runs" / "twice"
    first = start_pipeline(config)  # plain processes: the lock is the pipeline's, not the launcher's
    deadline = time.time() + 120
    while not (run_dir / "teacher.partial").exists():
        assert first.poll() is None and time.time() < deadline, "the first run did not start its first stage"
        time.sleep(0.05)
    second = run_pipeline(config, check=False)
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(errors) == 1 and f"run dir {run_dir} is in use by PID" in errors[0], second.stderr[-2000:]
    finished = first.finish()
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert all((run_dir / stage / "manifest.json").is_file() for stage in STAGES)
