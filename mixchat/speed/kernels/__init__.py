"""Compiled kernels (mixchat/speed/csrc) for linear layers on CPU with bf16, int8 and int4 weights, and
for one decoded token through a whole layer. One module per job:

    loader     building, loading and self-checking the library; ISA builds; threads; availability
    linear     linear_bf16, linear_int8, linear_int4, linear_many and their argument checks
    formats    the int4 and Q8 formats (pack_int4, dequantize_int4, quantize_x_q8, ...)
    decode     DecodeLayer and DecodeMoe: one token through a layer in C, and their ctypes structs
    selfcheck  the kernels against torch, once after loading

This package re-exports what the rest of mixchat, the tests and the benchmarks call, so they can write
`kernels.linear_bf16(...)`; mixchat.speed.linear and mixchat.speed.decoder plug them into the model.
"""

from mixchat.speed.kernels.decode import DecodeLayer, DecodeMoe, Slots
from mixchat.speed.kernels.formats import (
    INT4_GROUPS,
    INT4_PARAMS,
    dequantize_int4,
    pack_int4,
    q8_block,
    quantize_x_q8,
    unpack_int4,
)
from mixchat.speed.kernels.linear import MULTI_MAX, bf16_x, linear_bf16, linear_int4, linear_int8, linear_many
from mixchat.speed.kernels.loader import (
    FLAGS,
    GEMM_MIN_ROWS,
    ISAS,
    SIMD_LEVELS,
    KernelError,
    available,
    bf16dot,
    build,
    cache_root,
    forced_isa,
    get_gemm_min_rows,
    get_num_threads,
    isa_flags,
    library,
    read_probe,
    reapply_settings,
    reason,
    requested_isa,
    set_gemm_bf16dot,
    set_gemm_min_rows,
    set_num_threads,
    set_transposed_split,
    settle,
    simd,
    simd_level,
    source,
)
from mixchat.speed.kernels.loader import _compiler as _compiler  # tests skip builds without one

__all__ = [
    "FLAGS", "GEMM_MIN_ROWS", "INT4_GROUPS", "INT4_PARAMS", "ISAS", "MULTI_MAX", "SIMD_LEVELS", "DecodeLayer",
    "DecodeMoe", "Slots",
    "KernelError", "available", "bf16_x", "bf16dot", "build", "cache_root", "dequantize_int4", "forced_isa",
    "get_gemm_min_rows", "get_num_threads", "isa_flags", "library", "linear_bf16", "linear_int4", "linear_int8",
    "linear_many", "pack_int4", "q8_block", "quantize_x_q8", "read_probe", "reapply_settings", "reason",
    "requested_isa", "set_gemm_bf16dot", "set_gemm_min_rows", "set_num_threads", "set_transposed_split", "settle",
    "simd", "simd_level", "source", "unpack_int4",
]
