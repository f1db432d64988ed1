"""What a --quant choice means, without torch: its name, which tensors it quantizes, and the
bytes it keeps resident (so `mixchat inspect` can say what each choice needs in a blink).

The runtime side (quantizing, the layer that multiplies with quantized weights, the cache) is
mixchat.speed.quant; the int4 layout itself (nibble order, scale and zero) is mixchat.speed.kernels.formats',
which needs torch: this module only counts its bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from mixchat.errors import MixchatError

DEFAULT_INT4_GROUP = 128  # 4.25 bits per weight with its fp16 scale and zero (llama.cpp's Q4_0: 4.5)
MATRICES = (".attention.w", ".feed_forward.w", ".feed_forward.experts.")
CHOICES = ("none", "int8", "int4", "int4-32", "int4-64", "int4-128")


@dataclass(frozen=True)
class QuantSpec:
    kind: str  # "int8" or "int4"
    group: int = 0  # int4 only

    @property
    def name(self) -> str:
        """The key quantized caches and KV caches are stored under (int4-g128); kept as it was so
        that they stay valid. People see `label`."""
        return self.kind if self.kind == "int8" else f"int4-g{self.group}"

    @property
    def label(self) -> str:
        """The name people read: the --quant choice that gives this spec (int8, int4-32 ... int4-128)."""
        return self.kind if self.kind == "int8" else f"int4-{self.group}"

    def bits_per_weight(self) -> float:
        # int4 stores an fp16 scale and zero per group (fp32 before 0.8.0)
        return 8.0 if self.kind == "int8" else 4.0 + 32.0 / self.group


def parse_quant(value: str | None) -> QuantSpec | None:
    """'none'/'bf16'/None -> None; 'int8'; 'int4' (group 128) or 'int4-32' / 'int4-g64'."""
    if value is None or value in ("none", "bf16", "off", ""):
        return None
    if value == "int8":
        return QuantSpec("int8")
    if value.startswith("int4"):
        rest = value[4:].lstrip("-:").removeprefix("g")
        group = int(rest) if rest.isdigit() else DEFAULT_INT4_GROUP if not rest else -1
        if group in (32, 64, 128):
            return QuantSpec("int4", group)
    raise MixchatError(f"--quant {value}: unknown; use none, int8, int4, int4-32, int4-64 or int4-128")


def quantizable(name: str) -> bool:
    """The state-dict names whose weights are quantized (see the module docstring)."""
    if ".block_sparse_moe.w" in name:  # the torrent layout's stacked experts (no .weight suffix)
        return True
    if not name.endswith(".weight") or name in ("tok_embeddings.weight", "norm.weight"):
        return False
    return name == "output.weight" or any(s in name for s in MATRICES)


def spec_for(name: str, spec: QuantSpec) -> QuantSpec:
    return QuantSpec("int8") if name == "output.weight" else spec


def quantized_bytes(shape: tuple[int, ...], spec: QuantSpec) -> int:
    n, k = shape
    return int(n * k * spec.bits_per_weight() / 8) + (4 * n if spec.kind == "int8" else 0)


def model_bytes(shapes: dict[str, tuple[int, ...]], dtype_bytes: int, spec: QuantSpec | None) -> int:
    """Resident weight bytes of a model with these tensor shapes under `spec` (None: unquantized)."""
    total = 0
    for name, shape in shapes.items():
        if spec is not None and quantizable(name) and len(shape) == 2:  # a misshapen tensor stays as it is
            total += quantized_bytes(shape, spec_for(name, spec))
        else:
            total += dtype_bytes * math.prod(shape)
    return total


def expert_bytes(dim: int, hidden_dim: int, dtype_bytes: int, spec: QuantSpec | None) -> int:
    """Weight bytes of one MoE expert (w1, w2, w3) under `spec`: what the --memory-budget cache counts."""
    shapes = {f"layers.0.feed_forward.experts.0.{w}.weight": s
              for w, s in (("w1", (hidden_dim, dim)), ("w2", (dim, hidden_dim)), ("w3", (hidden_dim, dim)))}
    return model_bytes(shapes, dtype_bytes, spec)


def fits(shapes: dict[str, tuple[int, ...]], spec: QuantSpec) -> bool:
    """Whether `spec` can quantize these tensors: int4's groups must divide every input dimension."""
    return spec.kind != "int4" or all(shape[1] % spec_for(name, spec).group == 0 for name, shape in shapes.items()
                                      if quantizable(name) and len(shape) == 2 and spec_for(name, spec).kind == "int4")


def fitting_choices(spec: QuantSpec, fit: Callable[[QuantSpec], bool]) -> list[str]:
    """Where `spec`'s int4 groups do not divide the input dimensions: the choices to name instead, best first (the
    int4 groups below its own that `fit(QuantSpec)` allows, largest first, then int8, which always fits)."""
    return [c for c in ("int4-64", "int4-32") if parse_quant(c).group < spec.group and fit(parse_quant(c))] + ["int8"]


def memory_estimates(shapes: dict[str, tuple[int, ...]], input_dims: set[int] | None = None) -> dict[str, int]:
    """Weight bytes each --quant choice keeps resident (what `inspect` and the settings sheet show); a choice
    the model does not allow (int4 groups that do not divide an input dimension) is left out. `input_dims`:
    the matrices' input dimensions, where the shapes are a file's rather than the model's (the torrent
    layout stores w2 transposed and the experts stacked)."""
    out = {"bf16": model_bytes(shapes, 2, None)}
    for name in ("int8", "int4-32", "int4-64", "int4-128"):
        spec = parse_quant(name)
        allowed = fits(shapes, spec) if input_dims is None else \
            spec.kind != "int4" or all(k % spec.group == 0 for k in input_dims)
        if allowed:
            out[spec.label] = model_bytes(shapes, 2, spec)
    return out


