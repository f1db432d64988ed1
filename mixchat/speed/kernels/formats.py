"""The weight and activation formats the kernels read, with one owner on the torch side.

int4: per row, q in 0..15 two to a byte, q[:, 2j] in the low nibble and q[:, 2j+1] in the high one; per
group of G columns (INT4_GROUPS) an fp16 scale and zero (INT4_PARAMS), w = (q - 8) * scale + zero in fp32.
fp16 rather than fp32 (0.8.0): at groups of 128 the scales and zeros were 11 % of what a decoded token reads,
now 6 % (llama.cpp's Q4_1 stores its scale and minimum the same way). quant.quantize_int4 rounds the scale
up to the next fp16, so each weight stays within half a stored step whatever the rounding (below 6.1e-5 fp16
scales are subnormal, spaced 6e-8 apart: only groups whose range is under 1e-3 meet that). csrc reads exactly
this layout, mixchat.speed.quant writes it (and caches it on disk), tests and benchmarks build it here.
mixchat.speed.qformat, which must import without torch, only counts its bytes.

Q8 (llama.cpp's Q8_0): x rounded to int8 per block of columns with one fp32 scale (max|x| / 127), what
the kernels do to x below the GEMM's rows; quantize_x_q8 is that rounding in torch, for references.
"""

from __future__ import annotations

import torch

INT4_GROUPS = (32, 64, 128)
INT4_PARAMS = torch.float16  # int4's scale and zero
# What each format's tensors are stored as: the weight itself, and its scale (and, for int4, zero)
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}
PARAM_DTYPES = {"int8": torch.float32, "int4": INT4_PARAMS}


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] integers in 0..15 -> uint8 [N, K/2], q[:, 2j] in the low nibble and q[:, 2j+1] in the high."""
    if q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"q must be [N, K] with K even, not {tuple(q.shape)}")
    if q.is_floating_point() or q.dtype == torch.bool:
        raise TypeError(f"q must be an integer tensor, not {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("q values must be in 0..15")
    q8 = q.to(torch.uint8)
    return (q8[:, 0::2] | (q8[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] in 0..15 (inverse of pack_int4)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 weight [N, K]: (q - 8) * scale + zero in fp32 (scale and zero widened exactly from fp16), per
    group of `group` along K (into `out`, an fp32 [N, K] tensor, if given: quantized layers dequantize into a
    reused scratch buffer)."""
    n, half = packed.shape
    k = 2 * half
    out = torch.empty(n, k, dtype=torch.float32, device=packed.device) if out is None else out
    pairs = out.view(n, half, 2)
    pairs[..., 0].copy_(packed & 15)
    pairs[..., 1].copy_(packed >> 4)
    g = out.view(n, k // group, group)
    return g.sub_(8).mul_(scale.float()[..., None]).add_(zero.float()[..., None]).view(n, k)


def q8_block(group: int) -> int:
    """Columns of x per int8 scale in linear_int4's default path: a whole group for groups of 128 (the
    kernel then adds a group's integer products before converting them), 32 otherwise."""
    return 128 if group == 128 else 32


def quantize_x_q8(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """What linear_int4's default path does to x, in torch: round x [T, K] (K % 32 == 0) to int8 in blocks
    of 32 with scale max|x| / 127, and return the dequantised fp32 values (for references and error checks)."""
    t, k = x.shape
    b = x.float().reshape(t, k // block, block)
    # Same arithmetic as the C side: v = rint(x * (127 / amax)), clamped to +-127, then v * (amax / 127).
    amax = b.abs().amax(dim=-1, keepdim=True)
    d = amax / 127
    # a true division: `127 / amax` would run as reciprocal(amax) * 127, one more rounding than the C
    # side's, which flips values a hair from .5 (seen: -117.49998 rounded the other way)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    v = torch.round(b * inv).clamp_(-127, 127)
    return (v * d).reshape(t, k)
