"""What every rank but 0 does: load the part rank 0 gives it, then run its layers and keep its KV cache
mirrors on request, until rank 0 says stop (or is gone). It prints nothing: rank 0 speaks for the launch."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import torch

from mixchat.distributed.group import Group, RankLost
from mixchat.distributed.pipeline import Part, release_identity
from mixchat.errors import MixchatError
from mixchat.model.cache import KVCache, available_memory

_NAME = re.compile(r"[0-9A-Za-z_-]{1,64}")  # a conversation id as a file name: nothing a path could hide in
_ANSWERED = {"probe", "load", "can_rewind", "save", "load_cache"}  # the commands rank 0 waits on an answer to
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def part_path(name: str, rank: int) -> Path:
    from mixchat import paths

    return paths.kv_dir() / f"{name}.rank{rank}.safetensors"


class Server:
    """What a rank other than 0 does: load the layers rank 0 gives it, then run them on request."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.engine = None
        self.caches: dict[int, KVCache] = {}
        self.layers = range(0)
        self.part = Part(self.layers)

    def run(self) -> int:
        g = self.group
        while True:
            try:
                cmd = g.recv_json(0, "waiting for a command", forever=True)
            except RankLost:
                return 1  # rank 0 is gone: nothing to serve, nothing to say (rank 0 says what happened)
            op = cmd.get("op")
            if op == "stop":
                return 0
            handler = getattr(self, f"_{op}", None) if isinstance(op, str) and op.isidentifier() else None
            if handler is None:
                return 1
            try:
                reply = handler(cmd)
            except RankLost:
                return 1
            except (KeyError, ValueError, TypeError, RuntimeError, OSError, AttributeError) as exc:
                # A command this rank cannot carry out (a cache of a model since replaced): rank 0 hears why
                # where it waits for an answer, and nothing where it does not.
                reply = {"error": " ".join(str(exc).split())[:300] or type(exc).__name__} if op in _ANSWERED else None
            if reply is not None:
                try:
                    g.send_json(reply, 0)
                except RankLost:
                    return 1

    def _probe(self, cmd: dict) -> dict:
        try:
            return {"identity": release_identity(Path(cmd["folder"])), "free": available_memory()}
        except MixchatError as exc:
            return {"error": str(exc)}
        except OSError as exc:
            return {"error": f"{cmd['folder']}: {exc.strerror or exc}"}

    def _load(self, cmd: dict) -> dict:
        from mixchat.engine.engine import Engine

        self.engine, self.caches = None, {}
        self.layers = range(int(cmd["layers"][0]), int(cmd["layers"][1]))
        experts = range(int(cmd["experts"][0]), int(cmd["experts"][1])) if cmd.get("experts") else None
        self.part = Part(self.layers, experts)
        try:
            self.engine = Engine.load(cmd["folder"], dtype=cmd["dtype"], device=cmd["device"], threads=cmd["threads"],
                                      quant=cmd["quant"], show_progress=False, huge_pages=cmd["huge_pages"],
                                      fused_decode=cmd["fused_decode"], memory_budget=cmd["memory_budget"],
                                      prefetch=cmd["prefetch"], part=self.part)
        except MixchatError as exc:
            return {"error": str(exc)}
        decoder = self.engine.model.decoder
        probe = KVCache(self.engine.args, self.engine.dtype, self.engine.device, chunk_size=8, max_tokens=16,
                        layers=self.layers)
        verifies = decoder is not None and decoder.verifies(probe, head=False)
        return {"ok": True, "verifies": verifies}

    def _new(self, cmd: dict) -> None:
        e = self.engine
        self.caches[int(cmd["cid"])] = KVCache(e.args, e.dtype, e.device, chunk_size=int(cmd["chunk"]),
                                               max_tokens=int(cmd["max"]), layers=self.layers)

    def _drop(self, cmd: dict) -> None:
        self.caches.pop(int(cmd["cid"]), None)

    def _forward(self, cmd: dict) -> None:
        g, rank = self.group, self.group.rank
        n, dtype = int(cmd["n"]), _DTYPES[cmd["dtype"]]
        source = 0 if self.part.experts is not None else rank - 1  # the expert split: every rank runs every layer
        h = g.recv(torch.empty(n, self.engine.args.dim, dtype=dtype), source, "sending the activations")
        began = time.perf_counter()
        try:
            with torch.no_grad():
                h, experts, weights, _ = self.engine.model.run_layers(h.to(self.engine.device),
                                                                      self.caches[int(cmd["cid"])])
        except (MixchatError, RuntimeError, KeyError, ValueError) as exc:
            g.send_json({"error": " ".join(str(exc).split())[:300] or type(exc).__name__}, 0)
            return None
        # The report first: messages between two ranks arrive in the order they were sent, and the last
        # rank's activations go to rank 0 too, which reads them after every report.
        g.send_json({"seconds": time.perf_counter() - began}, 0)
        if self.part.experts is not None:
            return None  # rank 0 has the same h and routing: it ran the same layers, and the same sums
        if experts:
            g.send(torch.stack(experts, dim=1).to(torch.int64), 0)
            g.send(torch.stack(weights, dim=1).float(), 0)
        g.send(h, (rank + 1) % g.size, "passing the activations on")
        return None

    def _can_rewind(self, cmd: dict) -> dict:
        return {"ok": self.caches[int(cmd["cid"])].can_rewind(int(cmd["n"]))}

    def _rewind(self, cmd: dict) -> None:
        self.caches[int(cmd["cid"])].rewind(int(cmd["n"]))

    def _reset(self, cmd: dict) -> None:
        self.caches[int(cmd["cid"])].reset()

    def _save(self, cmd: dict) -> dict:
        from mixchat.conversations import kvstore

        name = str(cmd["name"])
        if not _NAME.fullmatch(name):
            return {"error": "the conversation id is not a plain name"}
        cache = self.caches[int(cmd["cid"])]
        try:
            kvstore.write_file(part_path(name, self.group.rank), cache.state_dict(),
                               f"{cmd['fingerprint']}:rank{self.group.rank}")
        except OSError as exc:
            return {"error": f"could not save its KV cache ({exc.strerror or exc})"}
        return {"ok": True}

    def _load_cache(self, cmd: dict) -> dict:
        from mixchat.conversations import kvstore

        name = str(cmd["name"])
        if not _NAME.fullmatch(name):
            return {"error": "has no plain name"}
        cache = self.caches[int(cmd["cid"])]
        path = part_path(name, self.group.rank)
        state = kvstore.read_file(path, f"{cmd['fingerprint']}:rank{self.group.rank}")
        if isinstance(state, str):
            return {"error": state}
        try:
            cache.load_state_dict(state)
        except ValueError as exc:
            return {"error": f"is damaged ({exc})"}
        return {"pos": cache.pos}

    def _forget(self, cmd: dict) -> None:
        name = str(cmd["name"])
        if _NAME.fullmatch(name):
            part_path(name, self.group.rank).unlink(missing_ok=True)


def serve(group: Group) -> int:
    """The whole life of a rank other than 0; returns its exit status."""
    # torchrun passes Ctrl+C on to every rank as it shuts the launch down: rank 0 stops the reply and saves it,
    # and this rank must still be there to save its part.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return Server(group).run()
