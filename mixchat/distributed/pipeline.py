"""Pipeline-parallel inference: each rank holds a contiguous range of layers and their KV cache.

Rank 0 holds the embedding, the first layers and the output head, and runs the front end. For every
chunk of tokens it runs its layers, sends the residual ([T, dim], one vector per token) to rank 1, which
runs its layers and passes it on; the last rank sends it back to rank 0 for the head. Each rank also
reports to rank 0 how long its layers took and, for Mixtral, the experts its layers chose, so the
expert view and drafting see every layer.

Every rank runs its layers with the same code a single process runs them with (the fused step or the
plain path, the same kernels), and a row's arithmetic does not depend on where its layers ran: greedy
tokens, routing and logits are those of one process, bit for bit.

The other ranks keep a mirror of each of rank 0's KV caches (ShardedCache): created, rewound, reset,
saved under the conversation's id, loaded and dropped when rank 0's is (mixchat.distributed.serving is their
side). A saved conversation's cache is
one file per rank, each carrying the model fingerprint and the split; a different split or world size
makes them another model's, so the history is read again.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from mixchat.distributed.group import AFTER, Group, RankLost
from mixchat.errors import MixchatError
from mixchat.model.cache import KVCache, available_memory
from mixchat.release.config import ModelArgs


def release_identity(folder: Path) -> str:
    """What every rank must agree on: params.json and the tokenizer by content, the weight files by name
    and size (not by modification time: each box may hold its own copy of the folder)."""
    import hashlib

    from mixchat.release.folder import open_release

    release = open_release(folder).release
    h = hashlib.sha256()
    for path in (release.params, release.tokenizer):
        h.update(path.read_bytes() if path.is_file() else b"")
    for path in release.weight_files:
        h.update(f"{path.name}:{path.stat().st_size}".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Part:
    """What one rank holds: its layers, and under an expert split (every rank holds every layer) its experts
    of each; the embedding goes to every rank that runs layer 0, the final norm and head to rank 0 only."""

    layers: range
    experts: range | None = None
    head: bool = False

    def label(self) -> str:
        what = f"layers {self.layers.start}-{self.layers.stop - 1}"
        return what if self.experts is None else f"experts {self.experts.start}-{self.experts.stop - 1}"


def owns(name: str, part: Part) -> bool:
    """Whether the rank holding `part` loads tensor `name`."""
    if name.startswith("layers."):
        _, layer, rest = name.split(".", 2)
        if int(layer) not in part.layers:
            return False
        if part.experts is not None and rest.startswith("feed_forward.experts."):
            return int(rest.split(".", 3)[2]) in part.experts
        return True
    if name.startswith("tok_embeddings."):
        return part.layers.start == 0
    return part.head


def plan_experts(n_experts: int, world: int) -> list[range]:
    """Each rank's share of every layer's experts: contiguous, as even as the count allows."""
    if n_experts < world:
        raise MixchatError(f"--split experts: the model has {n_experts} experts per layer, fewer than the {world} "
                           "ranks; start fewer ranks")
    return [range(r * n_experts // world, (r + 1) * n_experts // world) for r in range(world)]


def plan_layers(n_layers: int, layer_bytes: int, head_bytes: int, free: list[int],
                fixed: list[int] | None = None) -> list[range]:
    """Contiguous layer ranges, rank by rank, sized by each rank's free memory (rank 0's share also holds
    the embedding and the head); `fixed` gives the layer counts instead (--rank-layers)."""
    world = len(free)
    if n_layers < world:
        raise MixchatError(f"the model has {n_layers} layers, fewer than the {world} ranks: start at most "
                           f"{n_layers} ranks")
    if fixed is not None:
        if len(fixed) != world or sum(fixed) != n_layers or min(fixed) < 1:
            raise MixchatError(f"--rank-layers {','.join(map(str, fixed))}: give {world} counts of at least 1 "
                               f"that add up to the model's {n_layers} layers")
        counts = fixed
    else:
        weights = free if all(free) else [1] * world  # a rank that cannot tell its memory: split evenly
        total = n_layers * layer_bytes + head_bytes
        counts, start, cum = [], 0, 0
        for r in range(world):
            cum += weights[r]
            stop = n_layers if r == world - 1 else round((total * cum / sum(weights) - head_bytes) / layer_bytes)
            stop = max(start + 1, min(stop, n_layers - (world - 1 - r)))
            counts.append(stop - start)
            start = stop
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    for r, (rng, mem) in enumerate(zip(ranges, free, strict=True)):
        need = len(rng) * layer_bytes + (head_bytes if r == 0 else 0)
        if mem and need > mem:
            raise MixchatError(f"rank {r} would hold layers {rng.start}-{rng.stop - 1} ({need / 1e9:.1f} GB) but has "
                               f"{mem / 1e9:.1f} GB free: add a rank, use --quant int8/int4, or set --rank-layers")
    return ranges


def layer_sizes(args: ModelArgs, state: dict[str, torch.Tensor], dtype: torch.dtype,
                spec: object | None) -> tuple[int, int]:
    """Bytes one layer takes in memory (their mean) and bytes of the embedding, final norm and head, once
    converted to `dtype` and quantized by `spec`."""
    from mixchat.speed.qformat import model_bytes

    layers = {n: tuple(t.shape) for n, t in state.items() if n.startswith("layers.")}
    head = {n: tuple(t.shape) for n, t in state.items() if not n.startswith("layers.")}
    return model_bytes(layers, dtype.itemsize, spec) // args.n_layers, model_bytes(head, dtype.itemsize, spec)


def split_label(parts: list[Part]) -> str:
    if parts and parts[0].experts is not None:
        return "experts " + ",".join(f"{p.experts.start}-{p.experts.stop - 1}" for p in parts)
    return "pipeline " + ",".join(f"{p.layers.start}-{p.layers.stop - 1}" for p in parts)


class Pipeline:
    """Rank 0's side: the plan, each forward pass's exchange with the other ranks, and their cache mirrors.
    (Named for the default split; under --split experts every rank runs every layer and the same exchange
    frames each chunk.)"""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.remotes = list(range(1, group.size))
        self.lock = threading.RLock()  # one exchange at a time: the app's worker and UI threads both use it
        self.parts: list[Part] = []
        self.verifies = False  # every other rank's layers give each row of a pass what one token gets
        self.wait_seconds = 0.0  # time rank 0 spent waiting on the others' layers (or expert sums), in all
        self.remote_seconds: dict[int, float] = {}  # the time each rank reported for its layers, in all
        self.top_k = 0
        self.hidden = 0
        self._next_cid = 0
        self._dropped: list[int] = []
        self._open = False  # a chunk was started and not finished
        self._loading = False  # the others were told to load, and their answers are not read yet

    @classmethod
    def of(cls, group: Group) -> Pipeline:
        """The group's pipeline (one per launch: loading another model re-plans it)."""
        if getattr(group, "pipeline", None) is None:
            group.pipeline = cls(group)
        return group.pipeline

    @property
    def label(self) -> str:
        return split_label(self.parts)

    @property
    def experts_split(self) -> bool:
        return bool(self.parts) and self.parts[0].experts is not None

    # -- loading
    def plan(self, folder: Path, options: dict, args: ModelArgs, layer_bytes: int, head_bytes: int,
             fixed: list[int] | None, split: str = "pipeline") -> Part:
        """Ask every rank for its free memory and its copy of the folder's identity, plan the split, and
        tell each rank to load its part (they load while rank 0 loads its own); returns rank 0's part."""
        g = self.group
        if split == "experts" and not args.is_moe:
            raise MixchatError(f"--split experts: {folder} is a dense model, it has no experts; leave --split out for "
                               "the pipeline split")
        with self.lock:
            if self._loading:  # the last load failed here before its answers were read
                self._loaded()
            identity = release_identity(folder)
            free = [available_memory()]
            for r in self.remotes:
                g.send_json({"op": "probe", "folder": str(folder)}, r)
            # every answer read before any is judged: a rank whose answer is left unread waits on it
            replies = [g.recv_json(r, "opening the release folder", forever=True) for r in self.remotes]
            for r, reply in zip(self.remotes, replies, strict=True):
                if reply.get("error"):
                    raise MixchatError(f"rank {r}: {reply['error']}")
                if reply.get("identity") != identity:
                    raise MixchatError(f"rank {r} has another model at {folder} (params.json, tokenizer or weight "
                                       "sizes differ): every rank must load the same release")
                free.append(int(reply.get("free", 0)))
            if split == "experts":
                every = range(args.n_layers)
                self.parts = [Part(every, share, head=r == 0)
                              for r, share in enumerate(plan_experts(args.moe.num_experts, g.size))]
            else:
                ranges = plan_layers(args.n_layers, layer_bytes, head_bytes, free, fixed)
                self.parts = [Part(rng, head=r == 0) for r, rng in enumerate(ranges)]
            self.top_k = args.moe.num_experts_per_tok if args.is_moe else 0
            self._loading = True
            for r in self.remotes:
                p = self.parts[r]
                g.send_json({"op": "load", "folder": str(folder), "layers": [p.layers.start, p.layers.stop],
                             "experts": [p.experts.start, p.experts.stop] if p.experts is not None else None,
                             **options}, r)
        return self.parts[0]

    def _loaded(self) -> list[dict]:
        """The other ranks' answers to the load plan() asked for (each rank answers once, and a rank waits for
        its answer to be read before it reads another command)."""
        replies = [self.group.recv_json(r, "loading its layers", forever=True) for r in self.remotes]
        self._loading = False
        return replies

    def attach(self, engine) -> None:
        """Wait for the other ranks' loads and make `engine`'s model run its chunks with them."""
        with self.lock:
            replies = self._loaded()
            for r, reply in zip(self.remotes, replies, strict=True):
                if reply.get("error"):
                    raise MixchatError(f"rank {r}: {reply['error']}")
            self.verifies = all(bool(reply.get("verifies")) for reply in replies)
        self.hidden = engine.args.dim
        engine.model.ranks = self

    def reduce(self, part: torch.Tensor) -> None:
        """The expert split's sum across ranks, in place (the MoE layers call it, between start and finish)."""
        began = time.perf_counter()
        try:
            self.group.all_reduce(part, "adding its experts' outputs")
        except BaseException:
            self._abandon()
            raise
        self.wait_seconds += time.perf_counter() - began

    def _abandon(self) -> None:
        """A chunk failed between start and finish: the ranks are out of step for good; let go of the lock."""
        if self._open:
            self._open = False
            self.group.broken = self.group.broken or "a forward pass was interrupted midway"
            self.lock.release()

    def _acquire(self) -> None:
        """The lock, within the rank timeout: a thread never waits for good on an exchange that cannot end."""
        if not self.lock.acquire(timeout=self.group.timeout.total_seconds()):
            raise RankLost(f"the other ranks stayed busy for {self.group.timeout.total_seconds():g} s "
                           f"(--rank-timeout); {AFTER}")

    # -- the forward pass
    def _flush(self) -> None:
        while self._dropped:
            cid = self._dropped.pop()
            for r in self.remotes:
                self.group.send_json({"op": "drop", "cid": cid}, r)

    def start(self, h: torch.Tensor, cache: ShardedCache) -> None:
        """A chunk begins (its slots taken): the others are told, and under the expert split given h, since they
        run every layer beside this rank."""
        g = self.group
        self._acquire()  # released by finish
        if self._open:  # the last chunk never finished (an exception between): the ranks are out of step
            self.lock.release()
            self._abandon()
            raise RankLost(f"{g.broken}; {AFTER}")
        try:
            self._flush()
            self._open, self._began = True, time.perf_counter()
            dtype = str(h.dtype).removeprefix("torch.")
            for r in self.remotes:
                g.send_json({"op": "forward", "cid": cache.cid, "n": h.shape[0], "dtype": dtype}, r,
                            "sending it a chunk")
                if self.experts_split:
                    g.send(h, r, "sending it the activations")
        except BaseException:
            self.lock.release()
            raise

    def finish(self, h: torch.Tensor, cache: ShardedCache, experts: list, weights: list
               ) -> tuple[torch.Tensor, list, list]:
        """After this rank's layers: the pipeline's later layers on the others, their reports, their routing."""
        g, n = self.group, h.shape[0]
        try:
            began = time.perf_counter()
            if not self.experts_split:
                g.send(h, self.remotes[0], "sending it the activations")
            for r in self.remotes:
                reply = g.recv_json(r, "running its layers")
                if reply.get("error"):
                    g.broken = f"rank {r} failed running its layers: {reply['error']}"
                    raise RankLost(f"{g.broken}; {AFTER}")
                self.remote_seconds[r] = self.remote_seconds.get(r, 0.0) + float(reply.get("seconds", 0.0))
                if (layers := len(self.parts[r].layers) if self.top_k else 0) and not self.experts_split:
                    e = g.recv(torch.empty(n, layers, self.top_k, dtype=torch.int64), r, "sending its routing")
                    w = g.recv(torch.empty(n, layers, self.top_k, dtype=torch.float32), r, "sending its routing")
                    experts = experts + list(e.unbind(1))
                    weights = weights + list(w.unbind(1))
            if not self.experts_split:
                h = g.recv(torch.empty(n, self.hidden, dtype=h.dtype), self.remotes[-1], "running its layers")
            self.wait_seconds += time.perf_counter() - began
        finally:  # finished or failed (then the group is broken), the chunk is over: the lock goes with it
            self._open = False
            self.lock.release()
        return h, experts, weights

    # -- the other ranks' caches
    def open_cache(self, chunk_size: int, max_tokens: int) -> int:
        with self.lock:
            self._flush()
            self._next_cid += 1
            for r in self.remotes:
                self.group.send_json({"op": "new", "cid": self._next_cid, "chunk": chunk_size, "max": max_tokens}, r)
            return self._next_cid

    def dropped(self, cid: int) -> None:
        """A cache was garbage collected (in any thread, at any time): its mirrors go with the next command."""
        self._dropped.append(cid)

    def tell(self, command: dict) -> None:
        self._acquire()
        try:
            self._flush()
            for r in self.remotes:
                self.group.send_json(command, r)
        finally:
            self.lock.release()

    def ask(self, command: dict, doing: str) -> list[dict]:
        self._acquire()
        try:
            self.tell(command)
            return [self.group.recv_json(r, doing) for r in self.remotes]
        finally:
            self.lock.release()

    def stop(self) -> None:
        """Rank 0 is done: let the others exit."""
        if self.group.broken is None:
            try:
                with self.lock:
                    if self._loading:
                        self._loaded()
                    for r in self.remotes:
                        self.group.send_json({"op": "stop"}, r)
            except RankLost:
                pass


class ShardedCache(KVCache):
    """Rank 0's KV cache in a pipeline: its own layers here, the others' in their mirrors (same id)."""

    def __init__(self, pipeline: Pipeline, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pipeline = pipeline
        self.cid = pipeline.open_cache(self.chunk_size, self.max_tokens)
        weakref.finalize(self, pipeline.dropped, self.cid)

    # Once a rank is lost these act on rank 0's part only: they run while a failed reply is kept, which
    # must not fail again on the way.
    def can_rewind(self, n: int) -> bool:
        if not super().can_rewind(n):
            return False
        if self.pipeline.group.broken:
            return True
        return all(r.get("ok") for r in self.pipeline.ask({"op": "can_rewind", "cid": self.cid, "n": n},
                                                          "checking its cache"))

    def rewind(self, n: int) -> None:
        super().rewind(n)
        if not self.pipeline.group.broken:
            self.pipeline.tell({"op": "rewind", "cid": self.cid, "n": n})

    def reset(self) -> None:
        super().reset()
        if not self.pipeline.group.broken:
            self.pipeline.tell({"op": "reset", "cid": self.cid})

    def save_parts(self, name: str, fingerprint: str) -> None:
        """Each other rank saves its part of this cache as conversation `name`'s; OSError when one cannot."""
        try:
            replies = self.pipeline.ask({"op": "save", "cid": self.cid, "name": name, "fingerprint": fingerprint},
                                        "saving its part of the KV cache")
        except RankLost as exc:
            raise OSError(str(exc)) from None
        for r, reply in zip(self.pipeline.remotes, replies, strict=True):
            if reply.get("error"):
                raise OSError(f"rank {r}: {reply['error']}")

    def load_parts(self, name: str, fingerprint: str) -> None:
        """Each other rank loads its part of conversation `name`'s cache; ValueError when one cannot, or holds
        another length than this one (the caller then starts over)."""
        replies = self.pipeline.ask({"op": "load_cache", "cid": self.cid, "name": name, "fingerprint": fingerprint},
                                    "loading its part of the KV cache")
        for r, reply in zip(self.pipeline.remotes, replies, strict=True):
            if reply.get("error"):
                raise ValueError(f"rank {r}'s part {reply['error']}")
            if reply.get("pos") != self.pos:
                raise ValueError(f"rank {r}'s part holds {reply.get('pos')} tokens, rank 0's {self.pos}")
