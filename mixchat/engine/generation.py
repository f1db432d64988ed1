"""Sessions: one conversation's token history and KV cache, and the streaming `generate`.

Front ends only iterate `Session.generate()`; it yields PrefillProgress while reading the prompt,
a TokenEvent per new token and one Done at the end. Cancellation is a threading.Event checked
before every token, so another thread (the TUI, a SIGINT handler) stops it within one token (the
tokens of a verify pass not yet reported are dropped, from the cache too) and what was generated
so far is kept, in the events and in the cache.

Decoding drafts (settings.draft > 0, where the fused step verifies exactly): the next tokens are
guessed from the conversation itself (mixchat.engine.drafting), fed with the token just chosen in one
pass whose every row is what a one-token step computes, and kept while each is what the sampler
chooses from the row before it. The sampler draws once per generated token, in order, from the same
logits, so the reply is token for token plain decoding's, greedy or sampled with a seed (for a draft
of certain tokens this is speculative sampling's acceptance rule: a drafted token is kept with its
probability, and a rejection draws from the rest). The rejected rows are rewound out of the cache,
never reported, never saved.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from mixchat.engine.drafting import DraftGate, PromptLookup
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
    drafted: int = 0  # tokens guessed by prompt lookup and checked in a verify pass
    accepted: int = 0  # of those, the ones kept (each one a token that cost no pass of its own)
    passes: int = 0  # forward passes of the decode (equal to len(generated) without drafting)
    rank_wait: float = 0.0  # seconds of the decode spent waiting on other ranks' layers (torchrun; 0 in one process)

    @property
    def rank_wait_per_token(self) -> float:
        return self.rank_wait / len(self.generated) if self.generated else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # Every generated token is fed (to get its routing): one pass each, or several in a verify pass.
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
        self.gate: DraftGate | None = None  # drafting's state, kept across the conversation's replies

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

    def can_draft(self) -> bool:
        """Whether a pass of several tokens gives each row exactly what a one-token step does (the fused
        step on the CPU kernels, every layer and the output in C); drafting is off elsewhere."""
        decoder, pipeline = self.engine.model.decoder, self.engine.pipeline
        return decoder is not None and hasattr(decoder, "verifies") and decoder.verifies(self.cache) \
            and (pipeline is None or pipeline.verifies)

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
                 cancel: threading.Event | None = None,
                 lookup_class: Callable[[list[int]], PromptLookup] | None = None,
                 ) -> Iterator[PrefillProgress | TokenEvent | Done]:
        """lookup_class: what drafts (default PromptLookup over the conversation; benchmarks/drafting.py
        gives one that knows the reply, to time drafting at a chosen acceptance on a model with random
        weights)."""
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
        decode_start, waited = time.perf_counter(), self.engine.rank_wait()
        drafting = settings.draft > 0 and self.can_draft()
        lookup = (lookup_class or PromptLookup)(history) if drafting else None
        gate = None
        if drafting:
            if self.gate is None:  # how often guesses are kept carries over from one reply to the next
                self.gate = DraftGate(max_draft=settings.draft, seconds=self.engine.pass_seconds)
            gate = self.gate
            gate.max_draft = settings.draft
            drafted0, accepted0 = gate.drafted, gate.accepted
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
            draft: list[int] = []
            if lookup is not None:
                lookup.extend([token])
                room = min(self.context_limit - self.cache.pos, settings.max_tokens - len(done.generated),
                           self.cache.chunk_size, gate.max_draft + 1) - 1
                guess = lookup.draft(room) if room > 0 else []
                if guess and (k := gate.size()):
                    # eos is never drafted: plain decoding stops before feeding it
                    for d in guess[:k]:
                        if d == tokenizer.eos_id:
                            break
                        draft.append(d)
            # Feed the token before reporting it: the forward pass is what routes it to its experts,
            # and the cache then holds the whole reply for the next turn.
            start_pos, began = self.cache.pos, time.perf_counter()
            fed = [token, *draft]
            out = model(torch.tensor(fed, device=device), self.cache)
            self.tokens.extend(fed)
            done.passes += 1
            check_finite(out.logits, self.engine)
            # Decide every row before reporting any: the cache is final (rejected rows rewound) by the
            # time the first token reaches a front end, which may stop listening at any token.
            nxt, kept = None, 0
            recent = history[-settings.repeat_last_n:] if settings.repeat_last_n else []  # all the penalty reads
            for row in range(1, len(fed)):  # drafted token `row` is kept if row - 1's logits choose it
                chosen = sample(out.logits[row - 1], settings, [*recent, *fed[:row]], gen)
                if chosen != fed[row]:
                    nxt = chosen
                    break
                kept += 1
            if kept < len(draft):  # the rejected rows leave the cache: it holds exactly the reply
                self.forget_from(start_pos + 1 + kept)
            if gate is not None:
                lookup.extend(draft[:kept])
                gate.record(len(draft), kept, time.perf_counter() - began)
                done.drafted, done.accepted = gate.drafted - drafted0, gate.accepted - accepted0
            for row, tok in enumerate(fed[:1 + kept]):
                history.append(tok)
                done.generated.append(tok)
                text = stream.push(tok)
                done.text += text
                experts = weights = None
                if out.experts is not None:
                    experts = out.experts[row].tolist()
                    weights = [[round(w, 4) for w in r] for r in out.expert_weights[row].tolist()]
                if len(done.generated) == 1:
                    done.time_to_first_token = time.perf_counter() - start
                yield TokenEvent(tok, text, experts, weights, time.perf_counter() - start)
                if row < kept and cancel is not None and cancel.is_set():
                    # stopped between the tokens of one pass: the reply (and the cache) end at this one
                    self.forget_from(start_pos + row + 1)
                    done.stop = "interrupted"
                    break
            if done.stop == "interrupted":
                break
            if len(done.generated) >= settings.max_tokens:
                done.stop = "length"
                break
            token = nxt if nxt is not None else sample(out.logits[kept], settings, history, gen)
        tail = stream.flush()
        done.text += tail
        if tail:
            yield TokenEvent(-1, tail, None, None, time.perf_counter() - start)
        done.decode_seconds = time.perf_counter() - decode_start
        done.rank_wait = self.engine.rank_wait() - waited
        yield done
