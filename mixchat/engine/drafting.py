"""Prompt-lookup drafting: guess the next tokens from the conversation itself.

Decode reads every weight once per token, so on a CPU no kernel gets past the memory read rate; a
pass that checks several tokens at once reads the weights once for all of them. In a chat the reply
often repeats what is already there (a quoted file, code being edited, a paragraph rewritten): the
last few tokens, found earlier in the conversation, say what may come next. No second model.

This module holds the parts that do not touch the model: the n-gram index and the gate that sizes
drafts (and stops drafting where it does not pay). A drafted token is kept exactly when it is what the
sampler draws from the logits before it (mixchat.engine.generation), so the output is plain decoding's.
"""

from __future__ import annotations

from collections.abc import Iterable


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


PRIOR = 0.6  # the acceptance rate assumed before any draft was checked


class DraftGate:
    """How many tokens to draft next, chosen to decode the most tokens per second.

    A pass of T rows costs what the passes of T rows measured (an average per T, so for Mixtral it
    includes the experts the drafted tokens were routed to; see cost() for sizes not measured yet).
    Drafted tokens are accepted one after another with a probability p, estimated from the recent
    passes (accepted / (accepted + rejections)); a draft of k then yields 1 + p + ... + p^k tokens on
    average. The size is the k with the most tokens per second of pass, at most max_draft. Where that
    is 0 (drafts keep failing, or extra rows cost more than they bring) drafting pauses, and
    tries again after a pause that doubles each time it pauses again."""

    def __init__(self, max_draft: int = 7, window: int = 32, pause: int = 16,
                 seconds: dict[int, float] | None = None) -> None:
        self.max_draft, self.window, self.first_pause = max_draft, window, pause
        self.drafted = self.accepted = 0  # totals, for --stats and --json
        self._recent: list[tuple[int, int]] = []  # (drafted, accepted) of the last passes that drafted
        # rows -> average seconds of a pass: a property of the model and machine, so the engine keeps one
        # table for all its conversations (pass it here); the rate belongs to a conversation
        self._seconds: dict[int, float] = {} if seconds is None else seconds
        self._pause = pause
        self._paused_for = 0  # guesses to skip (one token at a time) before drafting again
        self._best: int | None = None  # best() as of the last pass that drafted

    def rate(self) -> float:
        """p: the chance that the next drafted token is kept, given the ones before it were: the recent
        passes' kept / (kept + rejections), starting from PRIOR as if two guesses had been made, so one
        rejected pass lowers it rather than ending drafting at once."""
        kept = sum(a for _, a in self._recent)
        rejected = sum(a < d for d, a in self._recent)
        return (kept + 2 * PRIOR) / (kept + rejected + 2)

    def cost(self, rows: int) -> float:
        """Seconds a pass of `rows` rows takes: measured, else interpolated between the nearest measured
        sizes, else one row's time plus a tenth of it per extra row (relative before anything is
        measured); never less than one row's."""
        if rows in self._seconds:
            return self._seconds[rows]
        one = self._seconds.get(1, 1.0)
        below = max((r for r in self._seconds if r < rows), default=None)
        above = min((r for r in self._seconds if r > rows), default=None)
        if below is not None and above is not None:
            lo, hi = self._seconds[below], self._seconds[above]
            guess = lo + (hi - lo) * (rows - below) / (above - below)
        elif below is not None:
            guess = self._seconds[below] + 0.1 * one * (rows - below)
        else:
            guess = one * (1 + 0.1 * (rows - 1))
        return max(guess, one)

    def best(self) -> int:
        p, best, score = self.rate(), 0, 1.0 / self.cost(1)
        for k in range(1, self.max_draft + 1):
            tokens = sum(p ** i for i in range(k + 1))
            if tokens / self.cost(k + 1) > score * 1.02:  # a clear gain, not noise
                best, score = k, tokens / self.cost(k + 1)
        return best

    def size(self) -> int:
        """Tokens to draft now (0: decode one token plainly). Asked only when there is a guess to make."""
        if self._paused_for > 0:
            self._paused_for -= 1
            return 0
        if self._best is None:  # worked out again after each pass that drafted: ~30 us of Python
            self._best = self.best()
        k = self._best
        if k == 0:
            self._paused_for, self._pause = self._pause, self._pause * 2
            self._recent.clear()  # try afresh after the pause (the prior rate)
            self._best = None
        return k

    def record(self, drafted: int, accepted: int, seconds: float | None = None) -> None:
        """One pass: `drafted` tokens drafted, `accepted` of them kept, in `seconds` (its 1 + drafted rows)."""
        if seconds is not None and seconds > 0:
            rows = drafted + 1
            old = self._seconds.get(rows)
            self._seconds[rows] = seconds if old is None else 0.8 * old + 0.2 * seconds
        if drafted <= 0:
            return
        self._best = None
        self.drafted += drafted
        self.accepted += accepted
        self._recent.append((drafted, accepted))
        tried = sum(d for d, _ in self._recent)
        while len(self._recent) > 1 and tried - self._recent[0][0] >= self.window:
            tried -= self._recent.pop(0)[0]
        if accepted:
            self._pause = self.first_pause
