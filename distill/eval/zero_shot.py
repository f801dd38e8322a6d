"""Zero-shot accuracy with lm-evaluation-harness, on models already in memory: each model is wrapped
in lm-eval's HFLM as it is (no re-loading by path, no second copy), so the student is scored with
whatever runs in its forward (input thresholds, streaming heads).

lm-eval is the optional extra `eval` (`pip install -e '.[eval]'`); the config refuses
`eval.lm_eval.tasks` without it. Registry tasks (boolq, rte, hellaswag, winogrande, arc_easy,
arc_challenge, openbookqa) download their datasets from the hub; `eval.lm_eval.include_path` adds
local task YAMLs, such as configs/lm_eval/wikitext_cloze.yaml, which runs offline.
"""

from __future__ import annotations

from torch import nn

from distill.config import LmEvalConfig
from distill.errors import DistillError

# metrics reported per task when lm-eval computes them (multiple choice: acc, and acc_norm where the
# task normalizes by length)
METRICS = ("acc", "acc_norm")


def zero_shot_accuracy(models: dict[str, nn.Module], tokenizer, config: LmEvalConfig) -> dict[str, dict[str, dict]]:
    """{model name: {task: {metric: value, metric_stderr: value}}} for every task of `config`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(config)
    results = {}
    for name, model in models.items():
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
        output = simple_evaluate(model=wrapped, tasks=list(config.tasks), task_manager=manager,
                                 limit=config.limit or None, log_samples=False, random_seed=0, numpy_random_seed=0,
                                 torch_random_seed=0, fewshot_random_seed=0)
        results[name] = {task: _metrics(scores) for task, scores in output["results"].items()}
    return results


def task_manager(config: LmEvalConfig):
    """lm-eval's task index. Indexing lm-eval's own few thousand task YAMLs takes seconds, so when
    every configured task is in `include_path` only that dir is indexed."""
    from lm_eval.tasks import TaskManager

    if config.include_path:
        local = TaskManager(include_path=config.include_path, include_defaults=False)
        if set(config.tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=config.include_path)


def check_tasks(config: LmEvalConfig) -> None:
    """Refuse a task name lm-eval does not know (registry, include_path, groups and tags included) at
    the start of a launch: lm-eval itself would raise a KeyError in the evaluate stage, after training."""
    if not config.tasks:
        return
    known = set(task_manager(config).all_tasks)
    unknown = [task for task in config.tasks if task not in known]
    if unknown:
        searched = (f"in neither lm-eval's registry nor {config.include_path}" if config.include_path
                    else "not in lm-eval's registry")
        raise DistillError(f"config key 'eval.lm_eval.tasks': unknown lm-eval task '{unknown[0]}' ({searched}); "
                           "`lm-eval ls tasks` lists the registry's tasks, and eval.lm_eval.include_path names a dir "
                           "of local task YAMLs")


def _metrics(scores: dict) -> dict:
    """lm-eval's "acc,none" / "acc_stderr,none" as acc / acc_stderr."""
    found = {}
    for metric in METRICS:
        if f"{metric},none" in scores:
            found[metric] = float(scores[f"{metric},none"])
            stderr = scores.get(f"{metric}_stderr,none")
            found[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
    found["samples"] = scores.get("sample_len")
    return found
