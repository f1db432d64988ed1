"""Mixtral's experts loaded on demand within a memory budget (`--memory-budget`).

Mixtral-8x7B is 87 GB in bf16 and 96 % of that is experts, of which each token uses 2 of 8 per
layer. So the non-expert weights stay resident and the experts live in an LRU cache bounded by what
the budget leaves; a missing expert is copied out of the memory-mapped release file (or the
quantized cache file) when a token is routed to it.

Consecutive tokens are routed alike, and the router of layer i+1 applied to layer i's input already
picks most of what layer i+1 will choose (the residual stream changes little from one layer to the
next). So while layer i computes, a background thread loads the experts that layer i+1's router
predicts. A hit is an expert that was resident or already being loaded when it was asked for.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from mixchat.model.model import MoeFeedForward
from mixchat.speed import weights_replaced
from mixchat.speed.decoder import expert_parts

Key = tuple[int, int]  # (layer, expert)


@dataclass
class ExpertStats:
    hits: int = 0
    misses: int = 0
    prefetched: int = 0  # loads started by a prediction
    prefetch_used: int = 0  # ... whose expert was then asked for while still resident
    loaded_bytes: int = 0
    wait_seconds: float = 0.0  # time the forward pass spent waiting for experts

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0

    def as_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": round(self.hit_rate, 3),
                "prefetched": self.prefetched, "prefetch_used": self.prefetch_used,
                "loaded_gb": round(self.loaded_bytes / 1e9, 2), "wait_seconds": round(self.wait_seconds, 2)}


class ExpertCache:
    """An LRU of loaded experts holding at most `capacity` of them, with one loader thread for
    predictions. `load(layer, expert)` returns a module; `expert_bytes` is one expert's size."""

    def __init__(self, load: Callable[[int, int], nn.Module], expert_bytes: int, capacity: int,
                 prefetch: bool = True) -> None:
        self._load, self.expert_bytes, self.capacity, self.prefetch_enabled = load, expert_bytes, capacity, prefetch
        self.local: range | list = range(1 << 30)  # the experts this cache may load (all, but under the expert split)
        self._lru: OrderedDict[Key, nn.Module] = OrderedDict()
        self._pending: dict[Key, Future] = {}
        self._unused_prefetch: set[Key] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mixchat-experts") if prefetch else None
        self.stats = ExpertStats()

    def _insert(self, key: Key, module: nn.Module) -> None:
        with self._lock:
            self._lru[key] = module
            self._lru.move_to_end(key)
            self.stats.loaded_bytes += self.expert_bytes
            while len(self._lru) > self.capacity:
                old, _ = self._lru.popitem(last=False)
                self._unused_prefetch.discard(old)

    def _load_into_cache(self, key: Key) -> nn.Module:
        module = self._load(*key)
        self._insert(key, module)
        with self._lock:
            self._pending.pop(key, None)
        return module

    def get(self, layer: int, expert: int) -> nn.Module:
        key = (layer, expert)
        with self._lock:
            module = self._lru.get(key)
            if module is not None:
                self._lru.move_to_end(key)
                self.stats.hits += 1
                if key in self._unused_prefetch:
                    self._unused_prefetch.discard(key)
                    self.stats.prefetch_used += 1
                return module
            pending = self._pending.get(key)
            if pending is not None:
                self.stats.hits += 1
                self.stats.prefetch_used += 1
                self._unused_prefetch.discard(key)
            else:
                self.stats.misses += 1
        start = time.perf_counter()
        module = pending.result() if pending is not None else self._load_into_cache(key)
        self.stats.wait_seconds += time.perf_counter() - start
        return module

    def prefetch(self, layer: int, experts: list[int]) -> None:
        if self._pool is None:
            return
        experts = [e for e in experts if e in self.local]  # the expert split: another rank's are not ours to load
        with self._lock:
            # Never predict more than the cache can hold next to what the current layer uses.
            room = max(0, self.capacity - 2)
            for e in experts[:room]:
                key = (layer, e)
                if key in self._lru or key in self._pending:
                    continue
                self._pending[key] = self._pool.submit(self._load_into_cache, key)
                self._unused_prefetch.add(key)
                self.stats.prefetched += 1

    def peek(self) -> nn.Module | None:
        """Any loaded expert (to learn the experts' format), without counting a hit or touching the LRU."""
        with self._lock:
            return next(iter(self._lru.values()), None)

    def resident(self) -> list[Key]:
        with self._lock:
            return list(self._lru)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class OffloadedExperts(nn.Module):
    """Stands in for MoeFeedForward.experts (a ModuleList): `experts[e]` comes from the cache."""

    def __init__(self, cache: ExpertCache, layer: int, n_experts: int) -> None:
        super().__init__()
        self.cache, self.layer, self.n_experts = cache, layer, n_experts

    def __getitem__(self, e: int) -> nn.Module:
        return self.cache.get(self.layer, e)

    def __len__(self) -> int:
        return self.n_experts


class OffloadedMoe(MoeFeedForward):
    """MoeFeedForward whose experts are offloaded, and which predicts the next layer's experts."""

    def __init__(self, moe: MoeFeedForward, experts: OffloadedExperts, next_gate: nn.Module | None) -> None:
        nn.Module.__init__(self)
        self.top_k, self.gate, self.experts = moe.top_k, moe.gate, experts
        # Not a submodule: it belongs to (and is loaded with) the next layer.
        object.__setattr__(self, "next_gate", next_gate)

    def predict(self, x: torch.Tensor) -> None:
        """Prefetch the next layer's experts as its router would choose them for x's last row (the one that
        matters most when decoding; in a prefill chunk, the most chosen)."""
        if self.next_gate is not None:
            guess = torch.topk(self.next_gate(x[-1:]), self.top_k, dim=-1).indices[0].tolist()
            self.experts.cache.prefetch(self.experts.layer + 1, guess)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.predict(x)
        return super().forward(x)

    def decode_fetch(self, xn: torch.Tensor, chosen: list[int]) -> list[tuple | None]:
        """For the compiled one-token step (kernels.DecodeMoe): predict and prefetch the next layer's experts
        from the normed input xn, as forward() does, then decoder.expert_parts of the chosen experts (None for
        another rank's, under the expert split)."""
        self.predict(xn)
        local = self.experts.cache.local
        # asked for in ascending id, as forward() asks for them
        parts = {e: expert_parts(self.experts[e]) for e in sorted(chosen) if e in local}
        if any(p is None for p in parts.values()):
            raise ValueError("an expert loaded on demand is in a format the kernels do not take")
        return [parts.get(e) for e in chosen]


def offload(model: nn.Module, load: Callable[[int, int], nn.Module], expert_bytes: int, capacity: int,
            prefetch: bool = True, local: range | None = None) -> ExpertCache:
    """Replace every MoE layer's experts by views of one ExpertCache holding `capacity` experts (of the
    experts `local` only, under the expert split across ranks: mixchat.distributed.experts)."""
    cache = ExpertCache(load, expert_bytes, capacity, prefetch)
    if local is not None:
        cache.local = local
    layers = list(model.layers)
    for i, layer in enumerate(layers):
        moe = layer.feed_forward
        assert isinstance(moe, MoeFeedForward)
        nxt = layers[i + 1].feed_forward.gate if i + 1 < len(layers) else None
        layer.feed_forward = OffloadedMoe(moe, OffloadedExperts(cache, i, len(moe.experts)), nxt)
    weights_replaced(model)
    return cache
