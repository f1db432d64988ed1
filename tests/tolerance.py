"""Tolerances from the numerical contract of a computation path, so that none is tuned to one CPU.

Two ways of computing the same thing differ by the roundings they do differently, and nothing else.
Every cross-path tolerance in the kernel and model tests is built here from these facts:

- Unit roundoff u (round to nearest: a value moves by at most u of itself): fp32 2^-24, bf16 2^-8
  (8 significant bits).
- A sum of n products accumulated in fp32, in any order and with or without fused multiply-adds, lies
  within gamma_n * sum|terms| of the exact sum, gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability
  of Numerical Algorithms, 2nd ed., section 3.1). Blocked or split sums, the kernels' AVX2 and scalar code,
  an AVX-512 build and torch's BLAS all meet it: they differ in the order, which the bound does not fix.
- Q8 (llama.cpp's Q8_0, kernels.quantize_x_q8): x rounded to int8 per block of 32 (or 128) columns with
  the scale absmax/127 moves each value by at most absmax/254 of its block.
- A flip: where both paths round to the same coarse format (a bf16 KV cache, Q8 activations) but their
  fp32 inputs differ by a hair, a value next to a rounding boundary lands on different neighbours. A flip
  costs one whole step: one bf16 ulp, at most 2u = 2^-7 of the value, or one int8 step, absmax/127.

One product (y = x @ w.T) gets rigorous elementwise bounds: `product_bound`, `q8_shift`.

End to end (a model's logits on two paths) a rigorous bound is useless: it grows like sqrt(K) per
product and ends far above the logits themselves. `Chain` estimates instead (an estimate, not a bound:
it takes the rounding errors within one sum to have random signs, where the worst case lines them all
up), per rounding the two paths do differently, how far it moves the logits relative to their
magnitude, and adds these up:
- an fp32 sum of k terms in another order: gamma_k (the probabilistic bound of Higham and Mary, SIAM J.
  Sci. Comput. 2019, is about sqrt(k) u sum|terms|, and sum|terms| is about sqrt(k) |sum| for terms of
  random sign);
- every element of a product's input rounded to a format of unit u: u (the K rounding errors, of random
  sign, add up to about u |y|); its output rounded: u (rigorous);
- a flip: one step. Flips are rare (an fp32 difference of ~gamma_k against a step of ~2^-7 hits one
  value in thousands), one moves a single term of a later sum, and a logit moves by a whole step of its
  magnitude only when sqrt(K) of them line up in it; one step per format that can flip covers that.
The stages add as if they all lined up (first order: each block's output is added to the residual
stream, RMSNorm divides the scale back out, softmax and SiLU have slopes of at most 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixchat.release.config import ModelArgs
from mixchat.speed import kernels

FP32 = 2.0**-24
FP64 = 2.0**-53
BF16 = 2.0**-8
BF16_FLIP = 2 * BF16  # one bf16 ulp, relative to the value
Q8_FLIP = 1 / 127  # one int8 step, relative to its block's largest |x|

# Roundings per term besides the K-term fp32 sum, by weight format, in the kernels and a torch reference
# that dequantises the weight: bf16 none (bf16 -> fp32 is exact); int8 the reference's q * scale and the
# kernels' scale; int4 the reference's (q - 8) * scale + zero and the kernels' scale, zero and offset
# products. Q8 activations add the reference's v * d and the kernels' block scale.
WEIGHT_ROUNDINGS = {"bf16": 0, "int8": 2, "int4": 4}
Q8_ROUNDINGS = 2


def gamma(n: int, u: float = FP32) -> float:
    """Higham's gamma_n: the relative bound on n successive roundings (of a sum of n products)."""
    if n * u >= 1:
        raise ValueError(f"gamma_{n} is unbounded for u = {u}")
    return n * u / (1 - n * u)


# ---------------------------------------------------------------------------------------------------
# One product: rigorous, elementwise


def magnitude(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_k |x_tk| |w_nk| for y = x @ w.T, in fp64: what every rounding in the sum is measured against.
    x [..., K] (flattened to [T, K]), w [N, K] (or int4_parts) -> [T, N]."""
    return x.double().reshape(-1, x.shape[-1]).abs() @ w.double().abs().T


def int4_parts(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """|w| for the rounding bounds of an int4 weight w = (q - 8) * scale + zero, [N, K] in fp64: the
    kernels sum its parts separately, where they may cancel: the AVX2 code scale * q * x and
    (zero - 8 scale) * x, the scalar code scale * (q - 8) * x and zero * x. Each term is bounded by the
    larger of the two splits."""
    q = kernels.unpack_int4(packed).double()
    n, k = q.shape
    q = q.view(n, k // group, group)
    s, z = scale.double()[..., None], zero.double()[..., None]
    avx2 = s.abs() * q + (z - 8 * s).abs()
    scalar = (s * (q - 8)).abs() + z.abs()
    return torch.maximum(avx2, scalar).view(n, k)


def product_bound(mag: torch.Tensor, k: int, roundings: int = 0, out_unit: float = 0.0) -> torch.Tensor:
    """Elementwise bound on |computed - exact| for one product whose terms have the magnitudes `mag`
    (magnitude()), computed by summing the k products in fp32 in any order with `roundings` more roundings
    per term (scales, zero points, a reference's own dequantisation), then rounding the result with unit
    out_unit (0: kept in fp32). Each rounding multiplies the worst case by (1 + its unit)."""
    return mag * ((1 + gamma(k + roundings)) * (1 + out_unit) - 1)


def q8_shift(x: torch.Tensor, w_abs: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Bound on how much rounding x [T, K] to Q8 in blocks of `block` moves y = x @ w.T, w_abs = |w|
    [N, K]: every x moves by at most its block's absmax / 254."""
    t, k = x.shape
    amax = x.double().abs().reshape(t, k // block, block).amax(-1)
    return amax.repeat_interleave(block, dim=1) / 254 @ w_abs.double().T


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor | float, what: str = "") -> None:
    """|got - want| <= bound elementwise, with the worst element in the message."""
    err = (got.double() - want.double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    over = err - bound
    i = int(over.flatten().argmax())
    assert (err <= bound).all(), f"{what}: error {err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g}"


# ---------------------------------------------------------------------------------------------------
# End to end: estimates (see the module docstring)


@dataclass(frozen=True)
class Chain:
    """The arithmetic a token's logits go through: `products` matrix products one after the other, `sums`
    reductions in all, the longest of `k` terms."""

    products: int
    sums: int
    k: int

    @classmethod
    def of(cls, args: ModelArgs, tokens: int) -> Chain:
        """Per layer q/k/v, wo, for MoE the router, w1/w3 and w2 (dense: no router), then the output
        projection; plus per layer two RMS norms, the attention scores and the weighted sum of values, over
        up to `tokens` positions."""
        per_layer = 5 if args.is_moe else 4
        products = args.n_layers * per_layer + 1
        k = max(args.dim, args.hidden_dim, args.n_heads * args.head_dim, tokens)
        return cls(products, products + 4 * args.n_layers, k)

    def reordered(self) -> float:
        """Both paths in fp32, summing in their own orders."""
        return self.sums * gamma(self.k)

    def rounded(self, unit: float, products: int | None = None) -> float:
        """One path rounds the input and the output of `products` (default: all) products to a format of
        unit `unit` where the other keeps fp32."""
        return 2 * unit * (self.products if products is None else products)


def tolerance(scale: float, *relative: float) -> float:
    """The tolerance on values of magnitude `scale` (the largest of those compared: logits, router logits,
    a layer's cached keys) that the relative perturbations (Chain's terms, flip steps) move."""
    return scale * sum(relative)


def decided(values: torch.Tensor, tol: float, top: int = 1) -> torch.Tensor:
    """Per row of values [..., n]: whether no perturbation of at most tol per value can change its `top`
    largest, in order (the argmax, a router's top-k best first): every gap among its top + 1 largest values
    exceeds 2 tol. Equality of such choices between two paths is only a sound check on these rows."""
    s = values.sort(dim=-1, descending=True).values[..., : top + 1]
    return (s[..., :-1] - s[..., 1:] > 2 * tol).all(dim=-1)


def assert_same_argmax(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """argmax agrees on every row whose top two logits are further apart than the paths may move them."""
    rows = decided(want, tol)
    assert torch.equal(got.argmax(-1)[rows], want.argmax(-1)[rows]), "argmax differs on a decided row"


def routed_alike(got: torch.Tensor, want: torch.Tensor, router_logits: torch.Tensor, tol: float) -> int:
    """Expert choices [T, layers, k] of two paths agree wherever the router (logits [T, layers, experts],
    from either path) left no near-tie within tol; returns how many leading tokens took the same experts
    in every layer. Past a token routed differently (a near-tie, decided either way within the contract)
    the paths compute different things, so only that many tokens can be compared."""
    rows = decided(router_logits, tol, got.shape[-1])
    same = (got == want).all(dim=-1)
    assert same[rows].all(), "the experts differ where the router's choice was clear"
    diverged = (~same.all(dim=-1)).nonzero()
    return int(diverged[0]) if len(diverged) else got.shape[0]
