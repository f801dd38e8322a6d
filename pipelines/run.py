"""Run the distill pipeline: teacher -> prune -> distill -> export -> evaluate.

    accelerate launch --config_file configs/accelerate/cpu.yaml pipelines/run.py configs/demo.yaml [key=value ...]

Finished stages whose inputs did not change are skipped; an interrupted stage resumes from its last
checkpoint. `--only STAGE` re-runs one stage, `--from STAGE` re-runs it and everything after it
(both drop that stage's unfinished run first), `--discard-partial STAGE` drops one stage's unfinished
run and goes on as usual, `--restart` deletes the run dir and starts over. `--check-config` checks
the config and its input files only, without loading torch (launch.sh runs it before it launches).
`--verbose` keeps the libraries' warnings about what distill does on purpose (distill.run.console).
"""

import argparse
import os
import signal
import sys

# only light imports here: a mistake in the config is reported before torch, transformers and
# accelerate load (seconds on a busy machine)
from distill.data.files import check_input_paths
from distill.errors import DistillError, describe_os_error, report_refusal
from distill.run.config_file import load_config
from distill.run.console import quiet_expected_warnings

REFUSED = 2  # the exit code of a refused input


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that a bad command line is one `distill: error:` line like any other refusal,
    not the usage text followed by an error."""

    def error(self, message: str):
        sys.exit(refuse(message))


def parse_args(argv):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.steps=50")
    parser.add_argument("--only", metavar="STAGE", help="run (or re-run) this stage alone")
    parser.add_argument("--from", dest="start_from", metavar="STAGE", help="re-run this stage and every later one")
    parser.add_argument("--discard-partial", metavar="STAGE", action="append", default=[],
                        help="drop this stage's unfinished run (its .partial dir), keeping every finished stage")
    parser.add_argument("--restart", action="store_true", help="delete the run dir and start over")
    parser.add_argument("--verbose", action="store_true",
                        help="show every library's warnings too (by default those about what distill does on purpose are dropped)")
    parser.add_argument("--check-config", action="store_true",
                        help="check the config and its input files, run nothing (torch is not loaded)")
    return parser.parse_intermixed_args(argv)  # overrides may follow --only and friends


def die_with_launcher() -> None:
    """Under `accelerate launch`, end this process when the launcher dies (even by SIGKILL), so a
    killed run leaves no orphan still writing into the run dir when it is started again."""
    launched = "LOCAL_RANK" in os.environ or any(key.startswith("ACCELERATE_") for key in os.environ)
    if sys.platform.startswith("linux") and launched:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def refuse(message: str) -> int:
    report_refusal(f"distill: error: {message}")
    return REFUSED


def check_config(args) -> int:
    """The config's refusals, in a fraction of a second: nothing here imports torch."""
    try:
        check_input_paths(load_config(args.config, args.overrides))
    except DistillError as error:
        return refuse(str(error))
    except OSError as error:
        return refuse(describe_os_error(error))
    return 0


def main(argv=None) -> int:
    die_with_launcher()
    args = parse_args(argv)
    if args.check_config:
        return check_config(args)
    if not args.verbose:
        quiet_expected_warnings()
    config = None
    try:
        config = load_config(args.config, args.overrides)
        check_input_paths(config)
        from distill.eval.zero_shot import check_tasks

        check_tasks(config.eval.lm_eval)  # before any stage, not when evaluate starts after training
        from accelerate.utils import set_seed

        from distill.run.accelerator import build_accelerator
        from distill.run.pipeline import Pipeline
        from distill.stages import STAGES

        accelerator, precision = build_accelerator(config)
        accelerator.print(f"distill: {precision.describe()}", flush=True)
        set_seed(config.run.seed)
        pipeline = Pipeline(config, accelerator, STAGES, discard=tuple(args.discard_partial))
        pipeline.run(only=args.only, start_from=args.start_from, restart=args.restart)
        accelerator.end_training()
    except DistillError as error:
        return refuse(str(error))
    except OSError as error:  # the filesystem said no: one line naming the file, not a traceback
        return refuse(describe_os_error(error))
    except Exception as error:  # a writer that reports a full disk in its own words (torch, safetensors)
        from distill.io import write_failure
        from distill.run.accelerator import lost_peer

        peer = lost_peer(error)  # another rank (or machine) stopped: one line, not a traceback per rank
        if peer is not None:
            return refuse(peer)

        failure = write_failure(error, config.run_dir) if config is not None else error
        if failure is error:
            raise
        return refuse(describe_os_error(failure))
    return 0


if __name__ == "__main__":
    sys.exit(main())
