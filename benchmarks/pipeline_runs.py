"""What the quality benchmarks that run the pipeline share: one launch per row, and a table put into
benchmarks/RESULTS.md between a section's markers."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"


def run_pipeline(config: Path, name: str, overrides: list[str]) -> Path:
    """launch.sh on `config` as run `name` (the user's command); the run dir."""
    from distill.run.config_file import load_config

    overrides = [f"run.name={name}", *overrides]
    result = subprocess.run(["bash", str(REPO / "launch.sh"), str(config), *overrides], cwd=REPO,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    return REPO / load_config(config, overrides).run_dir


def write_results(markers: tuple[str, str], text: str) -> None:
    """Replace what RESULTS.md holds between `markers` with `text`."""
    from distill.io import write_text

    current = RESULTS.read_text()
    start, end = (current.index(marker) for marker in markers)
    write_text(RESULTS, current[:start + len(markers[0])] + "\n" + text + "\n" + current[end:])
