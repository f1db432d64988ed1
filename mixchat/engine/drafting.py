"""Prompt-lookup drafting: guess the next tokens from the conversation itself.

Decode reads every weight once per token, so on a CPU no kernel gets past the memory read rate; a
pass that checks several tokens at once reads the weights once for all of them. In a chat the reply
often repeats what is already there (a quoted file, code being edited, a paragraph rewritten): the
last few tokens, found earlier in the conversation, say what may come next. No second model.

This module holds the parts that do not touch the model: the n-gram index, the acceptance rule that
keeps sampling's output distribution unchanged, and the gate that stops drafting where it does not
pay. Greedy decoding accepts a drafted token exactly when it is the argmax the one-token path would
have chosen, so the output is the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class PromptLookup:
    """The conversation's tokens, indexed by their n-grams (n from max_n down to min_n) so that a
    draft costs a dictionary lookup per n, not a scan of a 128k-token history."""

    def __init__(self, tokens: Iterable[int] = (), max_n: int = 3, min_n: int = 1) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, not {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        # n -> n-gram -> where the token after its latest occurrence is
        self._follows: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        toks, follows = self.tokens, self._follows
        for t in tokens:
            end = len(toks)
            # The n-grams ending here now have a follower (t): only then are they indexed, so the
            # conversation's own last n-gram never matches itself.
            for n, index in follows.items():
                if end >= n:
                    index[tuple(toks[end - n:])] = end
            toks.append(t)

    def truncate(self, length: int) -> None:
        """Forget the tokens from `length` on (an edit, a regeneration, rejected draft tokens)."""
        if length < len(self.tokens):
            kept = self.tokens[:length]
            self.tokens, self._follows = [], {n: {} for n in self._follows}
            self.extend(kept)

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix found."""
        toks = self.tokens
        if k <= 0:
            return []
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(toks) < n:
                continue
            at = self._follows[n].get(tuple(toks[len(toks) - n:]))
            if at is not None:
                return toks[at:at + k]
        return []


def accept(draft: int, probs: torch.Tensor, generator: torch.Generator | None) -> tuple[bool, int]:
    """Speculative sampling's rule for a draft that proposes one token for certain: keep it with
    probability p(draft); otherwise draw from p without it. Either way the token returned has
    exactly the distribution `probs` (the sampler's weights after temperature, top-k/p and
    penalties; top-p leaves them unnormalised, as torch.multinomial takes them)."""
    total = float(probs.sum())
    p = float(probs[draft]) / total if total > 0 else 0.0
    u = float(torch.rand((), generator=generator))
    if u < p:
        return True, draft
    rest = probs.clone()
    rest[draft] = 0.0
    if float(rest.sum()) <= 0.0:  # p(draft) was 1 up to rounding: nothing else can come
        return True, draft
    return False, int(torch.multinomial(rest, 1, generator=generator))


class DraftGate:
    """How many tokens to draft next. Drafting costs a wider pass (and, on Mixtral, the experts
    the drafted tokens route to), so where drafts keep failing it stops, and tries again after a
    pause that doubles each time it fails again."""

    def __init__(self, max_draft: int = 8, min_rate: float = 0.3, window: int = 32, pause: int = 16) -> None:
        self.max_draft, self.min_rate, self.window, self.first_pause = max_draft, min_rate, window, pause
        self.drafted = self.accepted = 0  # totals, for --stats and --json
        self._recent: list[tuple[int, int]] = []  # (drafted, accepted) of the last passes
        self._pause = pause
        self._paused_for = 0  # tokens to decode one at a time before drafting again

    def size(self) -> int:
        """Tokens to draft now (0: decode one token plainly)."""
        if self._paused_for > 0:
            self._paused_for -= 1
            return 0
        return self.max_draft

    def record(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        self._recent.append((drafted, accepted))
        tried = sum(d for d, _ in self._recent)
        while len(self._recent) > 1 and tried - self._recent[0][0] >= self.window:
            tried -= self._recent.pop(0)[0]
        if tried >= self.window:
            if sum(a for _, a in self._recent) / tried < self.min_rate:
                self._paused_for, self._pause = self._pause, self._pause * 2
                self._recent.clear()
            else:
                self._pause = self.first_pause
