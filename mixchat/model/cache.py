"""The KV cache of one sequence, owned by whoever owns the conversation and passed into forward.

Keys are stored after rotary embedding, so a slot never needs its position again except to decide
who may attend to it; `slot_pos` records that position (-1 for an empty slot).

The layers that share a sliding window share a Buffer: a model with one window for all layers (or
none) has one, Ministral's pattern of windowed and full-attention layers one per distinct window.
Position p lives in slot p % capacity of each buffer. A buffer grows by doubling as the sequence
does, up to its limit:

- without a window the limit is the context (max_tokens), so p % capacity is p: every key is kept;
- with a window W it is W + C - 1 slots, C the largest chunk one forward step writes, and from there
  on the buffer rolls. The C - 1 spare slots are what make "write the chunk, then attend" safe:
  writing positions p0..p0+C-1 evicts at most position p0+C-1-(W+C-1) = p0-W, which no query of the
  chunk (the earliest, p0, needs p0-W+1 on) can see. Example with W=4, C=3 (6 slots): after 10
  tokens the slots hold positions 6..9 and 4, 5; writing 10, 11, 12 evicts 4, 5, 6; query 10 needs
  7..10, all still there.

While a buffer is below its limit every position it holds is below its capacity (it has not rolled),
so growing moves no key. Each buffer holds a run of positions [oldest, pos): all of them without a
window, the last capacity or fewer with one. Memory is bounded per layer by its own window: a
windowed layer never costs more than W + C - 1 tokens, whatever the context (kv_bytes says how much
without allocating anything).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixchat.errors import ContextError
from mixchat.progress import human_bytes
from mixchat.release.config import ModelArgs

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


def kv_memory(device: torch.device, mapped: int = 0) -> int:
    """Bytes a KV cache may take on `device` now (0: unknown): free memory less `mapped` (weights in the
    page cache, which the kernel counts as free) and KV_RESERVE."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu" and (free := available_memory()):
        free -= mapped
    else:
        return 0
    return max(free - KV_RESERVE, 1)


def buffer_limit(window: int | None, chunk_size: int, max_tokens: int) -> int:
    """The most slots a buffer for layers with this window ever holds (see the module docstring)."""
    return max_tokens if window is None else min(max_tokens, window + chunk_size - 1)


def kv_bytes(args: ModelArgs, dtype: torch.dtype, tokens: int, chunk_size: int = DEFAULT_CHUNK) -> int:
    """The most bytes the KV cache of a sequence of up to `tokens` tokens takes (what
    KVCache(args, dtype, chunk_size=chunk_size, max_tokens=tokens) allocates at most), without allocating
    anything: per layer, keys and values of n_kv_heads x head_dim for each of the slots its buffer may
    hold: `tokens` for a full-attention layer, at most W + chunk_size - 1 for a layer with window W.
    kv_bytes(args, dtype, 1) is what one token costs while no window is full yet."""
    per_slot = 2 * args.n_kv_heads * args.head_dim * dtype.itemsize
    return per_slot * sum(buffer_limit(args.window(i), chunk_size, tokens) for i in range(args.n_layers))


def kv_tokens_within(args: ModelArgs, dtype: torch.dtype, budget: int, chunk_size: int = DEFAULT_CHUNK) -> int:
    """The longest context, at most args.max_seq_len, whose KV cache fits in `budget` bytes (0 when not
    even one token does): the max_tokens to create a cache with when memory is what limits it."""
    lo, hi = 0, args.max_seq_len  # kv_bytes grows with tokens: the largest fitting count by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if kv_bytes(args, dtype, mid, chunk_size) <= budget else (lo, mid - 1)
    return lo


KV_RESERVE = 1 << 30  # bytes left free beside the KV cache: activations, logits, the app, the OS


def choose_context(args: ModelArgs, dtype: torch.dtype, free: int, requested: int | None = None,
                   what: str = "--context", chunk_size: int = DEFAULT_CHUNK) -> tuple[int, str | None]:
    """The context a conversation may grow to (KVCache's max_tokens) and, when memory made it shorter than
    params.json's max_seq_len, a one-line note saying so. `free` is the memory the KV cache may take (0:
    unknown, so max_seq_len). A 12B model's 128k tokens take ~20 GB of bf16 KV: sizing by max_seq_len would
    promise a context the machine cannot hold, and fail deep into a long conversation. `requested` (the
    flag or setting named `what`) must fit both; ContextError says what would."""
    per_token = kv_bytes(args, dtype, 1, chunk_size)
    if requested is not None:
        if not 1 < requested <= args.max_seq_len:
            raise ContextError(f"{what} {requested}: must be from 2 to the model's max_seq_len, {args.max_seq_len}")
        need = kv_bytes(args, dtype, requested, chunk_size)
        if free and need > free:
            fits = kv_tokens_within(args, dtype, free, chunk_size)
            raise ContextError(f"{what} {requested}: its KV cache takes {_gb(need)} ({human_bytes(per_token)}/token), "
                               f"{_gb(free)} is free; use {what} {fits} or less")
        return requested, None
    if not free or kv_bytes(args, dtype, args.max_seq_len, chunk_size) <= free:
        return args.max_seq_len, None
    fits = kv_tokens_within(args, dtype, free, chunk_size)
    if fits < 2:
        raise ContextError(f"no memory is left for a KV cache ({_gb(free)} free after the weights); close other "
                           "programs, or load the model with --quant int8 or int4")
    return fits, (f"context {fits} of the model's {args.max_seq_len} tokens: that is what the KV cache "
                  f"({human_bytes(per_token)}/token) can take in the {_gb(free)} free; {what} chooses another")


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


@dataclass
class Step:
    """Where one forward chunk writes in one buffer and what it may read there."""

    positions: torch.Tensor  # [T] absolute positions of the chunk's tokens
    slots: torch.Tensor  # [T] where their keys/values are written
    slot: int  # slots[0] (where a one-token step writes)
    length: int  # attention reads slots [0, length)
    mask: torch.Tensor | None  # [T, length] True where a query may attend; None: all may


class Buffer:
    """The keys and values of the layers that share one sliding window (None: full attention), each
    [len(layers), n_kv_heads, capacity, head_dim], and the position in each slot."""

    def __init__(self, args: ModelArgs, layers: tuple[int, ...], window: int | None, limit: int, first: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.args, self.layers, self.window, self.limit = args, layers, window, limit
        self.dtype, self.device = dtype, device
        self._allocate(min(limit, first))

    def _allocate(self, capacity: int) -> None:
        a = self.args
        shape = (len(self.layers), a.n_kv_heads, capacity, a.head_dim)
        need = 2 * shape[0] * shape[1] * shape[2] * shape[3] * self.dtype.itemsize
        free = available_memory() if self.device.type == "cpu" else 0
        layers = "" if len(self.layers) == a.n_layers else f" in {len(self.layers)} of the {a.n_layers} layers"
        what = f"{capacity} tokens of KV cache{layers} ({need / 1e9:.1f} GB)"
        if free and need > free:  # refuse before the allocation: an OOM kill would take the conversation with it
            raise ContextError(f"{what} do not fit the {free / 1e9:.1f} GB of free memory; start a shorter "
                               "conversation, or use a model with a smaller sliding window or context")
        try:
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        except (RuntimeError, MemoryError):  # torch.OutOfMemoryError is a RuntimeError
            raise ContextError(f"{what}: not enough memory on {self.device}; start a shorter conversation") from None
        slot_pos = torch.full((capacity,), -1, dtype=torch.long, device=self.device)
        if hasattr(self, "k"):  # growing (never after rolling): every kept position p stays in slot p
            n = self.k.shape[2]
            k[:, :, :n], v[:, :, :n], slot_pos[:n] = self.k, self.v, self.slot_pos
        self.k, self.v, self.slot_pos = k, v, slot_pos
        # Per-layer views made once: indexing makes a new tensor each time, tens of microseconds a layer
        # per decoded token once the weights streamed past have pushed Python's objects out of the caches.
        self.views = list(zip(k.unbind(0), v.unbind(0), strict=True))

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, end: int) -> None:
        """Grow (below the limit) so that positions up to `end` fit without rolling."""
        if end > self.capacity and self.capacity < self.limit:
            self._allocate(min(self.limit, max(end, 2 * self.capacity)))

    def write(self, positions: torch.Tensor, start: int) -> Step:
        """Take slots for `positions` (start, start + 1, ...; after reserve) and build their mask."""
        end = start + positions.shape[0]
        slots = positions if end <= self.capacity else positions % self.capacity  # not rolled: slot p is p
        self.slot_pos[slots] = positions
        length = min(self.capacity, end)
        slot = start % self.capacity
        if self.window is None and positions.shape[0] == 1:  # one query that sees every key up to itself
            return Step(positions, slots, slot, length, None)
        kpos = self.slot_pos[:length]  # [S]
        mask = (kpos[None, :] >= 0) & (kpos[None, :] <= positions[:, None])  # [T, S]
        if self.window is not None:
            mask &= positions[:, None] - kpos[None, :] < self.window
        return Step(positions, slots, slot, length, mask)

    def oldest(self, pos: int) -> int:
        """The earliest position still held (pos when none is)."""
        kept = self.slot_pos[self.slot_pos >= 0]
        return int(kept.min()) if kept.numel() else pos

    def can_continue_from(self, n: int, pos: int) -> bool:
        """Whether every key position n's window needs (all before it, without a window) is still here."""
        return (0 if self.window is None else max(0, n - self.window + 1)) >= self.oldest(pos)

    def saved(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The filled slots' keys, values and positions."""
        filled = (self.slot_pos >= 0).nonzero().squeeze(1)
        return self.k[:, :, filled].contiguous(), self.v[:, :, filled].contiguous(), self.slot_pos[filled].clone()

    def load(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, pos: int) -> None:
        """Put saved keys back (into an empty buffer); ValueError when they cannot be this buffer's."""
        a = self.args
        if positions.dim() != 1:
            raise ValueError(f"saved cache positions have shape {list(positions.shape)}, not [n]")
        n = positions.shape[0]
        expect = (len(self.layers), a.n_kv_heads, n, a.head_dim)
        if tuple(k.shape) != expect or tuple(v.shape) != expect:
            raise ValueError(f"saved cache has shape {list(k.shape)}, this model needs {list(expect)}")
        # What a buffer holds is the run [pos - n, pos), each position once.
        if n and (int(positions.min()) != pos - n or int(positions.max()) != pos - 1
                  or int(positions.unique().numel()) != n):
            raise ValueError(f"saved cache positions do not fit its length {pos}")
        if n > self.limit:
            raise ValueError(f"saved cache has {n} slots, this cache has {self.limit}")
        self.reserve(pos)
        slots = positions.to(self.device) % self.capacity
        self.k[:, :, slots] = k.to(self.device, self.dtype)
        self.v[:, :, slots] = v.to(self.device, self.dtype)
        self.slot_pos[slots] = positions.to(self.device)


class KVCache:
    """One sequence's keys and values: a Buffer per distinct sliding window (one for most models), `pos`
    tokens so far, at most `max_tokens` (the context: args.max_seq_len unless memory asks for less)."""

    def __init__(
        self,
        args: ModelArgs,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        chunk_size: int = DEFAULT_CHUNK,
        max_tokens: int | None = None,
        layers: range | None = None,
    ) -> None:
        self.args = args
        # The layers this cache holds (a pipeline rank's share, mixchat.distributed); the others have none.
        self.layers = range(args.n_layers) if layers is None else layers
        self.chunk_size = chunk_size
        self.max_tokens = max_tokens or args.max_seq_len
        self.dtype, self.device = dtype, torch.device(device)
        self.pos = 0
        windows = {i: args.window(i) for i in self.layers}
        self.buffers = [
            Buffer(args, tuple(i for i, w in windows.items() if w == window), window,
                   buffer_limit(window, chunk_size, self.max_tokens), 2 * chunk_size, dtype, self.device)
            for window in dict.fromkeys(windows.values())  # the distinct windows, in layer order
        ]
        # layer i -> (its buffer, its index among the buffer's layers); None for a layer held elsewhere
        self._where: list[tuple[int, int] | None] = [None] * args.n_layers
        for b, buf in enumerate(self.buffers):
            for j, i in enumerate(buf.layers):
                self._where[i] = (b, j)

    # One buffer is the whole cache when every layer shares a window (or none has one); tests and tools
    # read it through these. A cache with several windows has them per buffer.
    def _only(self) -> Buffer:
        if len(self.buffers) != 1:
            raise AttributeError("this cache has a buffer per sliding window: read cache.buffers")
        return self.buffers[0]

    @property
    def k(self) -> torch.Tensor:
        return self._only().k  # [n_layers, n_kv_heads, capacity, head_dim]

    @property
    def v(self) -> torch.Tensor:
        return self._only().v

    @property
    def slot_pos(self) -> torch.Tensor:
        return self._only().slot_pos

    @property
    def capacity(self) -> int:
        return self._only().capacity

    @property
    def nbytes(self) -> int:
        """Bytes allocated now (kv_bytes(args, dtype, max_tokens, chunk_size) is the most it grows to)."""
        return sum(b.k.nbytes + b.v.nbytes for b in self.buffers)

    def prepare(self, n: int) -> list[Step | None]:
        """Reserve slots for the next n tokens (n <= chunk_size); returns each layer's Step (where its
        buffer writes them, and their attention mask, shared by the layers of a buffer; None for a layer
        this cache does not hold)."""
        if n > self.chunk_size:
            raise ValueError(f"chunk of {n} tokens exceeds the cache's chunk size {self.chunk_size}")
        end = self.pos + n
        if end > self.max_tokens:
            raise ContextError(
                f"context full: {end} tokens exceed the limit of {self.max_tokens}; "
                "start a new conversation or shorten the prompt"
            )
        for b in self.buffers:  # every allocation before any write: a failed one leaves the cache as it was
            b.reserve(end)
        positions = torch.arange(self.pos, end, device=self.device)
        steps = [b.write(positions, self.pos) for b in self.buffers]
        return [steps[w[0]] if w is not None else None for w in self._where]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, j = self._where[i]
        return self.buffers[b].views[j]  # each [n_kv_heads, capacity, head_dim]

    def advance(self, n: int) -> None:
        self.pos += n

    def oldest_kept(self) -> int:
        """The earliest position every layer still holds the key of (0 without a window)."""
        return max(b.oldest(self.pos) for b in self.buffers)

    def can_rewind(self, n: int) -> bool:
        """True if the cache can continue from position n: every key n's window needs is kept, in every
        layer."""
        return 0 <= n <= self.pos and self._keeps_window_of(n)

    def _keeps_window_of(self, n: int) -> bool:
        """Every key position n's window needs is in this cache's buffers (in a pipeline: this rank's layers)."""
        return all(b.can_continue_from(n, self.pos) for b in self.buffers)

    def rewind(self, n: int) -> None:
        """Forget positions >= n, e.g. to regenerate or edit a message."""
        if not self.can_rewind(n):
            lost = next((b for b in self.buffers if not b.can_continue_from(n, self.pos)), self.buffers[0])
            raise ValueError(f"cannot rewind from {self.pos} to {n}: keys before {lost.oldest(self.pos)} are gone")
        for b in self.buffers:
            b.slot_pos[b.slot_pos >= n] = -1
        self.pos = n

    def reset(self) -> None:
        for b in self.buffers:
            b.slot_pos.fill_(-1)
        self.pos = 0

    @staticmethod
    def _names(b: int) -> tuple[str, str, str]:
        """State-dict keys of buffer b: the first buffer's unsuffixed, so that a model whose layers share
        one window saves (and loads) what a mixchat with one buffer for all layers did."""
        suffix = f".{b}" if b else ""
        return "k" + suffix, "v" + suffix, "positions" + suffix

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Only the filled slots, with their positions: a 2,000-token conversation saves 2,000
        tokens' keys, not the whole preallocated or rolling buffer. Per buffer: k and v
        [its layers, n_kv_heads, n, head_dim], positions [n] (see _names), and pos."""
        state = {"pos": torch.tensor([self.pos])}
        for b, buf in enumerate(self.buffers):
            state.update(zip(self._names(b), buf.saved(), strict=True))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a saved state_dict; ValueError (the cache left empty) when it cannot be this
        model's: other shapes or windows, positions that are not a run ending at its length, non-finite
        values, a window's keys missing."""
        expect = {"pos", *(name for b in range(len(self.buffers)) for name in self._names(b))}
        saved = sum(name.startswith("positions") for name in state)
        if saved != len(self.buffers):
            raise ValueError(f"saved cache has {saved} sliding-window buffer(s), this model {len(self.buffers)}")
        if set(state) != expect:
            raise ValueError(f"saved cache holds {', '.join(sorted(state))}, not {', '.join(sorted(expect))}")
        pos = int(state["pos"][0])
        if not 0 <= pos <= self.max_tokens:
            raise ValueError(f"saved cache positions do not fit its length {pos}")
        self.reset()
        try:
            for b, buf in enumerate(self.buffers):
                k, v, positions = (state[name] for name in self._names(b))
                if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
                    raise ValueError("saved cache holds non-finite keys or values")
                buf.load(k, v, positions.long(), pos)
            self.pos = pos
            if not self._keeps_window_of(pos):
                raise ValueError("saved cache lacks keys its sliding window needs")
        except ValueError:
            self.reset()
            raise
