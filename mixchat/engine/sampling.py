"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def flag_name(field: str) -> str:
    """How a sampling field is named to the user when it came from the command line."""
    return "--" + field.replace("_", "-")


MAX_DRAFT = 7  # a verify pass is the chosen token and at most 7 drafted ones (speed.decoder.MAX_ROWS)

# field -> (whole number?, the test a value must pass, the rule in words). Every bound keeps the
# arithmetic finite: a temperature of 1e-40 or a penalty of 1e-300 turns logits into infinities,
# and the softmax of those into NaN.
RULES: dict[str, tuple[bool, Callable[[float], bool], str]] = {
    "temperature": (False, lambda v: v == 0 or 1e-3 <= v <= 100, "must be 0 (greedy) or between 0.001 and 100"),
    "top_p": (False, lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "top_k": (True, lambda v: v >= 0, "must be 0 (off) or more"),
    "repeat_penalty": (False, lambda v: 0.01 <= v <= 100, "must be between 0.01 and 100 (1 is off)"),
    "repeat_last_n": (True, lambda v: v >= 0, "must be 0 or more"),
    "max_tokens": (True, lambda v: 1 <= v <= 1 << 24, "must be at least 1"),
    "seed": (True, lambda v: 0 <= v < 1 << 64, "must be a whole number from 0 to 2^64 - 1"),
    "draft": (True, lambda v: 0 <= v <= MAX_DRAFT, "must be from 0 (off) to 7"),
}


@dataclass
class SamplingSettings:
    """Defaults follow Mistral's reference and llama.cpp (temperature 0.7, no repetition penalty:
    with a penalty, temperature 0 is no longer the model's greedy output); temperature 0 means greedy."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    repeat_penalty: float = 1.0  # 1.0 = off; applied to the last `repeat_last_n` tokens
    repeat_last_n: int = 64
    max_tokens: int = 512
    seed: int | None = None
    draft: int = MAX_DRAFT  # tokens guessed ahead from the conversation per pass (mixchat.engine.drafting); 0 = off

    def check(self, name: Callable[[str], str] = flag_name) -> None:
        """Refuse values the sampler cannot use. `name(field)` says where a value came from in the
        message (a flag by default; params.json's recommendation or the settings file otherwise)."""
        from mixchat.errors import MixchatError

        for field, (whole, ok, rule) in RULES.items():
            value = getattr(self, field)
            if field == "seed" and value is None:
                continue
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
                kind = "a whole number" if whole else "a number"
                raise MixchatError(f"{name(field)} {shown}: must be {kind}")
            if not whole and not math.isfinite(value):
                raise MixchatError(f"{name(field)} {shown}: must be a finite number")
            if not ok(value):
                raise MixchatError(f"{name(field)} {shown}: {rule}")


def apply_repeat_penalty(logits: torch.Tensor, recent: list[int], penalty: float) -> torch.Tensor:
    """CTRL's penalty as llama.cpp and transformers apply it: divide positive logits of recently
    seen tokens by the penalty, multiply negative ones, so either way they become less likely."""
    if penalty == 1.0 or not recent:
        return logits
    ids = torch.tensor(sorted(set(recent)), device=logits.device)
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def _penalised(logits: torch.Tensor, settings: SamplingSettings, history: list[int]) -> torch.Tensor:
    recent = history[-settings.repeat_last_n :] if settings.repeat_last_n else []
    return apply_repeat_penalty(logits, recent, settings.repeat_penalty)


def distribution(logits: torch.Tensor, settings: SamplingSettings, history: list[int]) -> torch.Tensor | None:
    """The weights `sample` draws from ([vocab] fp32), after the penalty, temperature, top-k and
    top-p (not renormalised after top-p: torch.multinomial does not need it); None for greedy
    decoding (the argmax of the penalised logits is the token)."""
    if settings.temperature == 0:
        return None
    logits = _penalised(logits, settings, history) / settings.temperature
    if settings.top_k:
        kth = torch.topk(logits, min(settings.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        keep = (sorted_probs.cumsum(0) - sorted_probs) < settings.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return probs


def sample(logits: torch.Tensor, settings: SamplingSettings, history: list[int],
           generator: torch.Generator | None) -> int:
    """One token id from `logits` ([vocab], fp32)."""
    if settings.temperature == 0:
        return int(_penalised(logits, settings, history).argmax())
    return int(torch.multinomial(distribution(logits, settings, history), 1, generator=generator))
