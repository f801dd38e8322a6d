"""What every config section is built from, and the loss section.

A section is a dataclass that checks itself when it is built, in code (`ActivationsConfig(target=2.0)`)
or by OmegaConf from YAML: `Section.__post_init__` turns a choice written as its string into its
member, refuses non-finite floats, and runs the section's own rules (`check`). Each refusal is one
`DistillError` line naming the key by its dotted path in the whole config (`KEY`, the section's place
there, unless the caller gives another). Every choice is a `Choice`: YAML writes its value, the code
compares members.

The loss section lives here rather than beside distill/losses.py, which loads torch: the config is
checked before torch loads.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import typing
from dataclasses import dataclass
from typing import Any

from distill.errors import DistillError


class Choice(str, enum.Enum):
    """A config choice: written in YAML as its value, printed as its value, compared by member."""

    def __str__(self) -> str:
        return self.value


class Section:
    """Mixed into a config dataclass: it checks itself when built. `KEY` is its dotted path in the
    Config; `check(where)` holds its own rules, naming keys under `where`."""

    KEY = ""

    def __post_init__(self) -> None:
        for name, kind in _choice_fields(type(self)).items():
            setattr(self, name, as_choice(f"{self.KEY}.{name}", kind, getattr(self, name)))
        self.validate(self.KEY)

    def validate(self, where: str) -> None:
        """Every float finite (nested sections included), then the section's own rules."""
        refuse_non_finite(self, where)
        self.check(where)

    def check(self, where: str) -> None:
        pass


@functools.lru_cache(maxsize=None)
def _choice_fields(section: type) -> dict[str, type]:
    hints = typing.get_type_hints(section)
    return {item.name: hints[item.name] for item in dataclasses.fields(section)
            if isinstance(hints[item.name], type) and issubclass(hints[item.name], Choice)}


def as_choice(path: str, kind: type[Choice], value: Any) -> Any:
    """`value` as a member of `kind` (a string written as its value is one); anything else refused."""
    if isinstance(value, kind) or value == "???":  # a member, or OmegaConf's MISSING (refused when built)
        return value
    try:
        return kind(value)
    except ValueError:
        raise DistillError(f"config key '{path}': '{value}' is not one of {', '.join(choice.value for choice in kind)}") from None


def positive(path: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise DistillError(f"config key '{path}': {value} must be {bound}")


def within(path: str, value: float, low: float, high: float, closed: str = "[]") -> None:
    """`value` in the interval from `low` to `high`, each end closed ('[' / ']') or open ('(' / ')')."""
    above = value >= low if closed[0] == "[" else value > low
    below = value <= high if closed[1] == "]" else value < high
    if not (above and below):
        raise DistillError(f"config key '{path}': {value} is not in {closed[0]}{low:g}, {high:g}{closed[1]}")


def refuse_non_finite(section: Any, where: str) -> None:
    """Every float of a config section (nested sections and lists included) is a finite number: YAML
    reads `.nan` and `.inf` as floats, and nan passes every range check, as no comparison holds for it."""
    for item in dataclasses.fields(section):
        value, path = getattr(section, item.name), f"{where}.{item.name}"
        if dataclasses.is_dataclass(value):
            refuse_non_finite(value, path)
        elif isinstance(value, list):
            for index, element in enumerate(value):
                if dataclasses.is_dataclass(element):
                    refuse_non_finite(element, f"{path}[{index}]")
                else:
                    _refuse_nan_or_inf(f"{path}[{index}]", element)
        else:
            _refuse_nan_or_inf(path, value)


def _refuse_nan_or_inf(path: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise DistillError(f"config key '{path}': {value} is not a finite number")


class Divergence(Choice):
    FORWARD_KL = "forward_kl"
    REVERSE_KL = "reverse_kl"
    JSD = "jsd"


class CacheCodec(Choice):
    """How the teacher's cached top-k is stored (distill.data.teacher_cache)."""

    COMPACT = "compact"  # ids as sorted gaps, 8-bit log-probabilities, the residual mass, xz: ~235 B/token at k=128
    EXACT = "exact"  # fp16 log-probabilities and int32 ids: 6 bytes per entry


@dataclass
class LossConfig(Section):
    """The distillation loss (distill.losses)."""

    KEY = "train.loss"

    divergence: Divergence = Divergence.FORWARD_KL  # to the teacher, at `temperature`
    temperature: float = 1.0  # softens teacher and student distributions alike
    jsd_beta: float = 0.5  # jsd: weight of the teacher in the mixture
    kd_weight: float = 1.0  # weight of the divergence, which is scaled by T^2
    lm_weight: float = 0.0  # next-token cross-entropy on the training text
    hidden_weight: float = 0.0  # normalized MSE between every decoder layer's output, student vs teacher
    # positions per chunk of the loss, computed with the output projections and recomputed in backward
    # so no batch-sized logits tensor exists; 0 computes full logits (needed for heads with extras
    # such as logit soft-capping)
    chunk_tokens: int = 1024
    # > 0: the teacher_logits stage caches the teacher's `teacher_topk` most likely tokens per training
    # position (all ranks share the work) and distill compares on those k tokens plus "any other",
    # without running the teacher; needs temperature 1 and no hidden-state matching
    teacher_topk: int = 0
    teacher_cache: CacheCodec = CacheCodec.COMPACT  # how that cache is stored
    teacher_cache_shard: int = 256  # training blocks per file of the cache (one is held in memory at a time)

    def check(self, where: str) -> None:
        within(f"{where}.jsd_beta", self.jsd_beta, 0.0, 1.0, "()")
        positive(f"{where}.chunk_tokens", self.chunk_tokens, allow_zero=True)
        positive(f"{where}.teacher_topk", self.teacher_topk, allow_zero=True)
        positive(f"{where}.teacher_cache_shard", self.teacher_cache_shard)
        if self.teacher_topk and self.temperature != 1.0:
            raise DistillError(f"config key '{where}.temperature': the cached teacher ({where}.teacher_topk) is "
                               f"stored at temperature 1, got {self.temperature}")
        if self.teacher_topk and self.hidden_weight:
            raise DistillError(f"config key '{where}.hidden_weight': hidden-state matching needs the live teacher; "
                               f"set {where}.teacher_topk=0")
        positive(f"{where}.temperature", self.temperature)
        for key in ("kd_weight", "lm_weight", "hidden_weight"):
            positive(f"{where}.{key}", getattr(self, key), allow_zero=True)
        if self.kd_weight == 0 and self.lm_weight == 0 and self.hidden_weight == 0:
            raise DistillError(f"config key '{where}': kd_weight, lm_weight and hidden_weight are all 0, nothing to train on")
