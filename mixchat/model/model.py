"""Mistral and Mixtral in plain PyTorch, for one sequence at a time.

Parameter names equal the release's own (mistral-inference's experts layout for MoE), so loading is
a name-for-name assignment. The model owns no state besides its weights: the KV cache is passed in.
Each layer attends within its own sliding window (args.window(i), None: the whole sequence), which it
gets from the cache as its step's mask over its buffer's slots (Ministral mixes windowed and full layers).
Norms, rotary embeddings and softmax run in fp32 whatever the weight dtype, as the reference does
and because CPU bf16 reductions are both slow and lossy.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mixchat.model.cache import KVCache, Step
from mixchat.paths import env_flag
from mixchat.release.config import ModelArgs

_UPCAST_MIN_TOKENS = 4


@functools.cache
def _cpu_multiplies_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def native_bf16() -> bool:
    """Whether torch's bf16 matrix products are the fast ones on this CPU (AVX512-BF16 or AMX), which
    decides two paths: prompts of more than _KERNEL_MAX_ROWS tokens go through torch's bf16 GEMM rather
    than the kernels' (it rounds the activations and the result to bf16, where the kernels keep fp32), and
    without the kernels bf16 weights are multiplied as they are rather than upcast to fp32.

    CPUs without them run bf16 matrix-matrix products about 4x slower than fp32 ones (measured on an AVX2
    EPYC: a 128x4096 by 4096x14336 product takes 710 ms in bf16, 170 ms in fp32). mixchat's compiled
    kernels (kernels.py) take bf16 weights as they are, for one token and for a whole prompt. Without
    them, when several tokens go through a layer at once, the bf16 weight is copied into a reused fp32
    scratch buffer (20 ms: a fresh allocation would cost 200 ms in page faults) and multiplied in fp32.

    MIXCHAT_NATIVE_BF16=1 or 0 forces either answer (tests take both paths on any CPU; on one without
    native bf16 the forced path is slow, not wrong); unset, the CPU decides. Read here only, at each
    decision rather than once, so a test can set it: under a microsecond, next to a product of several
    rows (the kernels' one-token path never asks).
    """
    return env_flag("MIXCHAT_NATIVE_BF16", _cpu_multiplies_bf16())

_scratch = threading.local()


def fp32_scratch(shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The per-thread fp32 buffer weights are upcast or dequantized into (one for bf16 and quantized
    layers alike, sized by the largest weight)."""
    numel = torch.Size(shape).numel()
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel].view(shape)


def _fp32_copy(w: torch.Tensor) -> torch.Tensor:
    return fp32_scratch(w.shape).copy_(w)


# Where the CPU multiplies bf16 matrices natively, torch's GEMM beats the kernels' AVX2 one for prompts;
# the kernels still take decode and short prompts there, which are bound by reading the weights.
_KERNEL_MAX_ROWS = 16
_kernels_module: object = None  # mixchat.speed.kernels once imported; False: do not use it (tests force torch's path)


def kernels_or_none():
    """mixchat.speed.kernels' compiled bf16 matrix-vector product: torch's bf16 GEMV streams the weights at
    about half the memory read rate on AVX2 CPUs, and decode is nothing but that (see kernels.py).
    Asked every time rather than cached, so a library that kernels.forced_isa swaps in is followed."""
    global _kernels_module
    if _kernels_module is None:
        from mixchat.speed import kernels

        _kernels_module = kernels
    return _kernels_module if _kernels_module and _kernels_module.available() else None


def _upcast(n_tokens: int, t: torch.Tensor) -> bool:
    return n_tokens >= _UPCAST_MIN_TOKENS and t.dtype == torch.bfloat16 and t.device.type == "cpu" \
        and not native_bf16()


class Linear(nn.Linear):
    """nn.Linear without bias; bf16 weights on CPU go through mixchat.speed.kernels when they are available."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # The torrent layout's w2 is a transposed view, which the kernels read as it lies.
        transposed = not w.is_contiguous() and w.t().is_contiguous()
        if w.dtype == torch.bfloat16 and w.device.type == "cpu" and (transposed or w.is_contiguous()) \
                and not torch.is_grad_enabled() and (x.shape[0] <= _KERNEL_MAX_ROWS or not native_bf16()) \
                and (k := kernels_or_none()) is not None:
            return k.linear_bf16(x, w).to(x.dtype)
        # Without the kernels, torch's bf16 product takes 455 ms for one Mixtral expert's transposed
        # w2 on AVX2, an fp32 copy (made in the view's own layout) and product about 30 ms, so it is
        # upcast even for one token.
        if _upcast(_UPCAST_MIN_TOKENS if transposed else x.shape[0], w):
            return F.linear(x.float(), _fp32_copy(w.t()).t() if transposed else _fp32_copy(w)).to(x.dtype)
        return F.linear(x.to(w.dtype), w).to(x.dtype)

    def kernel_parts(self) -> tuple[str, tuple[torch.Tensor, ...], int] | None:
        """What mixchat.speed.kernels.linear_many takes for this layer, or None where it does not take it."""
        w = self.weight
        if w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous():
            return "bf16", (w,), 0
        return None


def project(x: torch.Tensor, *layers: nn.Module) -> list[torch.Tensor]:
    """[layer(x) for layer in layers], in one kernel call when all of them allow it (see
    kernels.linear_many: for one decoded token, a thread-pool fork/join less per weight)."""
    if x.shape[0] <= 8 and x.device.type == "cpu" and not torch.is_grad_enabled() \
            and (k := kernels_or_none()) is not None:
        parts = [getattr(layer, "kernel_parts", lambda: None)() for layer in layers]
        if all(p is not None for p in parts) and len({(p[0], p[2]) for p in parts}) == 1:
            try:
                return [y.to(x.dtype) for y in k.linear_many(x, parts[0][0], [p[1] for p in parts], parts[0][2])]
            except ValueError:  # shapes the kernels do not take (tiny test models): one layer at a time
                pass
    return [layer(x) for layer in layers]


def residual_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of the residual stream for a model whose embedding is `weight`. On CPU a bf16 model
    keeps it in fp32 (as llama.cpp does): every product there runs in fp32 anyway (the kernels take and
    give fp32, torch's bf16 CPU ops are slow), so bf16 activations only added two conversions per
    layer and per weight, about a tenth of a 7B decode step. On GPUs it is the weights' dtype."""
    return torch.float32 if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 else weight.dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


@functools.cache
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """e^(i * position * theta^(-2j/head_dim)) as complex64 [T, head_dim/2]: the rotation of pair j."""
    angles = positions.float()[:, None] * _inv_freq(head_dim, theta, positions.device)[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as the complex number x[2i] + i*x[2i+1].

    This is the layout Mistral's weights were trained with; Hugging Face's half-split rotate_half
    only gives the same result after permuting the rows of wq and wk. One complex multiply rather
    than the cos/sin arithmetic: a decode step runs this 64 times, and each torch op costs microseconds.
    """
    t, h, d = x.shape  # [T, heads, head_dim]
    pairs = torch.view_as_complex(x.float().reshape(t, h, d // 2, 2))
    return torch.view_as_real(pairs * rotation[:, None, :]).view(t, h, d).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, step: Step,
                kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        t = x.shape[0]
        nkv, hd = self.n_kv_heads, self.head_dim
        q, k, v = project(x, self.wq, self.wk, self.wv)
        q = apply_rotary(q.view(t, self.n_heads, hd), rope)  # [T, H, hd]
        k = apply_rotary(k.view(t, nkv, hd), rope)  # [T, Hkv, hd]
        v = v.view(t, nkv, hd)
        cache_k, cache_v = kv  # this layer's [Hkv, capacity, hd]
        cache_k[:, step.slots] = k.transpose(0, 1).to(cache_k.dtype)
        cache_v[:, step.slots] = v.transpose(0, 1).to(cache_v.dtype)
        keys, values = cache_k[:, : step.length], cache_v[:, : step.length]  # [Hkv, S, hd]
        # A bf16 cache with fp32 queries (residual_dtype), or a prefill: the same slow-bf16-matmul reason
        # as in Linear.
        if keys.dtype != q.dtype or _upcast(t, keys):
            q, keys, values = q.float(), keys.float(), values.float()
        # Grouped-query attention without repeating keys (query head h uses kv head h // (H / Hkv)); the
        # mask (causal, and this layer's window) is [T, S], shared by all heads.
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=step.mask,
                                             enable_gqa=True)  # [H, T, hd]
        return self.wo(out.transpose(0, 1).reshape(t, -1).to(x.dtype))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden_dim)
        self.w2 = Linear(hidden_dim, dim)
        self.w3 = Linear(dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.w1, self.w3)
        return self.w2(F.silu(gate) * up)


class MoeFeedForward(nn.Module):
    """Sparse mixture of experts: each token goes to the top-k experts by gate logit, mixed with a
    softmax over those k logits (equal to softmax-over-all then renormalising the chosen k)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.moe.num_experts_per_tok
        self.gate = Linear(args.dim, args.moe.num_experts)
        self.experts = nn.ModuleList(FeedForward(args.dim, args.hidden_dim) for _ in range(args.moe.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        top_logits, chosen = torch.topk(self.gate(x), self.top_k, dim=-1)  # [T, k] best first
        weights = torch.softmax(top_logits.float(), dim=-1)  # [T, k]
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            tokens, rank = torch.where(chosen == e)
            y = self.experts[e](x[tokens]) * weights[tokens, rank, None].to(x.dtype)
            out.index_add_(0, tokens, y)
        return out, chosen, weights


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoeFeedForward(args) if args.is_moe else FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, rope, step, kv):
        h = x + self.attention(self.attention_norm(x), rope, step, kv)
        return self._feed_forward(h)

    def decode(self, fast, h, rope, step, kv):
        """forward() for one token through kernels.DecodeLayer `fast`: h is updated in place. The layer's
        window reaches the C side as its step's mask, over its own buffer's slots."""
        fast.attention(h, rope, *kv, step.slot, step.length, step.mask)
        if fast.has_ffn:
            fast.ffn(h)
            return h, None, None
        if fast.moe is not None:
            chosen, weights = fast.moe(h, getattr(self.feed_forward, "decode_fetch", None))
            return h, chosen, weights
        return self._feed_forward(h)

    def _feed_forward(self, h):
        ff = self.feed_forward(self.ffn_norm(h))
        if isinstance(ff, tuple):
            return h + ff[0], ff[1], ff[2]
        return h + ff, None, None


# Counts parameter, buffer and module assignments anywhere (torch's global registration hooks), so that
# decode_layers looks at the weights again only after something was replaced.
_registrations = 0


def _registered(*_) -> None:
    global _registrations
    _registrations += 1


_data_ptr = torch.Tensor.data_ptr
nn.modules.module.register_module_parameter_registration_hook(_registered)
nn.modules.module.register_module_buffer_registration_hook(_registered)
nn.modules.module.register_module_module_registration_hook(_registered)


# One decoded token goes through csrc/decode.c, a call per attention block and per dense feed-forward,
# where the kernels take every weight of the model (tests switch it off to compare with the plain path).
fused_decode = True


def _decode_inputs(layer: TransformerBlock) -> tuple | None:
    """kernels.DecodeLayer's arguments for this layer: (kind, group, the attention weights' kernel parts,
    the dense feed-forward's or None, the two norm weights, _moe_inputs or None); None unless the
    attention and dense weights are all in one format."""
    a, ff = layer.attention, layer.feed_forward
    moe = isinstance(ff, MoeFeedForward)
    mods = [a.wq, a.wk, a.wv, a.wo] + ([] if moe else [ff.w1, ff.w2, ff.w3])
    parts = [getattr(m, "kernel_parts", lambda: None)() for m in mods]
    if any(p is None for p in parts) or len({(p[0], p[2]) for p in parts}) != 1:
        return None
    tensors = [p[1] for p in parts]
    return parts[0][0], parts[0][2], tensors[:4], tensors[4:] or None, layer.attention_norm.weight, \
        layer.ffn_norm.weight, _moe_inputs(ff) if moe else None


def expert_parts(ex: nn.Module) -> tuple[tuple[str, int, bool], tuple] | None:
    """((kind, group, w2 transposed), the kernel parts of w1, w2, w3) of one expert, or None where the
    kernels do not take it. A bf16 torrent-layout w2 (a transposed view) is given as the model holds it."""
    w2 = getattr(ex.w2, "weight", None)
    t = isinstance(ex.w2, Linear) and w2.dtype == torch.bfloat16 and w2.device.type == "cpu" \
        and not w2.is_contiguous() and w2.t().is_contiguous()
    parts = [getattr(m, "kernel_parts", lambda: None)() for m in (ex.w1, ex.w3)]
    parts.insert(1, ("bf16", (w2,), 0) if t else getattr(ex.w2, "kernel_parts", lambda: None)())
    if any(p is None for p in parts) or len({(p[0], p[2]) for p in parts}) != 1:
        return None
    return (parts[0][0], parts[0][2], t), tuple(p[1] for p in parts)


def _moe_inputs(moe: MoeFeedForward) -> tuple | None:
    """kernels.DecodeMoe's arguments (kind, group, top_k, router weight, per expert the parts of w1, w2,
    w3, whether w2 is transposed), or None where the kernels do not take this layer. Experts loaded on demand
    are None, and so is the kind: DecodeMoe learns it from the first expert it fetches."""
    gate = getattr(moe.gate, "kernel_parts", lambda: None)()
    if gate is None or gate[0] != "bf16":
        return None
    if not isinstance(moe.experts, nn.ModuleList):  # on demand: the format comes with the first fetched expert
        if not hasattr(moe, "decode_fetch"):
            return None
        return None, 0, moe.top_k, gate[1][0], [None] * len(moe.experts), False
    found = [expert_parts(ex) for ex in moe.experts]
    if any(f is None for f in found) or len({f[0] for f in found}) != 1:
        return None
    (kind, group, transposed), experts = found[0][0], [f[1] for f in found]
    return kind, group, moe.top_k, gate[1][0], experts, transposed


def _tensors(inputs: tuple | None) -> list:
    """The tensors decode_layers' fused layers were built from, to notice a replaced one."""
    if inputs is None:
        return [None]
    out = [t for parts in inputs[2] + (inputs[3] or []) for t in parts] + list(inputs[4:6])
    moe = inputs[6]
    if moe is None:
        return out + [None]
    return out + [moe[3]] + [t for ex in moe[4] if ex is not None for p in ex for t in p]


class _DecodeBuild(NamedTuple):
    """Transformer.decode_layers' fused layers and what they were built from."""

    key: list  # _tensors() of every layer: the weight objects, None where a layer has no such part
    layers: list | None  # kernels.DecodeLayer per layer; None: the plain path runs
    registrations: int  # _registrations when they were checked
    tensors: list  # the weights in key, to see a moved pointer (a .data swap)
    pointers: tuple[int, ...]  # their data_ptr() then
    library: object  # kernels.library() they were built on (kernels.forced_isa can swap another in)


@dataclass
class Output:
    logits: torch.Tensor  # [T, vocab] fp32 (only the last row when last_only)
    experts: torch.Tensor | None  # [T, n_layers, top_k] expert ids, best first (MoE only)
    expert_weights: torch.Tensor | None  # [T, n_layers, top_k] fp32 mixing weights (MoE only)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)

    def decode_layers(self, h: torch.Tensor, cache: KVCache) -> list | None:
        """The layers as kernels.DecodeLayer for a one-token step with residual h, or None where the plain
        path must run (no kernels, a weight format or shape they do not take, a GPU, gradients)."""
        if not fused_decode or torch.is_grad_enabled() or (k := kernels_or_none()) is None \
                or not all(k.DecodeLayer.takes(h, b.k) for b in cache.buffers):
            return None
        # The C side holds raw pointers, so the layers are rebuilt whenever a weight was replaced: a new
        # parameter, buffer or module anywhere (quantization, an assignment) bumps _registrations, and a
        # `.data` swap (Module.to) moves a pointer. Walking the model again costs ~0.3 ms per Mixtral layer.
        built: _DecodeBuild | None = getattr(self, "_decode_built", None)
        library = k.library()
        if built is not None and built.registrations == _registrations and built.library is library \
                and tuple(map(_data_ptr, built.tensors)) == built.pointers:
            return built.layers
        registrations = _registrations
        inputs = [_decode_inputs(layer) for layer in self.layers]
        key = [t for i in inputs for t in _tensors(i)]
        tensors = [t for t in key if t is not None]
        pointers = tuple(map(_data_ptr, tensors))
        same = built is not None and len(built.key) == len(key) and pointers == built.pointers \
            and built.library is library and all(x is y for x, y in zip(built.key, key, strict=True))
        layers = built.layers if same else self._build_decode(k, inputs)
        self._decode_built = _DecodeBuild(key, layers, registrations, tensors, pointers, library)
        return layers

    def _build_decode(self, k, inputs: list) -> list | None:
        a = self.args
        if any(i is None for i in inputs):
            return None
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

    # no_grad, not inference_mode: the cache may grow inside forward, and inference tensors could
    # not be updated in place afterwards (rewind, restore).
    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False) -> Output:
        """Run `tokens` ([T] ids) after what `cache` holds, in chunks of cache.chunk_size tokens,
        so a long prompt needs chunk x window memory, never T x T."""
        logits, experts, weights = [], [], []
        total = tokens.shape[0]
        for start in range(0, total, cache.chunk_size):
            chunk = tokens[start : start + cache.chunk_size]
            is_last = start + chunk.shape[0] >= total
            out = self._step(chunk, cache, "all" if not last_only else "last" if is_last else "none")
            if out.logits is not None:
                logits.append(out.logits)
            if out.experts is not None:
                experts.append(out.experts)
                weights.append(out.expert_weights)
        return Output(
            logits=torch.cat(logits),
            experts=torch.cat(experts) if experts else None,
            expert_weights=torch.cat(weights) if weights else None,
        )

    def _step(self, tokens: torch.Tensor, cache: KVCache, rows: str) -> Output:
        steps = cache.prepare(tokens.shape[0])  # per layer: where its buffer takes the chunk, its window's mask
        rope = rotary_angles(steps[0].positions, self.args.head_dim, self.args.rope_theta)
        h = self.tok_embeddings(tokens).to(residual_dtype(self.tok_embeddings.weight))  # [T, D]
        fast = self.decode_layers(h, cache) if tokens.shape[0] == 1 else None
        experts, weights = [], []
        for i, layer in enumerate(self.layers):
            if fast:
                h, chosen, w = layer.decode(fast[i], h, rope, steps[i], cache.layer(i))
            else:
                h, chosen, w = layer(h, rope, steps[i], cache.layer(i))
            if chosen is not None:
                experts.append(chosen)
                weights.append(w)
        cache.advance(tokens.shape[0])
        # Only the rows that are asked for go through the vocab projection (a [T, 32000] matmul).
        logits = None if rows == "none" else self.output(self.norm(h if rows == "all" else h[-1:])).float()
        return Output(
            logits=logits,
            experts=torch.stack(experts, dim=1) if experts else None,
            expert_weights=torch.stack(weights, dim=1) if weights else None,
        )
