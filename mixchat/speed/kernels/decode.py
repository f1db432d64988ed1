"""One decoded token through a whole layer in C (csrc: decode.c): DecodeLayer for the attention block
and a dense feed-forward, DecodeMoe for a Mixtral feed-forward, and the ctypes structs they fill.

The C side holds raw pointers into the tensors these objects were built from, which keep them alive;
mixchat.speed.decoder decides when to build them and when they are stale.
"""

from __future__ import annotations

import ctypes

import torch

from mixchat.speed.kernels.formats import PARAM_DTYPES, WEIGHT_DTYPES
from mixchat.speed.kernels.linear import _MULTI_KINDS, _check_int4_k, _check_weight
from mixchat.speed.kernels.loader import KernelError, _call, _get


class _LayerStruct(ctypes.Structure):
    """mc_layer in csrc, field for field (check_struct_sizes compares the sizes where the library says)."""

    _fields_ = [*((name, ctypes.c_int32) for name in ("kind", "group", "n_heads", "n_kv_heads", "head_dim", "has_ffn",
                                                      "norm_bf16", "unused")),
                ("dim", ctypes.c_int64), ("hidden", ctypes.c_int64), ("eps", ctypes.c_float),
                ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("w", ctypes.c_void_p * 7),
                ("scale", ctypes.c_void_p * 7), ("zero", ctypes.c_void_p * 7)]


_CACHE_DTYPES = {torch.bfloat16: 1, torch.float32: 0}  # KV cache and norm weights: the "is bf16" flag
MAX_ROWS = 64  # tokens one decode call takes (decode.c)


class Slots:
    """Where each of T tokens writes its key (slot) and how many slots it reads (length), as the C side
    takes them: built once per step and buffer, shared by that buffer's layers."""

    def __init__(self, slots: list[int], lengths: list[int]) -> None:
        self.n = len(slots)
        self.slot = (ctypes.c_int64 * self.n)(*slots)
        self.length = (ctypes.c_int64 * self.n)(*lengths)


def _simd_lib() -> ctypes.CDLL:
    lib = _get()
    if lib is None or not lib.mc_simd():
        raise ValueError("the compiled AVX2+FMA kernels are not loaded")
    return lib


def _check_decode_k(kind: str, k: int, group: int) -> None:
    """What the one-pass kernels need of K for a weight in `kind` (decode.c's layer_ok and mc_decode_moe)."""
    if kind == "int4":
        _check_int4_k(k, group)
    elif kind == "int8" and k % 32:
        raise ValueError(f"int8 decode needs K % 32 == 0 (K={k})")


def _check_parts(kind: str, parts: list[tuple[torch.Tensor, ...]], shapes: list[tuple[int, int]],
                 transposed: int | None = None) -> None:
    """Kernel parts (see linear_many) in `kind` for weights of logical shapes [N, K]; parts[transposed], if
    given, is the [N, K] view of a contiguous bf16 [K, N] tensor (the torrent layout's w2)."""
    wide = 2 if kind == "int4" else 1
    for i, (p, (n, k)) in enumerate(zip(parts, shapes, strict=True)):
        _check_weight(p[0].t() if i == transposed else p[0], "w", WEIGHT_DTYPES[kind])
        if tuple(p[0].shape) != (n, k // wide):
            raise ValueError(f"weight of shape {list(p[0].shape)} where the layer needs {[n, k // wide]}")
        for t in p[1:]:
            _check_weight(t, "scale", PARAM_DTYPES[kind], dim=t.dim())


class DecodeLayer:
    """A transformer layer as csrc/decode.c takes it: for one decoded token, the attention block and the
    dense feed-forward are one call each (norm, products, rotary, cache write, attention, activation and
    residual in C) instead of about forty torch ops.

    attn holds the kernel parts (see linear_many) of wq, wk, wv, wo; ffn those of w1, w2, w3, or None
    (MoE layers: the experts stay in Python). All in one format. Raises ValueError for anything the C
    side does not take, so the caller can keep the plain path.
    """

    def __init__(self, kind: str, group: int, n_heads: int, n_kv_heads: int, head_dim: int, eps: float,
                 attn_norm: torch.Tensor, ffn_norm: torch.Tensor, attn: list[tuple[torch.Tensor, ...]],
                 ffn: list[tuple[torch.Tensor, ...]] | None) -> None:
        lib = _simd_lib()
        if kind not in _MULTI_KINDS:
            raise ValueError(f"kind must be one of {sorted(_MULTI_KINDS)}, not {kind!r}")
        dim, qd, kvd = attn_norm.shape[0], n_heads * head_dim, n_kv_heads * head_dim
        parts = attn + (ffn or [])
        hidden = ffn[0][0].shape[0] if ffn else 0
        want = [(qd, dim), (kvd, dim), (kvd, dim), (dim, qd)] + ([(hidden, dim), (dim, hidden), (hidden, dim)] if ffn
                                                                 else [])
        for _, k in want:
            _check_decode_k(kind, k, group)
        _check_parts(kind, parts, want)
        norms = (attn_norm, ffn_norm)
        if any(w.dtype != attn_norm.dtype or w.dtype not in _CACHE_DTYPES or not w.is_contiguous() or not w.is_cpu
               or tuple(w.shape) != (dim,) for w in norms):
            raise ValueError("the norm weights must be contiguous [dim] tensors, both bf16 or both fp32")
        self._parts, self._norms = parts, norms  # the C side holds their pointers: keep them alive
        s = _LayerStruct(kind=_MULTI_KINDS[kind], group=group, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         head_dim=head_dim, has_ffn=int(ffn is not None),
                         norm_bf16=_CACHE_DTYPES[attn_norm.dtype], dim=dim, hidden=hidden, eps=eps,
                         attn_norm=attn_norm.data_ptr(), ffn_norm=ffn_norm.data_ptr())
        order = [0, 1, 2, 3] + ([4, 5, 6] if ffn else [])
        for i, p in zip(order, parts, strict=True):
            s.w[i] = p[0].data_ptr()
            if len(p) > 1:
                s.scale[i] = p[1].data_ptr()
            if len(p) > 2:
                s.zero[i] = p[2].data_ptr()
        self._struct = s
        self._ref = ctypes.byref(s)
        self._lib = lib
        self.has_ffn = ffn is not None
        self.moe: DecodeMoe | None = None  # set by the caller for a MoE layer the C side takes whole

    def attention(self, h: torch.Tensor, rotation: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: Slots, mask: torch.Tensor | None) -> None:
        """h (fp32 [T, dim], contiguous) += the attention block for T tokens, token t at cache slot
        slots.slot[t] reading slots [0, slots.length[t]). rotation: complex64 [T, head_dim/2];
        k_cache/v_cache: this layer's [n_kv_heads, capacity, head_dim] (bf16 or fp32); mask (bool
        [T, L], L >= every length, contiguous) says which slots each token reads; None: all of them.
        Each row is what a one-token call gives it (T > 1 is drafting's verify pass; see decode.c)."""
        _call(self._lib, "mc_decode_attention", self._ref, h.data_ptr(), slots.n, rotation.data_ptr(),
              k_cache.data_ptr(), v_cache.data_ptr(), _CACHE_DTYPES[k_cache.dtype], k_cache.shape[1], slots.slot,
              slots.length, None if mask is None else mask.data_ptr(), 0 if mask is None else mask.shape[1])

    def ffn(self, h: torch.Tensor) -> None:
        """h (fp32 [T, dim], contiguous) += the dense feed-forward of T tokens, row by row as for one."""
        _call(self._lib, "mc_decode_ffn", self._ref, h.data_ptr(), h.shape[0])

    @staticmethod
    def takes(h: torch.Tensor, k_cache: torch.Tensor) -> bool:
        """Whether a step with this residual and cache can go through DecodeLayer."""
        return h.dtype == torch.float32 and 1 <= h.shape[0] <= MAX_ROWS and h.is_contiguous() and h.is_cpu \
            and k_cache.dtype in _CACHE_DTYPES and k_cache.is_contiguous()


class _MoeStruct(ctypes.Structure):
    """mc_moe in csrc, field for field."""

    _fields_ = [*((name, ctypes.c_int32) for name in ("kind", "group", "n_experts", "top_k", "norm_bf16",
                                                      "w2_transposed")),
                ("dim", ctypes.c_int64), ("hidden", ctypes.c_int64), ("eps", ctypes.c_float),
                ("ffn_norm", ctypes.c_void_p), ("gate", ctypes.c_void_p), ("w", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p)]


class DecodeMoe:
    """A Mixtral feed-forward as csrc/decode.c takes it: for one decoded token, norm, router, top-k and the
    chosen experts in one call. gate: the bf16 router [n_experts, dim]; experts: per expert the kernel parts
    of w1, w2, w3 (see linear_many), all in one format; w2_transposed: every w2 is the [dim, hidden] view of
    a contiguous bf16 [hidden, dim] tensor (the torrent layout). Experts loaded on demand: kind None and
    every expert None; they come through __call__'s fetch, the first of them setting the format. Raises
    ValueError for anything the C side does not take."""

    def __init__(self, kind: str | None, group: int, top_k: int, eps: float, ffn_norm: torch.Tensor,
                 gate: torch.Tensor, experts: list[tuple[tuple[torch.Tensor, ...], ...] | None],
                 w2_transposed: bool = False, reduce=None) -> None:
        lib = _simd_lib()
        # reduce(part): expert split across ranks (mixchat.distributed). The experts given are this rank's (the
        # others None); their part of the sum is added across ranks by reduce before it joins the residual.
        self.reduce = reduce
        _check_weight(gate, "gate", torch.bfloat16)
        n_experts, dim = gate.shape
        if len(experts) != n_experts or not 1 <= top_k <= n_experts or n_experts > 256:
            raise ValueError(f"{len(experts)} experts for a router of {n_experts}, top {top_k}")
        if ffn_norm.dtype not in _CACHE_DTYPES or not ffn_norm.is_contiguous() or tuple(ffn_norm.shape) != (dim,):
            raise ValueError("the norm weight must be a contiguous bf16 or fp32 [dim] tensor")
        self._dims = (dim, 0)
        self._kind: str | None = None
        arr = ctypes.c_void_p * (3 * n_experts)
        self._w, self._scale, self._zero = arr(), arr(), arr()
        self._experts: list = [None] * n_experts  # the C side holds their pointers: keep them alive
        self._keep = (gate, ffn_norm)
        s = _MoeStruct(n_experts=n_experts, top_k=top_k, norm_bf16=_CACHE_DTYPES[ffn_norm.dtype], dim=dim, eps=eps,
                       ffn_norm=ffn_norm.data_ptr(), gate=gate.data_ptr(), w=ctypes.addressof(self._w),
                       scale=ctypes.addressof(self._scale), zero=ctypes.addressof(self._zero))
        self._struct, self._ref, self._lib, self.top_k = s, ctypes.byref(s), lib, top_k
        if kind is not None:
            known = [ex for ex in experts if ex is not None]
            if not known or (len(known) != n_experts and reduce is None):
                raise ValueError("resident experts must all be given")
            self._configure((kind, group, w2_transposed), known[0])
            for e, ex in enumerate(experts):
                if ex is not None:
                    self._check_expert(ex)
                    self._set(e, ex)

    def _configure(self, fmt: tuple[str, int, bool], ex: tuple[tuple[torch.Tensor, ...], ...]) -> None:
        """Set the experts' format from (kind, group, w2 transposed) and one expert's parts."""
        kind, group, transposed = fmt
        if kind not in _MULTI_KINDS or (transposed and kind != "bf16"):
            raise ValueError(f"kind must be one of {sorted(_MULTI_KINDS)} (bf16 for a transposed w2), not {kind!r}")
        dim, hidden = self._dims[0], ex[0][0].shape[0]
        for k in (dim, hidden):
            _check_decode_k(kind, k, group)
        self._kind, self._transposed, self._dims = kind, transposed, (dim, hidden)
        st = self._struct
        st.kind, st.group, st.w2_transposed, st.hidden = _MULTI_KINDS[kind], group, int(transposed), hidden
        self._fmt = fmt

    def _check_expert(self, ex: tuple[tuple[torch.Tensor, ...], ...]) -> None:
        dim, hidden = self._dims
        _check_parts(self._kind, list(ex), [(hidden, dim), (dim, hidden), (hidden, dim)],
                     transposed=1 if self._transposed else None)

    def _set(self, e: int, ex: tuple[tuple[torch.Tensor, ...], ...]) -> None:
        for i, p in enumerate(ex):
            self._w[3 * e + i] = p[0].data_ptr()
            self._scale[3 * e + i] = p[1].data_ptr() if len(p) > 1 else None
            self._zero[3 * e + i] = p[2].data_ptr() if len(p) > 2 else None
        self._experts[e] = ex

    def __call__(self, h: torch.Tensor, fetch=None) -> tuple[torch.Tensor, torch.Tensor]:
        """h (fp32 [T, dim], contiguous) += the MoE feed-forward; returns the chosen experts (int64 [T, top_k],
        best first) and their mixing weights (fp32 [T, top_k]), as MoeFeedForward does, each row what a
        one-token call gives it.

        fetch(xn, chosen) -> per chosen expert ((kind, group, w2 transposed), the parts of w1, w2, w3): for
        experts loaded on demand, called between routing and the experts with every expert some token chose
        (xn: the normed input, fp32 [T, dim], for predicting the next layer). The first fetched expert sets
        the format when kind was None."""
        t = h.shape[0]
        chosen = torch.empty(t, self.top_k, dtype=torch.int64)
        weights = torch.empty(t, self.top_k, dtype=torch.float32)
        xn = torch.empty(t, self._dims[0], dtype=torch.float32)
        args = (self._ref, h.data_ptr(), t, xn.data_ptr(), chosen.data_ptr(), weights.data_ptr())
        if fetch is None and self.reduce is None:
            _call(self._lib, "mc_decode_moe", *args, 3)
            return chosen, weights
        _call(self._lib, "mc_decode_moe", *args, 1)
        ids = sorted(set(chosen.flatten().tolist())) if fetch is not None else []  # each chosen expert once
        for e, got in zip(ids, fetch(xn, ids) if ids else [], strict=True):
            if got is None:  # another rank's (the expert split)
                continue
            fmt, ex = got
            if self._kind is None:
                self._configure(fmt, ex)
            elif fmt != self._fmt:
                raise ValueError(f"an expert in format {fmt}, the others in {self._fmt}")
            self._check_expert(ex)
            self._set(e, ex)
        try:
            if self.reduce is None:
                _call(self._lib, "mc_decode_moe", *args, 2)
            else:
                # This rank's experts into zeros (0 + x is x), the ranks' parts summed, then the residual: with
                # top-2 routing at most two parts are not zero, so the sum is one process's in any order.
                part = torch.zeros_like(h)
                if self._kind is not None:  # else no expert of this rank's has been seen yet: its part is zero
                    _call(self._lib, "mc_decode_moe", self._ref, part.data_ptr(), *args[2:], 6)
                self.reduce(part)
                h += part
        finally:  # hold no fetched expert past the call: the on-demand cache must be able to free it
            for e in ids:
                self._w[3 * e: 3 * e + 3] = [None] * 3
                self._experts[e] = None
        return chosen, weights


_STRUCTS = {0: ("mc_layer", _LayerStruct), 1: ("mc_moe", _MoeStruct)}  # mc_struct_size's `which`


def check_struct_sizes(lib: ctypes.CDLL) -> None:
    """Raise KernelError where a struct here and its C twin differ in size: a field added on one side
    only would have the C side read pointers from the wrong place. Libraries built before the C side
    exported mc_struct_size are not checked."""
    size = getattr(lib, "mc_struct_size", None)
    if size is None:
        return
    size.argtypes, size.restype = [ctypes.c_int], ctypes.c_int64
    for which, (name, struct) in _STRUCTS.items():
        if (c := size(which)) != ctypes.sizeof(struct):
            raise KernelError(f"struct {name} is {c} bytes in the library, {ctypes.sizeof(struct)} in Python")
