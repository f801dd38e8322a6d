"""The stage runner: which stages are up to date, which must run, and how each one's output lands.

Every stage writes into `<run_dir>/<stage>.partial/` while it works (checkpoints live there) and the
finished directory is renamed to `<run_dir>/<stage>/` with a manifest at the very end, so a finished
stage is never overwritten by a failing one. A stage's fingerprint hashes the config keys it depends
on, its input files, and the manifests of the stages it reads; a stage is skipped when its manifest
holds the same fingerprint, and runs again (with everything downstream) when it does not.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from distill import __version__
from distill.config import Config, to_dict, to_yaml
from distill.errors import DistillError
from distill.io import fingerprint, read_json, replace_dir, write_json, write_text
from distill.locking import RunDirLock
from distill.precision import Precision


@dataclass
class StageContext:
    config: Config
    accelerator: Accelerator
    run_dir: Path
    work_dir: Path  # where the running stage writes (renamed to the stage dir when it finishes)

    def stage_dir(self, name: str) -> Path:
        """The finished output of an upstream stage."""
        return self.run_dir / name

    def log(self, message: str) -> None:
        self.accelerator.print(message, flush=True)


@dataclass
class Stage:
    name: str
    config_keys: tuple[str, ...]  # dotted config paths this stage depends on
    upstream: tuple[str, ...]  # stages whose output it reads
    run: Callable[[StageContext], dict]  # returns a summary kept in the manifest
    input_files: Callable[[Config], list[str]] = field(default=lambda config: [])
    # whether its results depend on the precision it computes in (for this config): then the effective
    # precision is part of its fingerprint
    depends_on_precision: Callable[[Config], bool] = field(default=lambda config: False)


def flatten(data, prefix: str = "") -> dict:
    """{'a': {'b': 1}, 'c': [x, y]} -> {'a.b': 1, 'c[0]': x, 'c[1]': y}."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and any(isinstance(item, (dict, list)) for item in data):
        out = {}
        for index, value in enumerate(data):
            out.update(flatten(value, f"{prefix}[{index}]"))
        return out
    return {prefix: data}


def _select(config: Config, keys: tuple[str, ...]) -> dict:
    full = flatten(to_dict(config))
    return {key: value for key, value in full.items() if any(key == k or key.startswith((k + ".", k + "[")) for k in keys)}


PRECISION_KEY = "precision"
# run dirs made before distill.precision recorded accelerate's setting under this key
_LEGACY_PRECISION_KEY, _LEGACY_PRECISION_VALUES = "accelerate.mixed_precision", {"bf16": "bf16", "no": "fp32"}


def upgrade_inputs(inputs: dict) -> dict:
    """A saved inputs dict in today's keys, so a run dir from an older release still matches."""
    if _LEGACY_PRECISION_KEY not in inputs:
        return inputs
    inputs = dict(inputs)
    old = inputs.pop(_LEGACY_PRECISION_KEY)
    inputs[PRECISION_KEY] = _LEGACY_PRECISION_VALUES.get(old, f"{old} (accelerate)")
    return inputs


def _file_stamp(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        return {"path": path, "missing": True}
    stat = file.stat()
    return {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def describe_changes(old: dict, new: dict) -> str:
    """Name what differs between two `Pipeline.inputs` dicts, key by key."""
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key.startswith("upstream."):
            changes.append(f"stage '{key.removeprefix('upstream.')}' ran again")
        elif key.startswith("file["):
            path = (new.get(key) or old.get(key))["path"]
            changes.append(f"input file {path} {'changed' if key in old and key in new else 'added' if key in new else 'removed'}")
        else:
            changes.append(f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}")
    return "; ".join(changes)


class Pipeline:
    def __init__(self, config: Config, accelerator: Accelerator, stages: list[Stage]):
        self.config = config
        self.accelerator = accelerator
        self.stages = stages
        self.run_dir = config.run_dir
        self.precision = (Precision.BF16 if accelerator.mixed_precision == "bf16" else Precision.FP32).value

    def inputs(self, stage: Stage) -> dict:
        """What a stage's fingerprint covers, as a flat dict (so changes can be named key by key)."""
        inputs = {f"config.{key}": value for key, value in _select(self.config, stage.config_keys).items()}
        for index, path in enumerate(stage.input_files(self.config)):
            inputs[f"file[{index}]"] = _file_stamp(path)
        for name in stage.upstream:
            manifest = self.manifest(name)
            inputs[f"upstream.{name}"] = manifest["completion"] if manifest else None
        if stage.depends_on_precision(self.config):
            inputs[PRECISION_KEY] = self.precision
        inputs["distill.version"] = __version__
        return inputs

    def manifest(self, name: str) -> dict | None:
        path = self.run_dir / name / "manifest.json"
        return read_json(path) if path.is_file() else None

    def _names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def run(self, only: str | None = None, start_from: str | None = None, restart: bool = False) -> None:
        for chosen in (only, start_from):
            if chosen is not None and chosen not in self._names():
                raise DistillError(f"unknown stage '{chosen}' (stages: {', '.join(self._names())})")
        # the main process takes the lock for the launch; every process refuses together
        lock = RunDirLock(self.run_dir) if self.accelerator.is_main_process else None
        refusal = lock.try_acquire() if lock is not None else None
        if self.accelerator.num_processes > 1:
            refusal = broadcast_object_list([refusal])[0]
        if refusal:
            raise DistillError(refusal)
        try:
            self._run(only, start_from, restart)
        finally:
            if lock is not None:
                lock.release()

    def _run(self, only: str | None, start_from: str | None, restart: bool) -> None:
        accelerator = self.accelerator
        if restart and accelerator.is_main_process and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        accelerator.wait_for_everyone()

        selected = [stage for stage in self.stages if only is None or stage.name == only]
        forced = {only} if only else set(self._names()[self._names().index(start_from):]) if start_from else set()
        for stage in selected:
            for name in stage.upstream:
                if only and self.manifest(name) is None:
                    raise DistillError(f"stage '{stage.name}' needs stage '{name}' finished first; run the pipeline without --only")
        # decide everything before doing anything, so a refusal comes before any stage is replaced
        for stage, action, reason in self.plan(selected, forced):
            if action == "skip":
                accelerator.print(f"[{stage.name}] up to date, skipped", flush=True)
            else:
                accelerator.print(f"[{stage.name}] {action}{f' ({reason})' if reason else ''}", flush=True)
                self._run_stage(stage)

    def plan(self, selected: list[Stage], forced: set[str]) -> list[tuple[Stage, str, str]]:
        """(stage, action, reason) for each selected stage; refuses to drop an unfinished run whose
        inputs changed, naming what changed."""
        will_run: set[str] = set()
        steps = []
        for stage in selected:
            inputs = self.inputs(stage)
            stamp = fingerprint(inputs)
            manifest = self.manifest(stage.name)
            upstream_runs = [f"stage '{name}' runs again" for name in stage.upstream if name in will_run]
            partial = self.run_dir / f"{stage.name}.partial" / "inputs.json"
            if partial.is_file():
                previous = upgrade_inputs(read_json(partial)["inputs"])
                if fingerprint(previous) != stamp or upstream_runs:
                    raise DistillError(self._refusal(stage, partial.parent, previous, inputs, upstream_runs))
                action, reason = "resuming the unfinished run", str(partial.parent)
            elif manifest and fingerprint(upgrade_inputs(manifest["inputs"])) == stamp and stage.name not in forced \
                    and not upstream_runs:
                action, reason = "skip", ""
            elif manifest:
                action = "running again"
                reason = ("asked for" if stage.name in forced
                          else "; ".join(upstream_runs) or describe_changes(upgrade_inputs(manifest["inputs"]), inputs))
            else:
                action, reason = "running", ""
            if action != "skip":
                will_run.add(stage.name)
            steps.append((stage, action, reason))
        return steps

    @staticmethod
    def _refusal(stage: Stage, partial: Path, previous: dict, inputs: dict, upstream_runs: list[str]) -> str:
        """Why an unfinished run cannot be resumed, and how to go on."""
        old, new = previous.get(PRECISION_KEY), inputs.get(PRECISION_KEY)
        if old != new and old is not None and new is not None:
            return (f"stage '{stage.name}' has an unfinished run in {partial} computed in {old} and this launch "
                    f"computes in {new}; resume it with run.precision={old}, or delete {partial} to start that "
                    f"stage over in {new}")
        changes = upstream_runs + [describe_changes(previous, inputs)]
        return (f"stage '{stage.name}' has an unfinished run in {partial} made with other inputs "
                f"({'; '.join(change for change in changes if change)}); rerun with --restart to start over")

    def _run_stage(self, stage: Stage) -> None:
        accelerator = self.accelerator
        inputs = self.inputs(stage)  # now, after the stages before it have finished
        stamp = fingerprint(inputs)
        work_dir = self.run_dir / f"{stage.name}.partial"
        saved_inputs = work_dir / "inputs.json"
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            work_dir.mkdir(parents=True, exist_ok=True)
            write_json(saved_inputs, {"fingerprint": stamp, "inputs": inputs})
            write_text(self.run_dir / "config.yaml", to_yaml(self.config))  # the config the run dir now reflects
        accelerator.wait_for_everyone()

        started = time.time()
        context = StageContext(self.config, accelerator, self.run_dir, work_dir)
        summary = stage.run(context)
        seconds = time.time() - started
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(work_dir / "manifest.json", {
                "stage": stage.name,
                "fingerprint": stamp,
                "inputs": inputs,
                "completion": uuid.uuid4().hex,  # downstream stages fingerprint this, so a re-run invalidates them
                "seconds": round(seconds, 2),
                "summary": summary,
            })
            replace_dir(work_dir, self.run_dir / stage.name)
            (self.run_dir / stage.name / "inputs.json").unlink()  # after the rename: a crash before it leaves a resumable partial
        accelerator.wait_for_everyone()
        accelerator.print(f"[{stage.name}] finished in {seconds:.1f} s", flush=True)
