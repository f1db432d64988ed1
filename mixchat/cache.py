"""The KV cache of one sequence, owned by whoever owns the conversation and passed into forward.

Keys are stored after rotary embedding, so a slot never needs its position again except to decide
who may attend to it; `slot_pos` records that position (-1 for an empty slot).

Sliding-window models get a rolling buffer of W + C - 1 slots, where W is the window and C the
largest chunk one forward step writes. Position p lives in slot p % capacity. The C - 1 spare slots
are what make "write the chunk, then attend" safe: writing positions p0..p0+C-1 evicts at most
position p0+C-1-(W+C-1) = p0-W, which no query of the chunk (the earliest, p0, needs p0-W+1 on) can
see. Example with W=4, C=3 (6 slots): after 10 tokens the slots hold positions 6..9 and 4, 5;
writing 10, 11, 12 evicts 4, 5, 6; query 10 needs 7..10, all still there.

Models without a window get a buffer indexed by position that grows by doubling up to max_seq_len.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixchat.config import ModelArgs
from mixchat.errors import ContextError

DEFAULT_CHUNK = 256


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (0 when it cannot tell)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class Step:
    """Where one forward chunk writes and what it may read."""

    positions: torch.Tensor  # [T] absolute positions of the chunk's tokens
    slots: torch.Tensor  # [T] where their keys/values are written
    length: int  # attention reads slots [0, length)
    mask: torch.Tensor | None  # [T, length] True where a query may attend; None: all may


class KVCache:
    def __init__(
        self,
        args: ModelArgs,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        chunk_size: int = DEFAULT_CHUNK,
        max_tokens: int | None = None,
    ) -> None:
        self.args = args
        self.window = args.sliding_window
        self.chunk_size = chunk_size
        self.max_tokens = max_tokens or args.max_seq_len
        self.dtype, self.device = dtype, torch.device(device)
        self.pos = 0
        capacity = self.window + chunk_size - 1 if self.window else min(self.max_tokens, 2 * chunk_size)
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        a = self.args
        shape = (a.n_layers, a.n_kv_heads, capacity, a.head_dim)
        need = 2 * a.n_layers * a.n_kv_heads * capacity * a.head_dim * self.dtype.itemsize
        free = available_memory() if self.device.type == "cpu" else 0
        what = f"{capacity} tokens of KV cache ({need / 1e9:.1f} GB)"
        if free and need > free:  # refuse before the allocation: an OOM kill would take the conversation with it
            raise ContextError(f"{what} do not fit the {free / 1e9:.1f} GB of free memory; start a shorter "
                               "conversation, or use a model with a smaller sliding window or context")
        try:
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        except (RuntimeError, MemoryError):  # torch.OutOfMemoryError is a RuntimeError
            raise ContextError(f"{what}: not enough memory on {self.device}; start a shorter conversation") from None
        slot_pos = torch.full((capacity,), -1, dtype=torch.long, device=self.device)
        if hasattr(self, "k"):  # growing: keep what is there
            n = self.k.shape[2]
            k[:, :, :n], v[:, :, :n], slot_pos[:n] = self.k, self.v, self.slot_pos
        self.k, self.v, self.slot_pos = k, v, slot_pos
        # Per-layer views made once: indexing makes a new tensor each time, tens of microseconds a layer
        # per decoded token once the weights streamed past have pushed Python's objects out of the caches.
        self._layers = (k, list(zip(k.unbind(0), v.unbind(0), strict=True)))

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def prepare(self, n: int) -> Step:
        """Reserve slots for the next n tokens (n <= chunk_size) and build their attention mask."""
        if n > self.chunk_size:
            raise ValueError(f"chunk of {n} tokens exceeds the cache's chunk size {self.chunk_size}")
        end = self.pos + n
        if end > self.max_tokens:
            raise ContextError(
                f"context full: {end} tokens exceed the limit of {self.max_tokens}; "
                "start a new conversation or shorten the prompt"
            )
        if not self.window and end > self.capacity:
            self._allocate(min(self.max_tokens, max(end, 2 * self.capacity)))
        positions = torch.arange(self.pos, end, device=self.device)
        slots = positions % self.capacity if self.window else positions
        self.slot_pos[slots] = positions
        length = min(self.capacity, end)
        if not self.window and n == 1:
            return Step(positions, slots, length, None)
        kpos = self.slot_pos[:length]  # [S]
        mask = (kpos[None, :] >= 0) & (kpos[None, :] <= positions[:, None])  # [T, S]
        if self.window:
            mask &= positions[:, None] - kpos[None, :] < self.window
        return Step(positions, slots, length, mask)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._layers[0] is not self.k:  # replaced from outside: views of the new buffers
            self._layers = (self.k, list(zip(self.k.unbind(0), self.v.unbind(0), strict=True)))
        return self._layers[1][i]  # each [n_kv_heads, capacity, head_dim]

    def advance(self, n: int) -> None:
        self.pos += n

    def oldest_kept(self) -> int:
        """The earliest position whose key is still in the buffer."""
        return max(0, self.pos - self.capacity) if self.window else 0

    def can_rewind(self, n: int) -> bool:
        """True if the cache can continue from position n: every key n's window needs is kept."""
        if not 0 <= n <= self.pos:
            return False
        return not self.window or max(0, n - self.window + 1) >= self.oldest_kept()

    def rewind(self, n: int) -> None:
        """Forget positions >= n, e.g. to regenerate or edit a message."""
        if not self.can_rewind(n):
            raise ValueError(f"cannot rewind from {self.pos} to {n}: keys before {self.oldest_kept()} are gone")
        self.slot_pos[self.slot_pos >= n] = -1
        self.pos = n

    def reset(self) -> None:
        self.slot_pos.fill_(-1)
        self.pos = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Only the filled slots, with their positions: a 2,000-token conversation saves 2,000
        tokens' keys, not the whole preallocated or rolling buffer."""
        filled = (self.slot_pos >= 0).nonzero().squeeze(1)
        return {
            "k": self.k[:, :, filled].contiguous(),
            "v": self.v[:, :, filled].contiguous(),
            "positions": self.slot_pos[filled].clone(),
            "pos": torch.tensor([self.pos]),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        a = self.args
        k, v, positions, pos = state["k"], state["v"], state["positions"].long(), int(state["pos"][0])
        n = positions.shape[0]
        expect = (a.n_layers, a.n_kv_heads, n, a.head_dim)
        if tuple(k.shape) != expect or tuple(v.shape) != expect:
            raise ValueError(f"saved cache has shape {list(k.shape)}, this model needs {list(expect)}")
        if n and (int(positions.min()) < 0 or int(positions.max()) >= pos) or pos > self.max_tokens:
            raise ValueError(f"saved cache positions do not fit its length {pos}")
        if self.window and n > self.capacity:
            raise ValueError(f"saved cache has {n} slots, this cache has {self.capacity}")
        if not self.window and pos > self.capacity:
            self._allocate(min(self.max_tokens, max(pos, 2 * self.capacity)))
        self.reset()
        slots = positions % self.capacity if self.window else positions
        self.k[:, :, slots] = k.to(self.device, self.dtype)
        self.v[:, :, slots] = v.to(self.device, self.dtype)
        self.slot_pos[slots] = positions.to(self.device)
        self.pos = pos
        if self.window and not self.can_rewind(pos):
            self.reset()
            raise ValueError("saved cache lacks keys its sliding window needs")
