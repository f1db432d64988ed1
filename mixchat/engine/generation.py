"""Sessions: one conversation's token history and KV cache, and the streaming `generate`.

Front ends only iterate `Session.generate()`; it yields PrefillProgress while reading the prompt,
a TokenEvent per new token and one Done at the end. Cancellation is a threading.Event checked
before every token, so another thread (the TUI, a SIGINT handler) stops it within one token and
what was generated so far is kept, in the events and in the cache.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from mixchat.engine.engine import Engine
from mixchat.engine.sampling import SamplingSettings, sample
from mixchat.errors import ContextError, NonFiniteError
from mixchat.text.tokenizer import StreamDecoder


@dataclass
class PrefillProgress:
    done: int
    total: int


@dataclass
class TokenEvent:
    id: int
    text: str  # the text this token adds (may be "" while a multi-byte character is incomplete)
    experts: list[list[int]] | None  # per layer, the chosen expert ids, best first (MoE only)
    expert_weights: list[list[float]] | None
    elapsed: float  # seconds since generate() started


@dataclass
class Done:
    prompt_tokens: list[int]
    cached_tokens: int  # prompt tokens whose keys were already in the cache
    prefilled_tokens: int
    generated: list[int] = field(default_factory=list)
    text: str = ""
    stop: str = "eos"  # "eos" | "length" (--max-tokens) | "context" (the context is full) | "interrupted"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0
    timings: dict = field(default_factory=dict)  # the figures saved with the reply (filled by Chat)
    notes: list[str] = field(default_factory=list)  # things to tell the user (e.g. a cache not saved)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # Every generated token costs one single-token forward pass (it is fed to get its routing).
        return len(self.generated) / self.decode_seconds if self.decode_seconds else 0.0


def check_finite(logits: torch.Tensor, engine: Engine) -> None:
    """NaN or infinite logits would be sampled into garbage (or crash the sampler): stop, and say
    where they most likely come from. Checking a vocabulary-sized row costs microseconds; finding
    the culprit (reading every weight) happens only once something is wrong."""
    if bool(torch.isfinite(logits).all()):
        return
    raise NonFiniteError(engine.explain_non_finite())


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Session:
    """One sequence: the ids whose keys and values are in `cache`, in order."""

    def __init__(self, engine: Engine, max_tokens: int | None = None) -> None:
        self.engine = engine
        self.cache = engine.new_cache(max_tokens=max_tokens)
        self.tokens: list[int] = []

    @property
    def context_limit(self) -> int:
        return self.cache.max_tokens

    def resync(self) -> None:
        """After a forward pass failed midway: keep only what both the token list and the cache
        agree on (a half-written chunk leaves slots the mask would otherwise trust)."""
        n = min(len(self.tokens), self.cache.pos)
        self.forget_from(n)

    def forget_from(self, n: int) -> None:
        """Drop positions n and later from the cache and the token list (all of it if the rolling
        window no longer holds what position n needs)."""
        if self.cache.can_rewind(n):
            self.cache.rewind(n)
        else:
            self.cache.reset()
            n = 0
        self.tokens = self.tokens[:n]

    def _reuse(self, prompt: list[int]) -> int:
        """Keep the longest cached prefix of `prompt` (at least one prompt token must still be
        fed, to get logits) and rewind the cache to it; returns how many tokens are re-used."""
        n = min(common_prefix(self.tokens, prompt), len(prompt) - 1)
        if n < self.cache.pos:
            if self.cache.can_rewind(n):
                self.cache.rewind(n)
            else:  # a sliding window already overwrote keys that position n needs
                self.cache.reset()
                n = 0
        self.tokens = self.tokens[:n]
        return n

    def generate(self, prompt: list[int], settings: SamplingSettings | None = None,
                 cancel: threading.Event | None = None) -> Iterator[PrefillProgress | TokenEvent | Done]:
        settings = settings or SamplingSettings()
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.context_limit:
            why = f" ({self.engine.context_note})" if self.engine.context_note else ""
            raise ContextError(
                f"the prompt is {len(prompt)} tokens but the context holds {self.context_limit}{why}; "
                "shorten it or start a new conversation"
            )
        model, tokenizer = self.engine.model, self.engine.tokenizer
        device = self.engine.device
        gen = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
        start = time.perf_counter()
        cached = self._reuse(prompt)
        todo = prompt[cached:]
        done = Done(prompt_tokens=list(prompt), cached_tokens=cached, prefilled_tokens=len(todo))

        # Prefill chunk by chunk so a long prompt reports progress and can be stopped between chunks.
        step = self.cache.chunk_size
        for begin in range(0, len(todo), step):
            if begin and cancel is not None and cancel.is_set():
                done.prefill_seconds = time.perf_counter() - start
                done.stop = "interrupted"
                yield done
                return
            piece = todo[begin : begin + step]
            out = model(torch.tensor(piece, device=device), self.cache, last_only=True)
            self.tokens.extend(piece)
            check_finite(out.logits, self.engine)
            if len(todo) > step:
                yield PrefillProgress(begin + len(piece), len(todo))
        done.prefill_seconds = time.perf_counter() - start

        stream = StreamDecoder(tokenizer)
        history = list(prompt)
        decode_start = time.perf_counter()
        token = sample(out.logits[-1], settings, history, gen)
        while True:
            if cancel is not None and cancel.is_set():
                done.stop = "interrupted"
                break
            if token == tokenizer.eos_id:
                done.stop = "eos"
                break
            if self.cache.pos >= self.context_limit:
                done.stop = "context"  # the context is full: the reply ends here, and the summary says so
                break
            # Feed the token before reporting it: the forward pass is what routes it to its experts,
            # and the cache then holds the whole reply for the next turn.
            out = model(torch.tensor([token], device=device), self.cache)
            self.tokens.append(token)
            check_finite(out.logits, self.engine)
            history.append(token)
            done.generated.append(token)
            text = stream.push(token)
            done.text += text
            experts = weights = None
            if out.experts is not None:
                experts = out.experts[0].tolist()
                weights = [[round(w, 4) for w in row] for row in out.expert_weights[0].tolist()]
            if len(done.generated) == 1:
                done.time_to_first_token = time.perf_counter() - start
            yield TokenEvent(token, text, experts, weights, time.perf_counter() - start)
            if len(done.generated) >= settings.max_tokens:
                done.stop = "length"
                break
            token = sample(out.logits[-1], settings, history, gen)
        tail = stream.flush()
        done.text += tail
        if tail:
            yield TokenEvent(-1, tail, None, None, time.perf_counter() - start)
        done.decode_seconds = time.perf_counter() - decode_start
        yield done
