"""The fused decode step: Transformer.decoder as the engine builds it.

For one decoded token the attention block and a dense (or Mixtral) feed-forward of every layer run as one
C call each (kernels.DecodeLayer, kernels.DecodeMoe) instead of about forty torch ops. FusedDecoder
describes the model's layers to the C side (the kernel parts of their weights), builds those objects on
the first step and reuses them while the weights stay the same.

Up to MAX_ROWS tokens go through the same calls at once, each row bit for bit what a one-token step gives
it (the row-exact kernels, one read of each weight for all of them): drafting's verify pass
(mixchat.engine.drafting). head() gives their logits the same way.

The C side holds raw pointers, so a replaced weight must never be read through a stale build. Whoever
replaces weights (quant.install, speed.install, experts.offload, the engine) calls invalidate(); as a
safety net each step also compares, for every tensor the build read, the pointer its module holds now
with the one it held then (a new Parameter, or a `.data` swap as Module.to does), about a microsecond
per layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from mixchat.model.cache import KVCache, Step
from mixchat.model.model import MoeFeedForward, Transformer, TransformerBlock, rotary_angles
from mixchat.speed.linear import KernelLinear, kernels_or_none

Parts = tuple[str, tuple[torch.Tensor, ...], int]  # kernel_parts(): format, tensors, int4 group
MAX_ROWS = 8  # tokens one exact multi-row step takes: one slice of the one-pass kernels


def _parts(module: nn.Module) -> Parts | None:
    return getattr(module, "kernel_parts", lambda: None)()


def _one_format(parts: list[Parts | None]) -> bool:
    return all(p is not None for p in parts) and len({(p[0], p[2]) for p in parts}) == 1


def expert_parts(ex: nn.Module) -> tuple[tuple[str, int, bool], tuple] | None:
    """((kind, group, w2 transposed), the kernel parts of w1, w2, w3) of one expert, or None where the
    kernels do not take it. A bf16 torrent-layout w2 (a transposed view) is given as the model holds it."""
    w2 = getattr(ex.w2, "weight", None)
    t = isinstance(ex.w2, KernelLinear) and w2.dtype == torch.bfloat16 and w2.device.type == "cpu" \
        and not w2.is_contiguous() and w2.t().is_contiguous()
    parts = [_parts(ex.w1), ("bf16", (w2,), 0) if t else _parts(ex.w2), _parts(ex.w3)]
    if not _one_format(parts):
        return None
    return (parts[0][0], parts[0][2], t), tuple(p[1] for p in parts)


class _Watch:
    """Where each tensor a build read is registered (its module's parameter or buffer dict and name), and
    its pointer then: one dict lookup and data_ptr() per tensor to tell whether it is still the one."""

    def __init__(self) -> None:
        self.slots: list[tuple[dict, str]] = []

    def add(self, module: nn.Module, tensors: tuple[torch.Tensor, ...]) -> None:
        for t in tensors:
            for d in (module._parameters, module._buffers):
                name = next((n for n, v in d.items() if v is t), None)
                if name is not None:
                    self.slots.append((d, name))
                    break
            else:  # not registered under this module: only its storage can be watched
                self.slots.append(({"t": t}, "t"))

    def pointers(self) -> tuple[int, ...]:
        try:
            return tuple([d[n].data_ptr() for d, n in self.slots])
        except (KeyError, AttributeError):  # a tensor removed since: no build's pointers equal ()
            return ()


class Built(NamedTuple):
    """A FusedDecoder's build: the layers (kernels.DecodeLayer per model layer; None: the plain path runs)
    and what they were built from."""

    layers: list | None
    library: object  # kernels.library() they were built on (kernels.forced_isa can swap another in)
    watch: _Watch
    pointers: tuple[int, ...]


class FusedDecoder:
    """Transformer.decoder: runs a one-token step through the compiled layer step where the kernels take
    every layer's weights (returns None otherwise, and the model's plain path runs)."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.built: Built | None = None

    def invalidate(self) -> None:
        """Weights were replaced: build again at the next step."""
        self.built = None

    def __call__(self, h: torch.Tensor, rope: torch.Tensor, steps: list[Step],
                 cache: KVCache) -> tuple[torch.Tensor, list, list] | None:
        n = h.shape[0]
        fast = self.layers(h, cache) if n <= MAX_ROWS else None
        if fast is None or (n > 1 and not self.whole(fast)):
            return None
        if n > 1:  # each row's rotation computed alone, as its one-token step computes it
            a, positions = self.model.args, steps[self.model.owned[0]].positions
            rope = torch.cat([rotary_angles(positions[t:t + 1], a.head_dim, a.rope_theta) for t in range(n)])
        k = kernels_or_none()
        where: dict[int, object] = {}  # per buffer (its Step): the C side's slots and lengths
        experts, weights = [], []
        for i, layer in zip(self.model.owned, fast, strict=True):
            block, step = self.model.layers[i], steps[i]
            kv = cache.layer(i)
            if (slots := where.get(id(step))) is None:
                # token t reads the slots a one-token step at its position would: min(capacity, position + 1)
                cap = kv[0].shape[1]
                lengths = [step.length] if n == 1 else [min(cap, p + 1) for p in step.positions.tolist()]
                slots = where[id(step)] = k.Slots(step.slots.tolist() if n > 1 else [step.slot], lengths)
            # The layer's window reaches the C side as its step's mask, over its own buffer's slots.
            layer.attention(h, rope, *kv, slots, step.mask)
            if layer.has_ffn:
                layer.ffn(h)
                continue
            if layer.moe is not None:
                chosen, w = layer.moe(h, getattr(block.feed_forward, "decode_fetch", None))
            else:
                h, chosen, w = block.add_feed_forward(h)
            if chosen is not None:
                experts.append(chosen)
                weights.append(w)
        return h, experts, weights

    @staticmethod
    def whole(layers: list) -> bool:
        """Whether every layer runs entirely in C (a MoE layer the C side does not take runs in torch,
        whose sums depend on the row count)."""
        return all(layer.has_ffn or layer.moe is not None for layer in layers)

    def verifies(self, cache: KVCache, head: bool = True) -> bool:
        """Whether a step of several tokens gives each row what a one-token step gives it: every layer and
        (with `head`) the output projection in C."""
        with torch.no_grad():
            fast = self.layers(torch.zeros(2, self.model.args.dim), cache)
        return fast is not None and self.whole(fast) and (not head or _parts(self.model.output) is not None)

    def head(self, h: torch.Tensor) -> torch.Tensor | None:
        """Logits of several rows of h, each what the one-token step's norm and output projection give it;
        None for one row (the model's own head is that) or where the kernels do not take the output."""
        if h.shape[0] == 1 or (parts := _parts(self.model.output)) is None or (k := kernels_or_none()) is None:
            return None
        x = torch.cat([self.model.norm(h[t:t + 1]) for t in range(h.shape[0])])
        return k.linear_many(x, parts[0], [parts[1]], parts[2], exact_rows=True)[0]

    def layers(self, h: torch.Tensor, cache: KVCache) -> list | None:
        """The layers as kernels.DecodeLayer for a one-token step with residual h, or None where the plain
        path must run (no kernels, a weight format or shape they do not take, a GPU, gradients)."""
        if torch.is_grad_enabled() or (k := kernels_or_none()) is None \
                or not all(k.DecodeLayer.takes(h, b.k) for b in cache.buffers):
            return None
        built, library = self.built, k.library()
        if built is not None and built.library is library and built.watch.pointers() == built.pointers:
            return built.layers
        watch = _Watch()
        inputs = [self._inputs(self.model.layers[i], watch) for i in self.model.owned]
        layers = None if any(i is None for i in inputs) else self._build(k, inputs)
        self.built = Built(layers, library, watch, watch.pointers())
        return layers

    def _inputs(self, block: TransformerBlock, watch: _Watch) -> tuple | None:
        """kernels.DecodeLayer's arguments for this layer: (kind, group, the attention weights' kernel parts,
        the dense feed-forward's or None, the two norm weights, DecodeMoe's or None); None unless the
        attention and dense weights are all in one format."""
        a, ff = block.attention, block.feed_forward
        moe = isinstance(ff, MoeFeedForward)
        mods = [a.wq, a.wk, a.wv, a.wo] + ([] if moe else [ff.w1, ff.w2, ff.w3])
        parts = [_parts(m) for m in mods]
        if not _one_format(parts):
            return None
        for m, p in zip(mods, parts, strict=True):
            watch.add(m, p[1])
        watch.add(block.attention_norm, (block.attention_norm.weight,))
        watch.add(block.ffn_norm, (block.ffn_norm.weight,))
        tensors = [p[1] for p in parts]
        return parts[0][0], parts[0][2], tensors[:4], tensors[4:] or None, block.attention_norm.weight, \
            block.ffn_norm.weight, self._moe_inputs(ff, watch) if moe else None

    @staticmethod
    def _moe_inputs(moe: MoeFeedForward, watch: _Watch) -> tuple | None:
        """kernels.DecodeMoe's arguments (kind, group, top_k, router weight, per expert the parts of w1, w2,
        w3, whether w2 is transposed), or None where the kernels do not take this layer. Experts loaded on
        demand are None, and so is the kind: DecodeMoe learns it from the first expert it fetches."""
        gate = _parts(moe.gate)
        if gate is None or gate[0] != "bf16":
            return None
        watch.add(moe.gate, gate[1])
        if not isinstance(moe.experts, nn.ModuleList):  # on demand: the format comes with the first fetched expert
            if not hasattr(moe, "decode_fetch"):
                return None
            return None, 0, moe.top_k, gate[1][0], [None] * len(moe.experts), False, getattr(moe, "reduce", None)
        # An expert split across ranks (mixchat.distributed) holds `local` experts here, and reduces the sum.
        local, reduce = getattr(moe, "local", range(len(moe.experts))), getattr(moe, "reduce", None)
        found = [expert_parts(ex) if e in local else None for e, ex in enumerate(moe.experts)]
        held = [f for e, f in enumerate(found) if e in local]
        if not held or any(f is None for f in held) or len({f[0] for f in held}) != 1:
            return None
        for e in local:
            ex = moe.experts[e]
            for m in (ex.w1, ex.w2, ex.w3):
                watch.add(m, tuple(t for t in (*m._parameters.values(), *m._buffers.values()) if t is not None))
        (kind, group, transposed), experts = held[0][0], [f[1] if f is not None else None for f in found]
        return kind, group, moe.top_k, gate[1][0], experts, transposed, reduce

    def _build(self, k, inputs: list) -> list | None:
        a = self.model.args
        try:
            layers = [k.DecodeLayer(kind, group, a.n_heads, a.n_kv_heads, a.head_dim, a.norm_eps, attn_norm,
                                    ffn_norm, attn, ffn) for kind, group, attn, ffn, attn_norm, ffn_norm, _ in inputs]
        except ValueError:  # shapes the C side does not take (tiny test models)
            return None
        for layer, i in zip(layers, inputs, strict=True):
            if (moe := i[6]) is not None:
                try:
                    layer.moe = k.DecodeMoe(*moe[:3], a.norm_eps, i[5], *moe[3:])
                except ValueError:
                    layer.moe = None
        return layers
