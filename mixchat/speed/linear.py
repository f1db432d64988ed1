"""Kernel-backed linear layers, swapped into a model by install(), and the CPU's numeric policy for them.

The model's own linear layers are plain PyTorch. install(model) replaces each of them (the weight shared,
not copied) by a KernelLinear, which multiplies bf16 weights on the CPU with mixchat.speed.kernels and,
where those are not loaded, upcasts them to fp32 for products of several rows rather than use torch's
slow bf16 GEMM. Quantized layers (mixchat.speed.quant.QuantLinear) dispatch to the kernels themselves;
both describe their weights to the C side through the same kernel_parts() protocol.
"""

from __future__ import annotations

import functools
import threading
import time
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from mixchat.paths import env_choice, env_flag
from mixchat.speed.kernels import measured

_UPCAST_MIN_TOKENS = 4
# Where the CPU multiplies bf16 matrices natively, torch's GEMM may beat the kernels' for prompts (see
# prompt_gemm); the kernels take decode and short prompts there whatever, which are bound by reading the weights.
_KERNEL_MAX_ROWS = 16
# torch's GEMM takes prompts only when it measured this much faster than the kernels': within that the two
# trade places from one run to the next on a busy machine, and the kernels keep the products' sums in fp32
# where torch rounds them to bf16.
_TORCH_MARGIN = 0.9
_use_kernels = True


def use_kernels(on: bool) -> None:
    """Whether kernel-backed layers and the fused decoder may use the compiled kernels (tests switch them
    off to take torch's path on the same model)."""
    global _use_kernels
    _use_kernels = on


def kernels_or_none() -> ModuleType | None:
    """mixchat.speed.kernels where its library is loaded and allowed, else None: torch's bf16 GEMV streams
    the weights at about half the memory read rate on AVX2 CPUs, and decode is nothing but that.
    Asked every time rather than cached, so a library that kernels.forced_isa swaps in is followed."""
    if not _use_kernels:
        return None
    from mixchat.speed import kernels

    return kernels if kernels.available() else None


@functools.cache
def _cpu_multiplies_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def native_bf16() -> bool:
    """Whether torch's bf16 matrix products are the fast ones on this CPU (AVX512-BF16 or AMX), which
    decides two paths: prompts of more than _KERNEL_MAX_ROWS tokens may go through torch's bf16 GEMM rather
    than the kernels' (prompt_gemm measures which is faster), and without the kernels bf16 weights are
    multiplied as they are rather than upcast to fp32.

    CPUs without them run bf16 matrix-matrix products about 4x slower than fp32 ones (measured on an AVX2
    EPYC: a 128x4096 by 4096x14336 product takes 710 ms in bf16, 170 ms in fp32). mixchat's compiled
    kernels take bf16 weights as they are, for one token and for a whole prompt. Without them, when
    several tokens go through a layer at once, the bf16 weight is copied into a reused fp32 scratch
    buffer (20 ms: a fresh allocation would cost 200 ms in page faults) and multiplied in fp32.

    MIXCHAT_NATIVE_BF16=1 or 0 forces either answer (tests take both paths on any CPU; on one without
    native bf16 the forced path is slow, not wrong); unset, the CPU decides. Read here only, at each
    decision rather than once, so a test can set it: under a microsecond, next to a product of several
    rows (the kernels' one-token path never asks).
    """
    return env_flag("MIXCHAT_NATIVE_BF16", _cpu_multiplies_bf16())


def prompt_gemm() -> str:
    """Who multiplies a bf16 weight by a prompt of more than _KERNEL_MAX_ROWS rows where the kernels are
    loaded: "kernels" or "torch".

    Without native bf16 (native_bf16()) the kernels: torch's bf16 GEMM is several times slower there. With
    it, whichever measured faster on this machine (measure_prompt_gemm: a 7B-sized product through each,
    at the first such prompt), kept in the kernels' build folder so every later process makes the same
    choice (delete prompt-gemm.json there to measure again). The kernels' GEMM is their vdpbf16ps one where
    the build has it (AVX512-BF16: x rounded to bf16, sums in fp32), their fp32 one elsewhere; torch's
    (oneDNN) rounds x and the result to bf16, and on AMX CPUs runs on the tile units.
    MIXCHAT_PROMPT_GEMM=kernels or torch forces either (tests; comparing the two); other values are ignored,
    like an unset variable.
    """
    if (forced := _forced_prompt_gemm()) is not None:
        return forced
    if not native_bf16() or (k := kernels_or_none()) is None:
        return "kernels"
    return _measured_choice(k)


PROMPT_GEMM_FILE = "prompt-gemm.json"


def _forced_prompt_gemm() -> str | None:
    return env_choice("MIXCHAT_PROMPT_GEMM", ("kernels", "torch"))


def _measured_choice(k: ModuleType) -> str:
    found = measured.kept(k.library(), PROMPT_GEMM_FILE, k.get_num_threads(), measure_prompt_gemm,
                          lambda found: found.get("choice") in ("kernels", "torch"))
    return found["choice"]


def measure_prompt_gemm(rows: int = 128, n: int = 4096, k: int = 4096, repeats: int = 3) -> dict:
    """Time a [rows, k] x [n, k]^T bf16 product (a 7B's wq at a 128-token prompt) through the kernels and
    through torch's bf16 GEMM, in turns, best of `repeats` each; returns both rates in GFLOP/s and the
    choice (torch only when it is faster by more than the margin, see _TORCH_MARGIN)."""
    kern = kernels_or_none()
    if kern is None:
        return {"choice": "kernels", "why": "no kernels to measure"}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=gen)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
    ways = {"kernels": lambda: kern.linear_bf16(x, w), "torch": lambda: F.linear(x.to(torch.bfloat16), w)}
    best = dict.fromkeys(ways, float("inf"))
    for fn in ways.values():
        fn()  # warm: first-touch of buffers, oneDNN's kernel generation
    for _ in range(repeats):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    flops = 2 * rows * n * k / 1e9
    rate = {name: round(flops / max(secs, 1e-9), 1) for name, secs in best.items()}
    choice = "torch" if best["torch"] < _TORCH_MARGIN * best["kernels"] else "kernels"
    return {"choice": choice, "kernels_gflops": rate["kernels"], "torch_gflops": rate["torch"],
            "kernels_gemm": "vdpbf16ps" if kern.bf16dot() else "fp32", "shape": [rows, n, k], **measured.stamp()}


def prompt_gemm_note() -> str | None:
    """What decides prompt_gemm() now, as one line (for `bench`), where it is a measurement (this process's
    or a kept one, for the loaded library and thread count); None where nothing was measured (no native
    bf16, no kernels, MIXCHAT_PROMPT_GEMM set, or no prompt yet)."""
    if _forced_prompt_gemm() is not None or not native_bf16():
        return None
    if (k := kernels_or_none()) is None:
        return None
    found = measured.known(k.library(), PROMPT_GEMM_FILE, k.get_num_threads())
    if not found or "kernels_gflops" not in found:
        return None
    return (f"{found['choice']} GEMM (kernels' {found['kernels_gemm']} {found['kernels_gflops']:.0f} GFLOP/s, "
            f"torch's bf16 {found['torch_gflops']:.0f}; {measured.when(found)})")


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


def upcast(n_tokens: int, t: torch.Tensor) -> bool:
    """Whether a product of n_tokens rows with bf16 `t` runs in fp32 rather than torch's bf16 (see
    native_bf16)."""
    return n_tokens >= _UPCAST_MIN_TOKENS and t.dtype == torch.bfloat16 and t.device.type == "cpu" \
        and not native_bf16()


class KernelLinear(nn.Linear):
    """A bias-free linear layer whose bf16 weights on CPU go through mixchat.speed.kernels when they are
    available, and are upcast to fp32 for several rows when they are not."""

    @classmethod
    def sharing(cls, layer: nn.Linear) -> KernelLinear:
        """A KernelLinear holding `layer`'s weight Parameter itself."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.weight = layer.weight
        new.register_parameter("bias", None)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # The torrent layout's w2 is a transposed view, which the kernels read as it lies.
        transposed = not w.is_contiguous() and w.t().is_contiguous()
        if w.dtype == torch.bfloat16 and w.device.type == "cpu" and (transposed or w.is_contiguous()) \
                and not torch.is_grad_enabled() and (x.shape[0] <= _KERNEL_MAX_ROWS or prompt_gemm() == "kernels") \
                and (k := kernels_or_none()) is not None:
            return k.linear_bf16(x, w).to(x.dtype)
        # Without the kernels, torch's bf16 product takes 455 ms for one Mixtral expert's transposed
        # w2 on AVX2, an fp32 copy (made in the view's own layout) and product about 30 ms, so it is
        # upcast even for one token.
        if upcast(_UPCAST_MIN_TOKENS if transposed else x.shape[0], w):
            return F.linear(x.float(), _fp32_copy(w.t()).t() if transposed else _fp32_copy(w)).to(x.dtype)
        return F.linear(x.to(w.dtype), w).to(x.dtype)

    def kernel_parts(self) -> tuple[str, tuple[torch.Tensor, ...], int] | None:
        """(format, tensors, int4 group) as kernels.linear_many and the fused decoder take this layer's
        weight, or None where they do not take it."""
        w = self.weight
        if w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous():
            return "bf16", (w,), 0
        return None


def install(model: nn.Module) -> int:
    """Swap every plain linear layer of `model` (nn.Linear without bias, or a subclass of it that is not
    already kernel-backed) for a KernelLinear sharing its weight; returns how many were swapped. Quantized
    layers are left as they are: they dispatch to the kernels themselves."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not isinstance(child, KernelLinear) and child.bias is None:
                setattr(parent, name, KernelLinear.sharing(child))
                swapped += 1
    if swapped:
        from mixchat.speed import weights_replaced

        weights_replaced(model)
    return swapped
