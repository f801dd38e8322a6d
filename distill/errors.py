"""One exception type for every problem the user can fix (bad config, missing file, stale checkpoint).

Entry points catch it and print its message as a single line, so a user sees what is wrong without a
traceback; everything else is a bug and keeps its traceback. A failed file operation (OSError) is
refused the same way, in the words of `describe_os_error`.
"""

import errno
import os
import sys
from pathlib import Path

# set by pipelines/launch.py for the processes it starts: each writes its one-line refusal into this
# dir instead of printing it, and the launcher prints one of them once every process has stopped
REFUSAL_DIR_ENV = "DISTILL_REFUSAL_DIR"


class DistillError(Exception):
    """A problem with the user's input or run dir, explained in one line."""


def local_rank() -> int:
    """This process's index on its machine under a launcher (0 when started alone)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def report_refusal(line: str) -> None:
    """Show `line` (a whole `distill: error: ...` line) to the user once per launch.

    Under pipelines/launch.py every rank refuses the same input at about the same moment, and a rank
    that prints first may be killed by the launcher before the main one has printed: so each writes
    its line into the launcher's dir and the launcher prints one. Started alone, or when that dir
    cannot be written (a full disk), the line is printed here.
    """
    refusals = os.environ.get(REFUSAL_DIR_ENV)
    if refusals:
        mine = Path(refusals) / f"{local_rank()}.txt"
        partial = mine.with_suffix(".partial")
        try:  # renamed into place whole, so the launcher never reads half a line
            partial.write_text(line + "\n")
            partial.replace(mine)
            return
        except OSError:
            pass
    print(line, file=sys.stderr, flush=True)


def describe_os_error(error: OSError) -> str:
    """One line for a failed read or write: the path, the reason, and what to do about the usual causes."""
    path = failed_path(error)
    if error.errno is None and path is not None and os.path.islink(path):
        return (f"{path} is a symbolic link (to {os.readlink(path)}): the pipeline deletes and replaces run dirs "
                "and stage dirs itself and does not do it through a link; remove the link (what it points to "
                "is kept) or put the dir it points to in its place")
    reason = error.strerror or str(error) or type(error).__name__
    where = f" ({path})" if path is not None else ""
    if error.filename2:
        where = f" ({path} -> {error.filename2})"
    advice = {
        errno.ENOSPC: "; its temp files were removed and the last finished stage and checkpoint are kept: free space "
                      "and run the same command again",
        errno.EDQUOT: "; free space and run the same command again",
        errno.EACCES: "; give this user write access there, or set run.output_dir to a writable dir",
        errno.EPERM: "; give this user write access there, or set run.output_dir to a writable dir",
        errno.EROFS: "; set run.output_dir to a writable dir",
        errno.ENAMETOOLONG: "; shorten run.name or run.output_dir",
    }.get(error.errno, "")
    return f"{reason}{where}{advice}"


def failed_path(error: OSError) -> str | None:
    """The path an OSError is about. shutil.rmtree refuses a symbolic link with an OSError that
    carries no path; the path is then the one the innermost shutil call was working on."""
    if error.filename is not None:
        return os.fsdecode(error.filename) if isinstance(error.filename, (str, bytes, os.PathLike)) else str(error.filename)
    path, trace = None, error.__traceback__
    while trace is not None:
        frame = trace.tb_frame
        if frame.f_globals.get("__name__") == "shutil" and isinstance(frame.f_locals.get("path"), (str, bytes, os.PathLike)):
            path = os.fsdecode(frame.f_locals["path"])
        trace = trace.tb_next
    return path
