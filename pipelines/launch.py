"""`accelerate launch`, except that a failed launch ends with exactly one line saying why.

launch.sh runs this instead of `python -m accelerate.commands.launch`: with several processes the
torch launcher raises ChildFailedError with a long traceback, logs each failure, and every rank refuses
the same bad input in the same words; one process's failure becomes accelerate's CalledProcessError.
Here the processes leave their one-line refusals in a dir this launcher made (distill.errors), the
launcher prints one of them once every process has stopped, and exits with the worker's own exit code
(2 for a refused input). Only a launch that failed without a refusal (a worker killed by a signal, or
one that crashed with its own traceback) gets the launcher's summary line.
"""

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# torch elastic logs every failure again in its own lines ("failed (exitcode: 2)", "Sending process ...
# closing signal SIGTERM") after the worker said why. Most of its loggers take their level from
# LOGLEVEL when they are created, the others inherit it from torch.distributed.elastic (set in main);
# LOGLEVEL=WARNING brings the lines back
os.environ.setdefault("LOGLEVEL", "CRITICAL")

from accelerate.commands.launch import launch_command, launch_command_parser  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: E402

from distill.errors import REFUSAL_DIR_ENV  # noqa: E402

REFUSED = 2  # the exit code of a refused input (pipelines/run.py)
REFUSALS_PREFIX = "distill-refusals-"  # then the launcher's PID: a killed launcher's dir is found by it


def main() -> int:
    args = launch_command_parser().parse_args(sys.argv[1:])
    args.quiet = False  # quiet turns the worker's exit code into 1; the handlers below keep it instead
    logging.getLogger("torch.distributed.elastic").setLevel(os.environ["LOGLEVEL"])
    remove_abandoned_refusal_dirs(Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=f"{REFUSALS_PREFIX}{os.getpid()}-") as refusals:
        os.environ[REFUSAL_DIR_ENV] = refusals  # the workers' environment is copied from this one
        try:
            launch_command(args)
        except subprocess.CalledProcessError as failure:  # one process
            return report_failure(Path(refusals), failure.returncode, [failure.returncode])
        except ChildFailedError as failure:  # several
            _, first = failure.get_first_failure()
            return report_failure(Path(refusals), first.exitcode, [error.exitcode for error in failure.failures.values()])
    return 0


def remove_abandoned_refusal_dirs(root: Path) -> None:
    """The refusal dirs of launchers that no longer run: a SIGKILL skips a launcher's own cleanup."""
    for path in root.glob(f"{REFUSALS_PREFIX}*"):
        pid = path.name.removeprefix(REFUSALS_PREFIX).split("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def report_failure(refusals: Path, first: int, codes: list[int]) -> int:
    """Print the refusal of the lowest local rank that wrote one, or else (no process said why) the
    exit codes; return the exit code of the launch: the first failed process's, as a shell reports it."""
    written = sorted(refusals.glob("*.txt"), key=lambda path: int(path.stem))
    if written:
        print(written[0].read_text().rstrip("\n"), file=sys.stderr, flush=True)
        return REFUSED
    print(f"launch: {len(codes)} process(es) failed with exit code {sorted(set(codes))}", file=sys.stderr, flush=True)
    return exit_code(first)


def exit_code(code: int) -> int:
    """A worker's exit code as a shell reports it: killed by signal N is 128 + N, never 0."""
    return 128 - code if code < 0 else code or 1


if __name__ == "__main__":
    sys.exit(main())
