"""How each stage's cost grows with the model and the corpus: seconds per 1,000 tokens and peak resident
memory per process, for Llama-shaped random models of about 135M, 360M and 1B parameters (the demo's
vocabulary and tokenizer) and the demo teacher, on one process and on two (gloo ranks, the student
sharded by FSDP2); a fit of cost against parameters per stage; and the hours an 8B teacher would take
on 8 H200s at a stated MFU.

    python benchmarks/scale.py --models demo 135M 360M 1B --out benchmarks/scale.json   # hours on 2 cores
    python benchmarks/scale.py --models 135M --corpus-growth 8                            # memory vs corpus
    python benchmarks/scale.py --smoke           # a tiny model, the whole pipeline in one launch, seconds

Every stage runs as the user runs it: `launch.sh CONFIG --only STAGE` (a process per stage, so each
stage's peak memory is its own), with the run's manifests read for seconds and per-rank peak RSS, and
distill's logged tokens/s for the step time (the first logged window, which compiles, left out).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from pipeline_runs import write_results  # noqa: E402

WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
MARKERS = ("<!-- scale:start -->", "<!-- scale:end -->")
# Llama shapes with the demo's 49,152-token vocabulary and tied embeddings: SmolLM2-135M's and -360M's,
# and Llama-3.2-1B's layers
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
    "360M": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5),
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
}
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
STAGES = ("teacher", "teacher_logits", "prune:sparsegpt", "prune", "distill", "export", "evaluate")
CALIBRATION_BLOCKS = 8
H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H200 (the datasheet's; the same as H100 SXM)


def build_teacher(name: str, directory: Path) -> Path:
    """A random Llama of shape `name` with the demo's tokenizer, saved as a model dir (the demo teacher
    itself for "demo")."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distill.models import fetch_demo_teacher

    demo = fetch_demo_teacher()
    if name == "demo":
        return demo
    path = directory / f"teacher-{name}"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, **SHAPES[name])
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(demo).save_pretrained(path)
    return path


def write_config(path: Path, teacher: Path, output_dir: Path, blocks: int, block_size: int, steps: int,
                 checkpoint_every: int) -> Path:
    import yaml

    config = {
        "run": {"name": "scale", "output_dir": str(output_dir), "precision": "fp32"},
        "teacher": {"source": str(teacher)},
        "data": {"block_size": block_size, "max_heldout_blocks": 8, "sources": [
            {"name": "wiki", "kind": "files", "files": [str(WIKITEXT / "valid.txt")], "heldout_fraction": 0.02,
             "max_blocks": blocks}]},
        "calibration": {"num_blocks": CALIBRATION_BLOCKS, "batch_size": 4},
        "prune": {"criterion": "wanda"},
        "train": {"steps": steps, "global_batch_size": 4, "micro_batch_size": 2, "log_every": 1, "eval_every": 0,
                  "checkpoint_every": checkpoint_every, "loss": {"teacher_topk": 64}},
        "speed": {"activation_checkpointing": True},
        "eval": {"max_blocks": 4, "batch_size": 4, "activation_levels": []},
        "tracking": {"backend": "none"},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def launch(config: Path, processes: int, stage: str | None, overrides: list[str]) -> None:
    """launch.sh on `config`: `stage` alone, or (None) the whole pipeline."""
    command = ["bash", str(REPO / "launch.sh"), "--num-processes", str(processes), str(config), *overrides,
               *(["--only", stage] if stage else [])]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def measure(config: Path, run_dir: Path, processes: int, stages: tuple[str, ...] = STAGES, stage_by_stage: bool = True,
            settings: tuple[str, ...] = ()) -> dict:
    """{stage: {"seconds", "tokens", "s_per_1k_tokens", "peak_rss_mb": [per rank]}} of one run: a launch
    per stage of `stages` (each stage's own peak memory), or one launch of the whole pipeline (the peaks
    so far; no SparseGPT row). `settings`: config overrides (KEY=VALUE) for every launch."""
    overrides = [*settings, *(["train.sharding=fsdp"] if processes > 1 else [])]
    if not stage_by_stage:
        launch(config, processes, None, overrides)
    rows = {}
    for entry in stages if stage_by_stage else [entry for entry in STAGES if ":" not in entry]:
        stage, _, criterion = entry.partition(":")
        if stage_by_stage:
            launch(config, processes, stage, overrides + ([f"prune.criterion={criterion}"] if criterion else []))
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        rows[entry] = {"seconds": manifest["seconds"], "peak_rss_mb": manifest["peak_rss_mb"],
                       "tokens": stage_tokens(stage, run_dir)}
        if stage == "distill":
            speeds = [row["tokens_per_s"] for row in map(json.loads, (run_dir / "distill" / "metrics.jsonl").read_text().splitlines())
                      if "tokens_per_s" in row][1:]
            rows[entry]["s_per_1k_tokens"] = 1000 / (sum(speeds) / len(speeds))
        elif rows[entry]["tokens"]:
            rows[entry]["s_per_1k_tokens"] = 1000 * rows[entry]["seconds"] / rows[entry]["tokens"]
    return rows


def stage_tokens(stage: str, run_dir: Path) -> int:
    """The tokens a stage processes: the corpus (teacher), the training blocks (teacher_logits), the
    calibration blocks (prune), the trained tokens (distill), the scored tokens (evaluate: three models)."""
    layout = json.loads((run_dir / "teacher" / "blocks" / "blocks.json").read_text())
    block = layout["block_size"]
    train = sum(source["train"] for source in layout["sources"]) * block
    heldout = sum(source["heldout"] for source in layout["sources"]) * block
    calibration = min(CALIBRATION_BLOCKS * block, train)
    return {"teacher": sum(source["tokens"] for source in layout["sources"]), "teacher_logits": train,
            "prune": calibration, "distill": train, "export": 0, "evaluate": 3 * heldout}[stage]


def fit_exponent(sizes: list[float], costs: list[float]) -> float:
    """a in cost = c * size^a, least squares in log-log."""
    x, y = torch.tensor(sizes).log(), torch.tensor(costs).log()
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def parameters(teacher: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(teacher))
    return sum(p.numel() for p in model.parameters())


def prediction_8b(mfu: float, context: int) -> dict:
    """Hours for an 8B teacher and student on 8 H200s at `mfu`: the cache pass (teacher forward once)
    and the distill steps (student forward and backward, the teacher from the cache), from distill's
    own FLOP count per token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.train.throughput import flops_per_token

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_8B))
    step = flops_per_token(model, None, context)
    cache = flops_per_token(model, model, context) - step
    rate = 8 * H200_BF16_PEAK * mfu
    return {"flops_per_token_distill": step, "flops_per_token_cache": cache, "mfu": mfu, "context": context,
            **{f"hours_{tokens:.0e}": tokens * (step + cache) / rate / 3600 for tokens in (1e9, 1e10)}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "135M", "360M", "1B"], choices=["demo", *SHAPES])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--blocks", type=int, default=24, help="training corpus, in blocks")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="distill's checkpoint interval (default: one checkpoint, at the last step; past --steps: none)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                        help="the stages to measure, in pipeline order (each needs the ones before it)")
    parser.add_argument("--corpus-growth", type=int, default=0, help="also run the first model on this many times the corpus")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="settings",
                        help="config overrides for every launch, e.g. train.optimizer_state=bf16")
    parser.add_argument("--mfu", type=float, default=0.4, help="the MFU the 8B prediction assumes")
    parser.add_argument("--work", type=Path, default=None, help="where models and runs go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--write-results", action="store_true", help="put the table into benchmarks/RESULTS.md")
    parser.add_argument("--smoke", action="store_true", help="the tiny model on one process, 2 steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.processes, args.blocks, args.block_size, args.steps = ["tiny"], [1], 12, 32, 2

    work = args.work or Path(tempfile.mkdtemp(prefix="distill-scale-"))
    results = {"cpu": platform.processor() or platform.machine(), "runs": []}
    plan = [(name, processes, args.blocks) for name in args.models for processes in args.processes]
    if args.corpus_growth:
        plan.append((args.models[0], 1, args.blocks * args.corpus_growth))
    for name, processes, blocks in plan:
        teacher = build_teacher(name, work)
        label = f"{name}-p{processes}-b{blocks}"
        config = write_config(work / f"{label}.yaml", teacher, work / "runs" / label, blocks, args.block_size, args.steps,
                              args.checkpoint_every or args.steps)
        stages = measure(config, work / "runs" / label / "scale", processes, tuple(args.stages), stage_by_stage=not args.smoke,
                         settings=tuple(args.settings))
        results["runs"].append({"model": name, "parameters": parameters(teacher), "processes": processes,
                                "blocks": blocks, "settings": args.settings, "stages": stages})
        print(json.dumps(results["runs"][-1]), flush=True)

    one = [run for run in results["runs"] if run["processes"] == 1 and run["blocks"] == args.blocks and run["model"] != "demo"]
    if len(one) >= 2:
        results["exponents"] = {stage: fit_exponent([run["parameters"] for run in one],
                                                    [run["stages"][stage]["s_per_1k_tokens"] for run in one])
                                for stage in STAGES if all("s_per_1k_tokens" in run["stages"].get(stage, {}) for run in one)}
    if args.corpus_growth:
        base, grown = (next(run for run in results["runs"] if run["model"] == args.models[0] and run["processes"] == 1
                            and run["blocks"] == blocks) for blocks in (args.blocks, args.blocks * args.corpus_growth))
        results["rss_growth"] = {"corpus_growth": args.corpus_growth, **{
            stage: max(grown["stages"][stage]["peak_rss_mb"]) / max(base["stages"][stage]["peak_rss_mb"])
            for stage in base["stages"]}}
    results["prediction_8b"] = prediction_8b(args.mfu, 4096)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    if args.write_results:
        write_results(MARKERS, table(results))
    return 0


def table(results: dict) -> str:
    lines = ["| model | parameters | processes | corpus blocks | " + " | ".join(STAGES) + " |",
             "|---|---|---|---|" + "---|" * len(STAGES)]
    for run in results["runs"]:
        cells = []
        for stage in STAGES:
            row = run["stages"].get(stage)
            if row is None:
                cells.append("-")
                continue
            speed = f"{row['s_per_1k_tokens']:.2f} s" if "s_per_1k_tokens" in row else f"{row['seconds']:.1f} s total"
            cells.append(f"{speed}, {max(row['peak_rss_mb']):.0f} MB")
        processes = f"{run['processes']}{' (FSDP2)' if run['processes'] > 1 else ''}" + "".join(
            f", {setting}" for setting in run.get("settings", []))
        lines.append(f"| {run['model']} | {run['parameters'] / 1e6:.0f}M | {processes} | {run['blocks']} | " + " | ".join(cells) + " |")
    prediction = results["prediction_8b"]
    lines += ["", f"8B teacher and student (Llama-3.1-8B shape) on 8 H200s at {prediction['mfu']:.0%} MFU, context "
              f"{prediction['context']}: {prediction['flops_per_token_distill'] / 1e9:.1f} GFLOP per trained token "
              f"+ {prediction['flops_per_token_cache'] / 1e9:.1f} for the teacher cache: "
              f"{prediction['hours_1e+09']:.1f} h for 10^9 tokens, {prediction['hours_1e+10']:.0f} h for 10^10"]
    if "rss_growth" in results:
        growth = dict(results["rss_growth"])
        times = growth.pop("corpus_growth")
        lines += ["", f"Peak RSS with {times}x the corpus, against 1x (one process): " +
                  ", ".join(f"{stage} {ratio:.2f}x" for stage, ratio in growth.items())]
    if "exponents" in results:
        lines.append("")
        lines.append("Fitted a (seconds per 1k tokens ∝ parameters^a, one process): " +
                     ", ".join(f"{stage} {a:.2f}" for stage, a in results["exponents"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
