"""The benchmark scripts run end to end (their --smoke modes on CPU, tiny shapes) and refuse clearly
without a GPU where they need one. They time nothing meaningful here: speed is measured on a GPU."""

import subprocess
import sys
from pathlib import Path

import torch
import pytest

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
