"""Inference speed and memory of models on the machine at hand, measured in one process: decode and
prefill tokens/s at batch 1, and the bytes the models' tensors hold.

Models are timed interleaved (A B A B ..., after one untimed warm-up round), so a machine that slows
down or speeds up while it measures (turbo, a neighbour's load, a cache warming) moves every model
alike, and each number is the median over the rounds. What comes out is a measurement on this
machine, with its CPU (or device), threads and dtype recorded beside it, not a promise for another.
"""

from __future__ import annotations

import inspect
import statistics
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from distill.precision import cpu_model
from distill.targets import decoder_layers, linear_types

DECODE_PROMPT_TOKENS = 16  # the prompt decode starts from


def measure_speed(models: dict[str, nn.Module], prompt: torch.Tensor, new_tokens: int = 16, prefill_tokens: int = 256,
                  repeats: int = 3, baseline: str = "teacher") -> dict:
    """Decode and prefill tokens/s (batch 1, medians over `repeats` interleaved rounds) and tensor
    bytes of each model, and every other model's ratios to `baseline`'s.

    `prompt` is a token sequence ([T] or [1, T]): decode greedily extends its first 16 tokens by
    `new_tokens`; prefill is one forward over its first `prefill_tokens` (at most T). The defaults
    keep the whole measurement of two 135M-parameter models well under half a minute on 2 CPU cores
    (measured on an AMD EPYC with one thread: 6 s of CPU time in bf16, 13 s in fp32; twice the
    tokens, prefill positions and rounds would take about three times that)."""
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models {list(models)}")
    if new_tokens < 2 or repeats < 1 or prefill_tokens < 1:
        raise ValueError(f"need new_tokens >= 2, prefill_tokens >= 1 and repeats >= 1, not {new_tokens}, "
                         f"{prefill_tokens}, {repeats}")
    ids = prompt.reshape(1, -1).long()
    decode_ids, prefill_ids = ids[:, :DECODE_PROMPT_TOKENS], ids[:, :prefill_tokens]
    decode: dict[str, list[float]] = {name: [] for name in models}
    prefill: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for round_ in range(repeats + 1):  # round 0 warms up (allocator, kernels, caches) and is not kept
            for name, model in models.items():
                decode_rate, prefill_rate = _time_once(model, decode_ids, prefill_ids, new_tokens)
                if round_:
                    decode[name].append(decode_rate)
                    prefill[name].append(prefill_rate)
    reference = models[baseline]
    result = {
        "device": str(_device(reference)), "cpu": cpu_model(), "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(_device(reference)) if _device(reference).type == "cuda" else "",
        "dtype": str(_dtype(reference)).removeprefix("torch."), "repeats": repeats,
        "decode_prompt_tokens": int(decode_ids.shape[1]), "new_tokens": new_tokens,
        "prefill_tokens": int(prefill_ids.shape[1]), "baseline": baseline, "models": {},
    }
    for name, model in models.items():
        held = tensor_bytes(model)
        result["models"][name] = {"decode_tokens_per_s": statistics.median(decode[name]),
                                  "prefill_tokens_per_s": statistics.median(prefill[name]),
                                  "bytes_total": held["total"], "bytes_projections": held["projections"]}
    base = result["models"][baseline]
    result["ratios"] = {
        name: {"decode": row["decode_tokens_per_s"] / base["decode_tokens_per_s"],
               "prefill": row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"],
               "bytes_total": row["bytes_total"] / base["bytes_total"] if base["bytes_total"] else None,
               "bytes_projections": (row["bytes_projections"] / base["bytes_projections"]
                                     if base["bytes_projections"] else None)}
        for name, row in result["models"].items() if name != baseline}
    result["process_rss_bytes"] = process_rss_bytes()  # every model the process holds, not one of them
    return result


def _time_once(model: nn.Module, decode_ids: torch.Tensor, prefill_ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(decode tokens/s, prefill tokens/s) of one round of `model`.

    Decode is one greedy `generate` of `new_tokens` tokens, with a timestamp as each token comes out:
    the first token's includes the prompt's prefill, so the rate is the new_tokens - 1 steps between
    the first and the last. `generate` decodes the way users do, with the cache the model sets up for
    itself (a bounded one for streaming heads, where the model asks for it) and its per-token work; a
    sum of measured steps, unlike the difference of two runs, stays positive on a noisy machine."""
    device = _device(model)
    decode_ids, prefill_ids = decode_ids.to(device), prefill_ids.to(device)
    stamps = _TokenTimes(device)
    _generate(model, decode_ids, new_tokens, stamps)
    # logits of the last position only, as generate's prefill asks for them
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    prefill = _timed(device, lambda: model(input_ids=prefill_ids, use_cache=True, **last_only))
    return (new_tokens - 1) / (stamps.times[-1] - stamps.times[0]), prefill_ids.shape[1] / prefill


class _TokenTimes(StoppingCriteria):
    """Never stops generation; records the time at which each new token is there."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate(model: nn.Module, ids: torch.Tensor, tokens: int, stamps: _TokenTimes) -> None:
    settings = model.generation_config
    pad = settings.pad_token_id if settings.pad_token_id is not None else settings.eos_token_id
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None,
                         pad_token_id=pad if pad is not None else 0, stopping_criteria=StoppingCriteriaList([stamps]))
    if out.shape[1] != ids.shape[1] + tokens or len(stamps.times) != tokens:
        raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens ({len(stamps.times)} timed), "
                           f"not {tokens}")


def _timed(device: torch.device, call) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def tensor_bytes(model: nn.Module) -> dict[str, int]:
    """{"total": bytes of the model's tensors, "projections": bytes of its decoder projections}.

    Every storage is counted once (tied or shared tensors by their storage's address). A module with a
    `resident_bytes()` method (a compressed projection) is counted by it, not by its tensors, in both.
    Projections are the linear layers inside the decoder layers and the modules with
    `resident_bytes()` there; the embedding and the output head are not among them."""
    seen: set[tuple[str, int]] = set()
    resident = [module for module in model.modules() if _has_resident_bytes(module)]
    inside_resident = {id(tensor) for module in resident for tensor in _tensors(module)}
    total = sum(int(module.resident_bytes()) for module in resident)
    total += sum(_storage_bytes(tensor, seen) for tensor in _tensors(model) if id(tensor) not in inside_resident)
    return {"total": total, "projections": _projection_bytes(model)}


def _projection_bytes(model: nn.Module) -> int:
    outside = {id(module) for getter in ("get_input_embeddings", "get_output_embeddings")
               for module in [getattr(model, getter, lambda: None)()] if module is not None}
    seen: set[tuple[str, int]] = set()
    total = 0
    found = decoder_layers(model)
    for layer in found[1] if found else [model]:
        stack = [layer]
        while stack:  # a projection's own children (its mask, its input threshold) are its bytes
            module = stack.pop()
            if id(module) in outside:
                continue
            if _has_resident_bytes(module):
                total += int(module.resident_bytes())
            elif isinstance(module, linear_types()):
                total += sum(_storage_bytes(tensor, seen) for tensor in _tensors(module))
            else:
                stack.extend(module.children())
    return total


def _has_resident_bytes(module: nn.Module) -> bool:
    return callable(getattr(module, "resident_bytes", None))


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    for _, tensor in module.named_parameters(remove_duplicate=False):
        yield tensor
    for _, tensor in module.named_buffers(remove_duplicate=False):
        yield tensor


def _storage_bytes(tensor: torch.Tensor, seen: set[tuple[str, int]]) -> int:
    """The bytes of `tensor`'s storage, or 0 when that storage was counted already (or holds none)."""
    storage = tensor.untyped_storage()
    key = (str(tensor.device), storage.data_ptr())
    if storage.data_ptr() == 0 or key in seen:
        return 0
    seen.add(key)
    return storage.nbytes()


def process_rss_bytes() -> int | None:
    """This process's resident set size (VmRSS of /proc/self/status) in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                value, unit = line.split()[1:3]
                return int(value) * {"kB": 1024, "mB": 2**20, "gB": 2**30}.get(unit, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None
