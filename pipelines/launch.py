"""`accelerate launch`, except that a failed worker is reported by its own one-line error.

launch.sh runs this instead of `python -m accelerate.commands.launch`: with several processes the
torch launcher raises ChildFailedError with a long traceback after the worker has already printed
`distill: error: ...`, and one process's failure becomes accelerate's CalledProcessError; here both
become a plain exit with the worker's own exit code (2 for a refused input).
"""

import subprocess
import sys

from accelerate.commands.launch import launch_command, launch_command_parser
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


def main() -> int:
    args = launch_command_parser().parse_args(sys.argv[1:])
    args.quiet = False  # quiet turns the worker's exit code into 1; the error below keeps it instead
    try:
        launch_command(args)
    except subprocess.CalledProcessError as failure:  # one process: it printed its own one-line error
        return exit_code(failure.returncode)
    except ChildFailedError as failure:
        codes = sorted({error.exitcode for error in failure.failures.values()})
        print(f"launch: {len(failure.failures)} process(es) failed with exit code {codes}", file=sys.stderr)
        _, first = failure.get_first_failure()
        return exit_code(first.exitcode)
    return 0


def exit_code(code: int) -> int:
    """A worker's exit code as a shell reports it: killed by signal N is 128 + N, never 0."""
    return 128 - code if code < 0 else code or 1


if __name__ == "__main__":
    sys.exit(main())
