"""benchmarks/frontier.py on report.json files of the evaluate stage's structure (cut down from a
frontier run's report to the keys the script reads), and the frontier configs against demo.yaml."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from distill.run.config_file import load_config

sys.path.insert(0, str(REPO / "benchmarks"))
import frontier  # noqa: E402

# runs/frontier-2-4/evaluate/report.json, cut down to the keys frontier.py reads (values as that run wrote them)
REPORT_2_4 = {
    "sources": {
        "teacher_samples": {"teacher": {"ppl": 59.48068811243317}, "oneshot": {"ppl": 229.47685294265568, "kl": 1.5777914226055145},
                            "student": {"ppl": 104.14521649255198, "kl": 0.783654049038887}, "tokens": 2048, "block_size": 128},
        "test": {"teacher": {"ppl": 29.601752948575285}, "oneshot": {"ppl": 202.56805404437898, "kl": 1.8444423079490662},
                 "student": {"ppl": 70.93245821072271, "kl": 0.9073317348957062}, "tokens": 8192, "block_size": 512},
    },
    "export": {"verified": True, "pattern": "2:4", "masked": 210, "packed_dir": "runs/frontier-2-4/export/packed", "note": None},
    "config": {"teacher": "demo", "criterion": "wanda", "pattern": "2:4", "steps": 48},
    "activations": {"target": 0.0, "allocation": "uniform"},
}
# the report of the tiny pipeline run in tests/test_pattern_none.py (prune.pattern none, activations.target 0.5),
# cut down the same way: its student runs with input thresholds, scored as student_runtime
REPORT_ACT50 = {
    "sources": {
        "wiki": {"teacher": {"ppl": 49836.867314332165}, "oneshot": {"ppl": 50091.2900880942, "kl": 0.000652843969874084},
                 "student": {"ppl": 49828.77764659505, "kl": 0.000880043429788202},
                 "student_runtime": {"ppl": 49850.91290045284, "kl": 0.0010736106196418405}, "tokens": 256, "block_size": 32},
    },
    "export": {"verified": True, "pattern": "dense weights", "masked": 0, "packed_dir": None},
    "config": {"teacher": "tiny_teacher", "criterion": None, "pattern": "dense weights", "steps": 12},
    "activations": {"target": 0.5, "allocation": "uniform"},
}

# distill.eval.speed.measure_speed's result, as the evaluate stage's `speed` section
SPEED = {"baseline": "teacher",
         "models": {"teacher": {"decode_tokens_per_s": 20.0, "prefill_tokens_per_s": 400.0, "bytes_total": 1000, "bytes_projections": 800},
                    "student_runtime": {"decode_tokens_per_s": 30.0, "prefill_tokens_per_s": 500.0, "bytes_total": 600,
                                        "bytes_projections": 400}},
         "ratios": {"student_runtime": {"decode": 1.5, "prefill": 1.25, "bytes_total": 0.6, "bytes_projections": 0.5}}}


def _run(tmp_path: Path, name: str, report: dict) -> Path:
    run_dir = tmp_path / name
    (run_dir / "evaluate").mkdir(parents=True)
    (run_dir / "evaluate" / "report.json").write_text(json.dumps(report))
    return run_dir


def test_frontier_table_from_reports_without_speed(tmp_path, capsys):
    runs = [_run(tmp_path, "frontier-2-4", REPORT_2_4)]
    written = tmp_path / "out" / "frontier.md"
    assert frontier.main(["--runs", *map(str, runs), "--write", str(written)]) == 0
    out = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| frontier-")]
    assert rows == [["frontier-2-4", "2:4", "0%", "48", "29.60", "202.57", "70.93", "2.396", "0.9073", "-", "-", "-"]]
    assert "speed: not in report (frontier-2-4)" in out
    assert written.read_text().splitlines()[2].startswith("| frontier-2-4 | 2:4 | 0% |")
    assert not [path for path in written.parent.iterdir() if path != written]  # no temp file left


def test_the_thresholded_student_is_scored_and_speed_read_and_plotted(tmp_path):
    found = frontier.row("dense-act50", {**REPORT_ACT50, "speed": SPEED}, "wiki")
    assert found["model"] == "student_runtime"  # the student with its input thresholds, as users run it
    assert found["ppl_ratio"] == pytest.approx(49850.91290045284 / 49836.867314332165)
    assert found["speed"] == {"decode": 1.5, "prefill": 1.25, "memory": 0.6}
    line = frontier.table([found]).splitlines()[2]
    assert line.startswith("| dense-act50 | dense weights | 50% | 12 |") and line.endswith("| 1.50x | 1.25x | 0.600 |")
    plot = tmp_path / "frontier.png"
    frontier.plot([found], plot)
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_a_missing_source_is_one_clear_error():
    with pytest.raises(SystemExit, match="no eval source 'wiki'"):
        frontier.quality(REPORT_2_4, "wiki")


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "frontier").glob("*.yaml")), ids=lambda path: path.name)
def test_frontier_configs_are_the_demo_but_for_sparsity_and_wikitext(path):
    demo, config = load_config(REPO / "configs" / "demo.yaml"), load_config(path)
    assert config.run.name == f"frontier-{path.stem}" and config.run.output_dir == "runs"
    assert config.eval.files == ["../shared/data/wikitext-2/test.txt"]
    for section in ("teacher", "data", "calibration", "train", "attention", "export"):
        assert getattr(config, section) == getattr(demo, section), section
    assert {key: value for key, value in vars(config.eval).items() if key != "files"} == \
        {key: value for key, value in vars(demo.eval).items() if key != "files"}
    raw = yaml.safe_load(path.read_text())
    assert set(raw) - {"activations"} == set(yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()))
    assert f"bash launch.sh configs/frontier/{path.name}" in path.read_text()
