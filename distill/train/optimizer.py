"""The distill stage's optimizer: AdamW, with its two moment averages in fp32 (torch's fused AdamW)
or in bf16 (`train.optimizer_state`).

Per trained fp32 weight, AdamW holds the weight (4 bytes), its gradient (4) and two moments (8): 16
bytes, which is what stops a 1B student from training on a 24 GiB machine. bf16 moments make it 12.
The update itself is computed in fp32 from the stored moments, as torch's AdamW computes it; only the
stored averages are rounded (to nearest, so a resumed run repeats an uninterrupted one bit for bit).
With beta2 = 0.95 an average moves by at least 5% of the new value each step, well above bf16's
0.4% resolution. Sharded (FSDP2) weights and their moments are DTensors with the same placement;
each step works on the local shards, so nothing is gathered.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch.distributed.tensor import DTensor

from distill.config import OptimizerState


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class AdamWBf16Moments(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) whose moment averages are stored in
    bf16. One slice of at most `SLICE` entries at a time, so the fp32 temporaries (three of them) are
    a slice's, not the model's or its largest tensor's (a 1B model's embedding would take 1.2 GB);
    every operation is elementwise, so slicing changes no result."""

    MOMENTS = ("exp_avg", "exp_avg_sq")
    SLICE = 1 << 22  # 16 MB per fp32 temporary

    def __init__(self, params, lr: float, betas: tuple[float, float], weight_decay: float, eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "eps": eps})

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's Optimizer casts every loaded floating-point state to its parameter's dtype, which
        would turn the moments into fp32 (a resumed run then differs from an uninterrupted one, and
        holds twice the bytes for a moment): the moments are set aside while it loads the rest."""
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = dict(zip(saved_ids, chain.from_iterable(group["params"] for group in self.param_groups)))
        moments, rest = {}, {}
        for index, values in state_dict["state"].items():
            moments[index] = {key: value for key, value in values.items() if key in self.MOMENTS}
            rest[index] = {key: value for key, value in values.items() if key not in self.MOMENTS}
        super().load_state_dict({**state_dict, "state": rest})
        for index, values in moments.items():
            param = params[index]
            self.state[param].update({key: value.to(device=param.device) for key, value in values.items()})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.bfloat16)
                state["step"] += 1
                step = state["step"].item()
                # flat views of the local tensors (view, not reshape: an update must land in place)
                flat = [_local(tensor).view(-1) for tensor in (param, param.grad, state["exp_avg"], state["exp_avg_sq"])]
                for start in range(0, flat[0].numel(), self.SLICE):
                    weight, grad, exp_avg, exp_avg_sq = (tensor[start:start + self.SLICE] for tensor in flat)
                    grad = grad.float()
                    average = exp_avg.float().lerp_(grad, 1 - beta1)
                    square_average = exp_avg_sq.float().lerp_(grad.square(), 1 - beta2)
                    exp_avg.copy_(average)
                    exp_avg_sq.copy_(square_average)
                    if weight_decay:
                        weight.mul_(1 - lr * weight_decay)
                    denominator = square_average.div_(1 - beta2 ** step).sqrt_().add_(eps)
                    weight.addcdiv_(average, denominator, value=-lr / (1 - beta1 ** step))
        return None


def build_adamw(state: OptimizerState, groups: list[dict], lr: float, betas: tuple[float, float], weight_decay: float,
                device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `groups` with its moments stored as `state` says."""
    if state is OptimizerState.BF16:
        return AdamWBf16Moments(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay,
                             fused=device.type in ("cuda", "cpu"))  # one vectorized pass per step
