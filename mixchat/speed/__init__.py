"""The speed layer: compiled kernels, kernel-backed layers, the fused decoder, quantization, expert offload
and huge pages. It plugs into a plain model from outside (linear.install, decoder.FusedDecoder,
quant.install, experts.offload); the engine does the wiring."""

from __future__ import annotations

from typing import Any


def weights_replaced(model: Any) -> None:
    """Tell the model's fused decoder (Transformer.decoder, if it has one) that weights or layers were
    replaced, so that it builds again instead of reading the old tensors' pointers."""
    invalidate = getattr(getattr(model, "decoder", None), "invalidate", None)
    if invalidate is not None:
        invalidate()
