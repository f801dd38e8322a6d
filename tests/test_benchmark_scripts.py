"""The benchmark scripts run end to end (their --smoke modes on CPU, tiny shapes) and refuse clearly
without a GPU where they need one. They time nothing meaningful here: their numbers are measured
with the full commands (benchmarks/RESULTS.md)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # a benchmark script in a process of its own
def test_end_to_end_smoke_prints_the_table_for_every_case():
    result = run_script("benchmarks/end_to_end.py", "--smoke", "--layers", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| llama8b-shaped")]
    assert [row.split("|")[2].strip() for row in rows] == ["prefill 1x64", "prefill 2x32", "decode b=1", "decode b=2"]
    for row in rows:
        dense, sparse = (float(cell) for cell in row.split("|")[3:5])
        assert dense > 0 and sparse > 0


def table_rows(stdout: str, first_cells: tuple[str, ...]) -> list[list[str]]:
    """The cells of the markdown rows whose first cell is one of `first_cells`."""
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in stdout.splitlines()
            if line.startswith("|") and line.split("|")[1].strip() in first_cells]


def ratio(cell: str) -> float:
    assert cell.endswith("x"), cell
    return float(cell[:-1])


@pytest.mark.slow  # a benchmark script in a process of its own
def test_linear_2_4_cpu_smoke_prints_ratios_and_writes_a_cpu_table(tmp_path):
    from distill.runtime import CrossoverTable

    table = tmp_path / "cpu_crossover.json"
    result = run_script("benchmarks/linear_2_4.py", "--device", "cpu", "--smoke", "--write-table", str(table))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "read bandwidth" in result.stdout and "GB/s" in result.stdout
    rows = table_rows(result.stdout, ("192x576", "576x576"))
    ratios = [row for row in rows if row[2] == "fp32"]  # the ratio table; the bytes-limit table follows
    limits = [row for row in rows if row[2] != "fp32"]
    assert [(row[0], row[1]) for row in ratios] == [(shape, m) for shape in ("192x576", "576x576") for m in ("1", "4", "512")]
    assert [(row[0], row[1]) for row in limits] == [(row[0], row[1]) for row in ratios]
    gather_failed = "gather 2:4 failed" in result.stdout
    measured = {"1": 6, "4": 4, "512": 1}  # cpu_unpack, cpu_kernel, 2:4 x50%, dense x50%, embedding_bag, gather
    for row in ratios:
        assert float(row[4]) > 0  # dense ms
        cells = row[6:12]
        for index, cell in enumerate(cells):
            if index < measured[row[1]] and not (index == 5 and gather_failed):
                assert ratio(cell) > 0, row
            else:
                assert cell == "-", row
        assert float(row[12]) < 1e-4  # max relative error against float64
    for row in limits:
        assert ratio(row[4]) == pytest.approx(32 / 17, rel=0.02) if row[1] == "1" else True  # cpu_kernel, fp32
    written = CrossoverTable.load(table)
    assert set(written.shapes) == {"192x576", "576x576"}
    for ranges in written.shapes.values():
        assert ranges[-1] == {"max_m": None, "path": "cpu_unpack"} or ranges[-1]["path"] == "cpu_unpack"
        assert {entry["path"] for entry in ranges} <= {"cpu_kernel", "cpu_unpack"}


@pytest.mark.slow  # a benchmark script that starts a process per form for its RSS
def test_end_to_end_cpu_smoke_prints_every_form_of_both_models():
    result = run_script("benchmarks/end_to_end.py", "--device", "cpu", "--smoke")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "command: python benchmarks/end_to_end.py --device cpu --smoke" in result.stdout
    forms = ["dense", "2:4", "2:4 + 50% activations", "50% activations on dense weights"]  # compile: not under --smoke
    rows = table_rows(result.stdout, ("smoke student", "smoke llama"))
    assert [(row[0], row[1]) for row in rows] == [(model, form) for model in ("smoke student", "smoke llama")
                                                  for form in forms]
    for model, form, decode, prefill, decode_ratio, prefill_ratio, projections, rss in rows:
        assert float(decode) > 0 and float(prefill) > 0
        assert ratio(decode_ratio) > 0 and ratio(prefill_ratio) > 0
        assert float(projections) > 0
        assert float(rss) > 0 if model == "smoke student" else rss == "-"
    projections = {(row[0], row[1]): float(row[6]) for row in rows}
    for model in ("smoke student", "smoke llama"):
        assert projections[(model, "2:4")] < 0.7 * projections[(model, "dense")]
    assert "dense compiled skipped" in result.stdout
    assert "zero" in result.stdout and "of the projection inputs during decode" in result.stdout


@pytest.mark.slow  # several variants; compile is left to tests/test_speed.py, which checks it against eager
def test_train_throughput_smoke_runs_the_variants_on_the_same_loss():
    variants = ["baseline", "pipeline", "pipeline+checkpointing"]
    result = run_script("benchmarks/train_throughput.py", "--smoke", "--variants", ",".join(variants))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in result.stdout.splitlines()
            if line.startswith("| baseline") or line.startswith("| pipeline")}
    assert set(rows) == set(variants)
    for name, cells in rows.items():
        assert float(cells[2]) > 0, name  # tokens/s
        assert float(cells[8]) < 1e-3, name  # first-batch loss relative to the plain loop's


@pytest.mark.slow  # a benchmark script in a process of its own
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_benchmarks_refuse_without_a_gpu():
    for script in ("benchmarks/linear_2_4.py", "benchmarks/end_to_end.py", "benchmarks/train_throughput.py"):
        result = run_script(script)
        assert result.returncode == 2
        assert "needs a CUDA GPU" in result.stderr


@pytest.mark.slow  # a benchmark script in a process of its own
def test_teacher_sampling_prints_a_row_per_variant(tiny_teacher):
    result = run_script("benchmarks/teacher_sampling.py", "--teacher", str(tiny_teacher), "--batch", "2",
                        "--new-tokens", "4", "--variants", "generate,distill")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in result.stdout.splitlines()
            if line.startswith(("| generate", "| distill"))}
    assert set(rows) == {"generate", "distill"}
    for seconds, kept, tokens_per_s in rows.values():
        assert float(seconds) >= 0 and 2 <= int(kept) <= 2 * 5  # each sequence keeps 1 to 4 tokens plus EOS
        assert int(tokens_per_s) > 0


@pytest.mark.slow  # a pipeline launch of its own
def test_scale_smoke_measures_every_stage(tmp_path):
    out = tmp_path / "scale.json"
    result = run_script("benchmarks/scale.py", "--smoke", "--work", str(tmp_path), "--out", str(out),
                        "--set", "train.optimizer_state=bf16")
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    run = json.loads(out.read_text())["runs"][0]
    assert run["model"] == "tiny" and run["processes"] == 1 and run["parameters"] > 3_000_000  # the 49k embedding
    assert run["settings"] == ["train.optimizer_state=bf16"]
    assert " | 1, train.optimizer_state=bf16 | " in result.stdout
    assert yaml.safe_load((tmp_path / "runs" / "tiny-p1-b12" / "scale" / "config.yaml").read_text())["train"]["optimizer_state"] == "bf16"
    assert set(run["stages"]) == {"teacher", "teacher_logits", "prune", "distill", "export", "evaluate"}
    for stage, row in run["stages"].items():
        assert row["seconds"] > 0 and len(row["peak_rss_mb"]) == 1 and row["peak_rss_mb"][0] > 100, (stage, row)
        assert (row.get("s_per_1k_tokens", 0) > 0) == (stage != "export"), (stage, row)
    assert "| tiny |" in result.stdout and "8B teacher and student" in result.stdout
