"""Experiment trackers through accelerate (wandb, tensorboard, or none), from the main process only.

wandb reads WANDB_MODE, WANDB_DIR, WANDB_API_KEY ... from the environment itself; WANDB_PROJECT
overrides `tracking.project`. Both write inside the run dir (`logs/`) unless WANDB_DIR or an absolute
tensorboard project names another place. The wandb run id is kept in the stage's dir, so a resumed stage
continues the same wandb run instead of starting a new one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from accelerate import Accelerator

from distill.config import Config, TrackingBackend, to_dict
from distill.io import write_text

RUN_ID_FILE = "wandb_run_id.txt"


def logs_dir(config: Config) -> Path:
    """Where the trackers write (tensorboard under <project>/, wandb under wandb/ unless WANDB_DIR
    says otherwise): inside the run dir."""
    return config.run_dir / "logs"


def log_with(config: Config) -> str | None:
    """The `log_with` argument for Accelerator."""
    return None if config.tracking.backend is TrackingBackend.NONE else config.tracking.backend.value


def start_tracking(accelerator: Accelerator, config: Config, state_dir: Path) -> None:
    if config.tracking.backend is TrackingBackend.NONE:
        return
    init_kwargs = {}
    if config.tracking.backend is TrackingBackend.WANDB:
        run_id_file = Path(state_dir) / RUN_ID_FILE
        if accelerator.is_main_process and not run_id_file.is_file():
            write_text(run_id_file, secrets.token_hex(4))  # wandb run ids: short, lowercase alphanumeric
        accelerator.wait_for_everyone()
        init_kwargs["wandb"] = {"id": run_id_file.read_text().strip(), "resume": "allow", "name": config.run.name}
        if not os.environ.get("WANDB_DIR"):  # wandb's default is ./wandb, wherever the launch started
            init_kwargs["wandb"]["dir"] = str(logs_dir(config))
    project = os.environ.get("WANDB_PROJECT", config.tracking.project)
    accelerator.init_trackers(project, config=_flat_hparams(to_dict(config)), init_kwargs=init_kwargs)


def log_row(accelerator: Accelerator, row: dict, prefix: str) -> None:
    """A metrics row ({"step": ..., name: value}) to every tracker, each name under `prefix`."""
    accelerator.log({f"{prefix}{key}": value for key, value in row.items() if key != "step"}, step=row["step"])


def resend_rows(accelerator: Accelerator, rows: list[dict], prefix: str) -> None:
    """After a resume, send the rows kept from before the kill again. A killed process loses what
    its trackers still buffered (wandb and tensorboard write in the background; a SIGKILLed run can
    leave its wandb file without a single row), while the metrics file is written at every log. A
    wandb run continued online knows its last step and would drop earlier ones with a warning, so
    only rows from its current step on are sent there; offline it starts from 0 and takes them all."""
    if not accelerator.trackers or not accelerator.is_main_process:
        return
    first = 0
    if any(tracker.name == "wandb" for tracker in accelerator.trackers):
        first = accelerator.get_tracker("wandb", unwrap=True).step
    for row in rows:
        if row["step"] >= first:
            log_row(accelerator, row, prefix)


def _flat_hparams(data: dict, prefix: str = "") -> dict:
    """Trackers want flat scalars (tensorboard refuses lists and dicts)."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value if value is not None else "none"
        else:
            flat[name] = str(value)
    return flat
