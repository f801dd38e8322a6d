"""The stage runner: which stages are up to date, which must run, and how each one's output lands.

Every stage writes into `<run_dir>/<stage>.partial/` while it works (checkpoints live there) and the
finished directory is renamed to `<run_dir>/<stage>/` with a manifest at the very end, so a finished
stage is never overwritten by a failing one. A stage's fingerprint hashes the config keys it depends
on, the contents of its input files (distill.run.file_stamps), and the manifests of the stages it reads;
a stage is skipped when its manifest holds the same fingerprint, and runs again (with everything
downstream) when it does not.
"""

from __future__ import annotations

import resource
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from distill import __version__
from distill.run.artifacts import MANIFEST_FILE
from distill.run.checksums import damage, digest_tree
from distill.config import Config, to_dict, to_yaml
from distill.errors import DistillError, describe_os_error
from distill.run.file_stamps import FileStamps
from distill.io import fingerprint, read_json, remove_stale_temporaries, replace_dir, write_json, write_text
from distill.run.config_view import UNFINGERPRINTED, ConfigView, covers
from distill.run.locking import RunDirLock
from distill.precision import Precision
from distill.run.tracking import start_tracking


@dataclass
class StageContext:
    # what the stage may read of the config: the keys its fingerprint covers, directly or through the
    # stages it reads from (distill.run.config_view)
    config: ConfigView
    accelerator: Accelerator
    run_dir: Path
    work_dir: Path  # where the running stage writes (renamed to the stage dir when it finishes)
    full_config: Config | None = field(default=None, repr=False)  # for the trackers' record of the run only

    def stage_dir(self, name: str) -> Path:
        """The finished output of an upstream stage."""
        return self.run_dir / name

    @property
    def final_dir(self) -> Path:
        """Where the running stage's output will be once it finishes (paths recorded in its
        summary name this, not the work dir)."""
        return self.run_dir / self.work_dir.name.removesuffix(".partial")

    def log(self, message: str) -> None:
        self.accelerator.print(message, flush=True)

    def start_tracking(self) -> None:
        """Start the configured trackers (wandb, tensorboard), which record the whole config."""
        start_tracking(self.accelerator, self.full_config, self.work_dir)


@dataclass
class Stage:
    name: str
    config_keys: tuple[str, ...]  # dotted config paths this stage depends on
    upstream: tuple[str, ...]  # stages whose output it reads
    # returns a summary kept in the manifest, for people: what later stages read is a record (distill.run.artifacts)
    run: Callable[[StageContext], dict]
    input_files: Callable[[Config], list[str]] = field(default=lambda config: [])
    # whether its results depend on the precision it computes in (for this config): then the effective
    # precision is part of its fingerprint
    depends_on_precision: Callable[[Config], bool] = field(default=lambda config: False)
    # files of its dir that a later stage completes (the export's model cards, which evaluate fills
    # in with the report): fnmatch patterns, left out of its checksums
    completed_later: tuple[str, ...] = ()
    # files of its dir whose reader checks each part it reads (fnmatch patterns): their checksums
    # record the size alone, so a launch does not hash them whole (distill.run.checksums)
    checked_by_reader: tuple[str, ...] = ()


def peak_resident_mb() -> float:
    """This process's peak resident memory so far, in MiB (getrusage reports KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


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
    return {key: value for key, value in flatten(to_dict(config)).items() if covers(keys, key)}


PRECISION_KEY = "precision"
INPUTS_FILE = "inputs.json"  # in a stage's work dir: the inputs it runs on (a resume must match them)
# in every run dir distill makes: --restart, --from and --discard-partial delete only in dirs that hold it
RUN_MARKER = ".distill-run"
# the distill release that ran a stage: a run dir written by another one runs again from the first stage
# whose fingerprint differs (no upgrade of older run dirs)
VERSION_KEY = "distill.version"


def _file_key(path: str) -> str:
    return f"file:{path}"


def describe_changes(old: dict, new: dict) -> str:
    """Name what differs between two `Pipeline.inputs` dicts, key by key."""
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == VERSION_KEY:
            changes.append(f"written by distill {old.get(key, '<unknown>')}, this is distill {new.get(key)}")
        elif key.startswith("upstream."):
            changes.append(f"stage '{key.removeprefix('upstream.')}' ran again")
        elif key.startswith("file:"):
            path = key.removeprefix("file:")
            changes.append(f"input file {path} {'changed' if key in old and key in new else 'added' if key in new else 'removed'}")
        else:
            changes.append(f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}")
    return "; ".join(changes)


class Decision(NamedTuple):
    """What a launch does with one stage: `action` is "skip", "running", "running again" or
    "resuming the unfinished run"; `discard` says its unfinished `.partial/` is dropped first."""

    stage: Stage
    action: str
    reason: str
    discard: bool = False


def _check_shape(path: Path, data, required: dict[str, type]) -> dict:
    """`data` read from `path`, refused in one line unless it is a dict holding `required` keys of
    the given types (valid JSON of the wrong shape is as corrupt as broken JSON)."""
    if not isinstance(data, dict):
        raise DistillError(f"corrupt file {path}: expected a JSON object, found {type(data).__name__}")
    for key, kind in required.items():
        if not isinstance(data.get(key), kind):
            raise DistillError(f"corrupt file {path}: '{key}' is missing or not a {kind.__name__}")
    return data


class Pipeline:
    def __init__(self, config: Config, accelerator: Accelerator, stages: list[Stage], discard: tuple[str, ...] = ()):
        self.config = config
        self.accelerator = accelerator
        self.stages = stages
        self.run_dir = config.run_dir
        self.precision = (Precision.BF16 if accelerator.mixed_precision == "bf16" else Precision.FP32).value
        self.discard = set(discard)  # stages whose unfinished run the user asked to drop (--discard-partial)
        self.file_stamps = FileStamps(self.run_dir)

    def inputs(self, stage: Stage) -> dict:
        """What a stage's fingerprint covers, as a flat dict (so changes can be named key by key)."""
        inputs = {f"config.{key}": value for key, value in _select(self.config, stage.config_keys).items()}
        for path in stage.input_files(self.config):
            inputs[_file_key(path)] = self.file_stamps.stamp(path)
        for name in stage.upstream:
            inputs[f"upstream.{name}"] = self._completion(name)
        if stage.depends_on_precision(self.config):
            inputs[PRECISION_KEY] = self.precision
        inputs[VERSION_KEY] = __version__
        return inputs

    def readable_keys(self, stage: Stage) -> tuple[str, ...]:
        """The config keys `stage` may read: its own, those of every stage it reads from (a change
        there runs that stage again, and so this one), and the unfingerprinted ones."""
        by_name = {candidate.name: candidate for candidate in self.stages}
        keys, pending, seen = list(stage.config_keys), list(stage.upstream), set()
        while pending:
            name = pending.pop()
            if name in seen or name not in by_name:
                continue
            seen.add(name)
            keys.extend(by_name[name].config_keys)
            pending.extend(by_name[name].upstream)
        return tuple(dict.fromkeys(keys + list(UNFINGERPRINTED)))

    def manifest(self, name: str) -> dict | None:
        path = self.run_dir / name / MANIFEST_FILE
        if not path.is_file():
            return None
        try:
            return _check_shape(path, read_json(path), {"fingerprint": str, "inputs": dict, "completion": str})
        except DistillError as error:
            raise DistillError(f"{error}; rerun with --from {name} to run stage '{name}' again") from None

    def _completion(self, name: str) -> str | None:
        """The finished run of stage `name` that downstream stages fingerprint; None when there is
        none or its manifest is unreadable (planning that stage itself refuses or re-runs it first)."""
        try:
            manifest = self.manifest(name)
        except DistillError:
            return None
        return manifest["completion"] if manifest else None

    def _partial(self, name: str) -> Path:
        return self.run_dir / f"{name}.partial"

    def _partial_inputs(self, stage: Stage) -> dict | None:
        """The inputs an unfinished run was started with (None when it never got to write them)."""
        name = stage.name
        path = self._partial(name) / INPUTS_FILE
        if not path.is_file():
            return None
        try:
            return _check_shape(path, read_json(path), {"inputs": dict})["inputs"]
        except DistillError as error:
            raise DistillError(f"{error}; rerun with --discard-partial {name} to drop that unfinished run") from None

    def _names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def run(self, only: str | None = None, start_from: str | None = None, restart: bool = False) -> None:
        for chosen in (only, start_from, *sorted(self.discard)):
            if chosen is not None and chosen not in self._names():
                raise DistillError(f"unknown stage '{chosen}' (stages: {', '.join(self._names())})")
        # the main process takes the lock for the launch; every process refuses together
        lock = RunDirLock(self.run_dir) if self.accelerator.is_main_process else None
        refusal = lock.try_acquire() if lock is not None else None
        self._refuse_together(refusal)
        try:
            self._run(only, start_from, restart)
        finally:
            if lock is not None:
                lock.release()

    def _refuse_together(self, refusal: str | None) -> None:
        """Raise `refusal` (the main process's verdict) on every process, or go on together."""
        if self.accelerator.num_processes > 1:
            refusal = broadcast_object_list([refusal])[0]
        if refusal:
            raise DistillError(refusal)

    def _main_verdict(self, check: Callable[[], str | None]) -> str | None:
        """`check()` on the main process alone, its refusal (or DistillError, or a failed file
        operation) as a line that _refuse_together hands to every process, which would otherwise
        wait for the main one at the next collective."""
        if not self.accelerator.is_main_process:
            return None
        try:
            return check()
        except DistillError as error:
            return str(error)
        except OSError as error:
            return describe_os_error(error)

    def _prepare_run_dir(self, restart: bool) -> str | None:
        """Under the lock, on the main process: make sure the run dir is one distill made (it deletes
        nothing elsewhere), start it over on --restart, and clean up after a killed launch. Returns
        the refusal, if any."""
        run_dir = self.run_dir
        if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / RUN_MARKER).is_file():
            return (f"not a distill run dir: {run_dir} exists and has no {RUN_MARKER}, which distill writes in every "
                    f"run dir it makes; choose another run.name or run.output_dir (nothing there was touched)")
        if restart and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / RUN_MARKER).is_file():
            write_json(run_dir / RUN_MARKER, {"made_by": f"distill {__version__}"})
        # nothing else writes here under the lock: temp files and half-landed stages are what a killed
        # launch left
        remove_stale_temporaries(run_dir)
        self._finish_interrupted_landings()
        return None

    def _run(self, only: str | None, start_from: str | None, restart: bool) -> None:
        accelerator = self.accelerator
        self._refuse_together(self._main_verdict(lambda: self._prepare_run_dir(restart)))

        selected = [stage for stage in self.stages if only is None or stage.name == only]
        forced = {only} if only else set(self._names()[self._names().index(start_from):]) if start_from else set()
        for stage in selected:
            for name in stage.upstream:
                if only and self.manifest(name) is None:
                    raise DistillError(f"stage '{stage.name}' needs stage '{name}' finished first; run the pipeline without --only")
        # decide everything before doing anything, so a refusal comes before any stage is replaced
        decisions = self.plan(selected, forced)
        self._refuse_together(self._main_verdict(lambda: self._damage(self._finished_stages_read(decisions))))
        if accelerator.is_main_process:
            self.file_stamps.save()  # the input files hashed to plan
        for decision in decisions:
            stage = decision.stage
            if decision.discard:
                why = "asked to run it again" if stage.name in forced else "--discard-partial"
                accelerator.print(f"[{stage.name}] discarding the unfinished run in {self._partial(stage.name)} ({why})", flush=True)
                if accelerator.is_main_process:
                    shutil.rmtree(self._partial(stage.name))
                accelerator.wait_for_everyone()
            if decision.action == "skip":
                accelerator.print(f"[{stage.name}] up to date, skipped{f' ({decision.reason})' if decision.reason else ''}", flush=True)
            else:
                accelerator.print(f"[{stage.name}] {decision.action}{f' ({decision.reason})' if decision.reason else ''}", flush=True)
                self._run_stage(stage)

    def _finish_interrupted_landings(self) -> None:
        """A stage whose `.partial/` holds its manifest had finished and was being renamed into place
        when the launch died: complete the rename instead of running it again. A launch killed just
        after the rename left the stage's previous dir (`.STAGE.old`) and its `inputs.json`."""
        for name in self._names():
            partial, finished = self._partial(name), self.run_dir / name
            if (partial / MANIFEST_FILE).is_file():
                replace_dir(partial, finished)
            if (finished / MANIFEST_FILE).is_file():
                old = self.run_dir / f".{name}.old"
                if old.is_dir():
                    shutil.rmtree(old)
                (finished / INPUTS_FILE).unlink(missing_ok=True)

    def _finished_stages_read(self, decisions: list[Decision]) -> dict[str, dict]:
        """{name: manifest} of the finished stages this launch uses as they are: those it skips and
        those that a stage it runs reads without running them first."""
        running = {decision.stage.name for decision in decisions if decision.action != "skip"}
        used = [decision.stage.name for decision in decisions if decision.action == "skip"]
        for decision in decisions:
            if decision.action != "skip":
                used += [name for name in decision.stage.upstream if name not in running]
        manifests = {name: self.manifest(name) for name in dict.fromkeys(used)}
        return {name: manifest for name, manifest in manifests.items() if manifest is not None}

    def _damage(self, manifests: dict[str, dict]) -> str | None:
        """The first finished stage among `manifests` whose files differ from its manifest's checksums,
        as a one-line refusal with the way on; None when all are as they were written."""
        for name, manifest in manifests.items():
            problem = damage(self.run_dir / name, manifest.get("files"), "its manifest")
            if problem:
                return f"stage '{name}' is damaged: {problem}; rerun with --from {name} to run it again"
        return None

    def plan(self, selected: list[Stage], forced: set[str]) -> list[Decision]:
        """A Decision for each selected stage. An unfinished run resumes when its inputs are today's;
        with other inputs it is kept, and the finished stage used, when that one matches; otherwise
        the launch is refused, naming what changed (nothing has been touched yet)."""
        will_run: set[str] = set()
        decisions = []
        for stage in selected:
            name = stage.name
            inputs = self.inputs(stage)
            stamp = fingerprint(inputs)
            manifest = None if name in forced else self.manifest(name)
            finished = manifest is not None and fingerprint(manifest["inputs"]) == stamp
            upstream_runs = [f"stage '{up}' runs again" for up in stage.upstream if up in will_run]
            has_partial = self._partial(name).is_dir()
            discard = has_partial and (name in forced or name in self.discard)
            previous = self._partial_inputs(stage) if has_partial and not discard else None
            if previous is not None and fingerprint(previous) == stamp and not upstream_runs:
                decision = Decision(stage, "resuming the unfinished run", str(self._partial(name)))
            elif previous is not None and finished and not upstream_runs:
                decision = Decision(stage, "skip", f"the unfinished run in {self._partial(name)} was made with other "
                                                   f"inputs and is kept; --discard-partial {name} drops it")
            elif previous is not None:
                raise DistillError(self._refusal(stage, previous, inputs, upstream_runs))
            elif finished and not upstream_runs:
                decision = Decision(stage, "skip", "", discard)
            elif name in forced:  # its manifest is not read: --from/--only also recovers a corrupt one
                again = (self.run_dir / name / MANIFEST_FILE).is_file()
                decision = Decision(stage, "running again" if again else "running", "asked for" if again else "", discard)
            elif manifest is not None:
                reason = "; ".join(upstream_runs) or describe_changes(manifest["inputs"], inputs)
                decision = Decision(stage, "running again", reason, discard)
            else:
                decision = Decision(stage, "running", "", discard)
            if decision.action != "skip":
                will_run.add(name)
            decisions.append(decision)
        return decisions

    def _refusal(self, stage: Stage, previous: dict, inputs: dict, upstream_runs: list[str]) -> str:
        """Why an unfinished run cannot be resumed, and how to go on."""
        partial = self._partial(stage.name)
        old, new = previous.get(PRECISION_KEY), inputs.get(PRECISION_KEY)
        if old != new and old is not None and new is not None:
            return (f"stage '{stage.name}' has an unfinished run in {partial} computed in {old} and this launch "
                    f"computes in {new}; resume it with run.precision={old}, or rerun with --discard-partial "
                    f"{stage.name} to start that stage over in {new}")
        changes = upstream_runs + [describe_changes(previous, inputs)]
        return (f"stage '{stage.name}' has an unfinished run in {partial} made with other inputs "
                f"({'; '.join(change for change in changes if change)}); go back to those inputs to resume it, or "
                f"rerun with --discard-partial {stage.name} to drop it and run the stage afresh (other stages are kept)")

    def _run_stage(self, stage: Stage) -> None:
        accelerator = self.accelerator
        inputs = self.inputs(stage)  # now, after the stages before it have finished
        stamp = fingerprint(inputs)
        work_dir = self.run_dir / f"{stage.name}.partial"
        saved_inputs = work_dir / INPUTS_FILE
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            work_dir.mkdir(parents=True, exist_ok=True)
            write_json(saved_inputs, {"fingerprint": stamp, "inputs": inputs})
            self.file_stamps.save()
        accelerator.wait_for_everyone()

        started = time.time()
        view = ConfigView(self.config, self.readable_keys(stage), stage.name)
        context = StageContext(view, accelerator, self.run_dir, work_dir, full_config=self.config)
        summary = stage.run(context)
        seconds = time.time() - started
        peak_rss_mb = gather_object([peak_resident_mb()])  # every rank's, as the ranks run the stage together
        if accelerator.is_main_process:
            write_json(work_dir / MANIFEST_FILE, {
                "stage": stage.name,
                "fingerprint": stamp,
                "inputs": inputs,
                "completion": uuid.uuid4().hex,  # downstream stages fingerprint this, so a re-run invalidates them
                "seconds": round(seconds, 2),
                "peak_rss_mb": peak_rss_mb,  # by rank: the process's peak so far (this stage's, under --only)
                "summary": summary,
                # what every later launch and every reader checks the stage's files against
                "files": digest_tree(work_dir, skip=(MANIFEST_FILE, INPUTS_FILE, *stage.completed_later),
                                     checked_by_reader=stage.checked_by_reader),
            })
            replace_dir(work_dir, self.run_dir / stage.name)
            (self.run_dir / stage.name / INPUTS_FILE).unlink()  # after the rename: a crash before it leaves a resumable partial
            # the config the finished stages now reflect; a failed or refused stage never changes it
            write_text(self.run_dir / "config.yaml", to_yaml(self.config))
        accelerator.wait_for_everyone()
        accelerator.print(f"[{stage.name}] finished in {seconds:.1f} s", flush=True)
