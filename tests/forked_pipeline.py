"""`python pipelines/run.py ARGS` inside a process forked from a server that has imported torch,
transformers and distill already (conftest.ForkedRun), which saves each run the seconds those
imports take. Run by runpy with PARAMETERS in its globals: the script to run, its arguments, the
environment, and the files that take its stdout and stderr. The child is then what a fresh `python
script ...` would be, except that the modules are imported already: its exit code is the script's,
an uncaught exception prints its traceback and exits 1, and atexit handlers run."""

import atexit
import io
import os
import runpy
import sys
import traceback


def run(script: str, argv: list[str], environ: dict[str, str], stdout: str, stderr: str) -> None:
    os.environ.clear()
    os.environ.update(environ)
    if environ.get("OMP_NUM_THREADS"):  # a fresh interpreter's torch reads it as it starts; this one has started
        import torch

        torch.set_num_threads(int(environ["OMP_NUM_THREADS"]))
    for fd, path in ((1, stdout), (2, stderr)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(file, fd)
        os.close(file)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", line_buffering=True)
    sys.argv = [script, *argv]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:  # as the interpreter reads it: None is 0, a message is printed and is 1
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


run(**globals()["PARAMETERS"])  # given by runpy.run_path's init_globals
