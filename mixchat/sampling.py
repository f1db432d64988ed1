"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingSettings:
    """Defaults follow common practice for Mistral's instruct models (llama.cpp and Mistral's
    examples use temperature 0.7); temperature 0 means greedy."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    repeat_penalty: float = 1.1  # 1.0 = off; applied to the last `repeat_last_n` tokens
    repeat_last_n: int = 64
    max_tokens: int = 512
    seed: int | None = None

    def check(self) -> None:
        from mixchat.errors import MixchatError

        if self.temperature < 0:
            raise MixchatError(f"--temperature {self.temperature}: must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise MixchatError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise MixchatError(f"--top-k {self.top_k}: must be 0 (off) or more")
        if self.repeat_penalty <= 0:
            raise MixchatError(f"--repeat-penalty {self.repeat_penalty}: must be more than 0 (1 is off)")
        if self.max_tokens < 1:
            raise MixchatError(f"--max-tokens {self.max_tokens}: must be at least 1")


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


def sample(logits: torch.Tensor, settings: SamplingSettings, history: list[int],
           generator: torch.Generator | None) -> int:
    """One token id from `logits` ([vocab], fp32)."""
    logits = apply_repeat_penalty(logits, history[-settings.repeat_last_n :] if settings.repeat_last_n else [],
                                  settings.repeat_penalty)
    if settings.temperature == 0:
        return int(logits.argmax())
    logits = logits / settings.temperature
    if settings.top_k:
        kth = torch.topk(logits, min(settings.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        keep = (sorted_probs.cumsum(0) - sorted_probs) < settings.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
