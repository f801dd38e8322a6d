"""The Accelerator every stage runs under: process group, device, precision and trackers, from the
config alone (the accelerate config file chooses processes and machines, never the precision)."""

from __future__ import annotations

from datetime import timedelta

from accelerate import Accelerator, PartialState
from accelerate.utils import (DistributedDataParallelKwargs, DistributedType, ProjectConfiguration, gather_object,
                              parse_flag_from_env)

from distill.config import Config, Sharding
from distill.errors import DistillError
from distill.precision import PrecisionChoice, choose_precision
from distill.run.tracking import log_with, logs_dir


def build_accelerator(config: Config) -> tuple[Accelerator, PrecisionChoice]:
    """The run's Accelerator and the precision it computes in, the same on every process."""
    # the process group first: the precision depends on the device each process gets
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"),
                         timeout=timedelta(minutes=config.run.collective_timeout_minutes))
    choice = choose_precision(config.run.precision, state.device)
    everyone = sorted(set(gather_object([choice.precision.value]))) if state.num_processes > 1 else [choice.precision.value]
    if len(everyone) > 1:
        raise DistillError(f"processes chose different precisions ({', '.join(everyone)}): their hardware differs; "
                           f"set run.precision to one of them")
    accelerator = Accelerator(
        mixed_precision=choice.mixed_precision,
        log_with=log_with(config),
        project_config=ProjectConfiguration(project_dir=str(config.run_dir), logging_dir=str(logs_dir(config))),
        # masks are identical on every rank: no need to broadcast buffers each forward
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    if config.train.sharding is Sharding.FSDP and accelerator.num_processes < 2:
        raise DistillError("config key 'train.sharding': fsdp shards over processes; launch at least 2 "
                           "(launch.sh --num-processes N)")
    if accelerator.distributed_type == DistributedType.FSDP:
        raise DistillError("accelerate's FSDP plugin is not used: launch plain processes and set "
                           "train.sharding=fsdp (bash launch.sh --accelerate fsdp does both)")
    return accelerator, choice


# what the collective backends say when a process of the group is gone (gloo: its TCP pair closed;
# NCCL: the communicator aborted): the other processes stop at their next collective
PEER_LOST_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
                   "communicator was aborted", "Socket Timeout", "Connection refused")


def lost_peer(error: BaseException) -> str | None:
    """One line for a collective that failed because another process of the run stopped (killed, or
    its machine lost), or None when `error` is something else."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    text = str(error)
    if not (isinstance(error, dist.DistError) or "gloo" in text or "NCCL" in text):
        return None  # a lost connection of something else (a hub download) is not a lost peer
    sign = next((sign for sign in PEER_LOST_SIGNS if sign in text), None)
    if sign is None:
        return None
    said = text[text.index(sign):].split(". ")[0].splitlines()[0]  # "Connection closed by peer [host]:port"
    return (f"process {dist.get_rank()} of {dist.get_world_size()} lost contact with the others ({said[:160]}): a "
            "process of this run stopped, on this machine or another; the finished stages and the last checkpoint "
            "are kept, so start every launch again to resume")
