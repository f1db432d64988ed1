"""Weight-only int8 and int4 quantization of the model's linear layers, and its on-disk cache.

Decoding reads every active weight once per token, so fewer bytes per weight is directly more tokens
per second: int8 halves the bf16 traffic, int4 quarters it (plus its scales). Activations stay in
bf16/fp32; only the stored weights shrink.

- int8: one fp32 scale per output row (absmax / 127). Symmetric, like llama.cpp's Q8_0 but with a
  per-row rather than per-32 scale, which is enough for int8 (quality is measured in the tests).
- int4: groups of G weights along the input dimension (G in 32, 64, 128), each with an fp16 scale
  and zero (fp32 before 0.8.0: 4.5 bits per weight at G = 128, now 4.25): w = (q - 8) * scale + zero,
  q in 0..15. Weights past fp16's range (65504) cannot be stored so, and are refused with the tensor's
  name. Asymmetric min/max, because a group's range is rarely centred on 0. Two values per byte, as
  mixchat.speed.kernels.formats (the layout's one owner) packs them.

What stays unquantized: the embedding table (one row is read per token), the norms, and the MoE
router (routing decisions are discrete; a small error there changes which experts run). Under int4
the output projection is int8, as llama.cpp keeps it at higher precision: it is one matrix, and the
logits are what the user sees.

Products go through mixchat.speed.kernels when its compiled kernels are available: matrix-vector ones
(decode) read the packed weights directly, prompts use its GEMM, which dequantizes small tiles as it
goes. Without the kernels, a few tokens go through torch's own weight-only ops, and a prompt
dequantizes the weight into a reused fp32 buffer for torch's fp32 GEMM.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mixchat.errors import MixchatError
from mixchat.progress import ProgressListener
from mixchat.release import checksum
from mixchat.speed import weights_replaced
from mixchat.speed.kernels.formats import (
    INT4_PARAMS,
    PARAM_DTYPES,
    WEIGHT_DTYPES,
    dequantize_int4,
    pack_int4,
    unpack_int4,
)
from mixchat.speed.linear import fp32_scratch, kernels_or_none
from mixchat.speed.qformat import QuantSpec, fitting_choices, quantizable, spec_for

# The cache file's format per kind, written into its metadata: a file of another version is quantized again.
# int4 2 (0.8.0): fp16 scales and zeros. int8 is still what mixchat first wrote, so its caches stay valid.
FORMAT_VERSIONS = {"int8": 1, "int4": 2}


def _refuse_non_finite(w: torch.Tensor, name: str, kind: str) -> None:
    if not bool(torch.isfinite(w).all()):
        raise MixchatError(f"{name} holds NaN or infinite values, which {kind} cannot store: the release is damaged "
                           "or not a real one (`mixchat verify` compares its files with RELEASE's checksums)")


def quantize_int8(w: torch.Tensor, name: str = "a weight") -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q int8 [N, K], scale fp32 [N]); w ~= q * scale[:, None]."""
    w = w.float()
    _refuse_non_finite(w, name, "int8")
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


# fp16's largest finite value: an int4 group whose scale or zero would pass it cannot be stored
_FP16_MAX = 65504.0


def quantize_int4(w: torch.Tensor, group: int,
                  name: str = "a weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (packed uint8 [N, K/2], scale fp16 [N, K/G], zero fp16 [N, K/G]).

    The zero is rounded to fp16 first, then the scale is the smallest fp16 whose grid (q - 8) * scale + zero
    still reaches the group's least and greatest weight (rounded up, never down), and q is the nearest grid
    point: so every stored weight is within half a stored step of the original, constant and tiny groups
    included (rounding the scale to nearest could leave a group's ends off the grid)."""
    n, k = w.shape
    if k % group:
        best = fitting_choices(QuantSpec("int4", group), lambda other: k % other.group == 0)[0]
        raise MixchatError(f"int4 groups of {group} do not divide {name}'s input dimension {k}; choose --quant {best}")
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    _refuse_non_finite(lo, name, "int4")  # a NaN or infinity in a group reaches its min or max
    _refuse_non_finite(hi, name, "int4")
    if max(float(hi.abs().max()), float(lo.abs().max())) > _FP16_MAX:
        raise MixchatError(f"{name} has weights beyond fp16's range (+-65504), where int4 keeps its scales; "
                           "quantize this model with --quant int8, or run it unquantized")
    zero = (lo + 8.0 * ((hi - lo) / 15.0)).to(INT4_PARAMS)
    z32 = zero.float()
    # at least fp16's smallest subnormal: a constant group keeps a scale q can be divided by
    need = torch.maximum((hi - z32) / 7.0, (z32 - lo) / 8.0).clamp(min=2.0**-24)
    scale = need.to(INT4_PARAMS)
    scale = torch.where(scale.float() < need, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    s, z = scale.float()[..., None], z32[..., None]
    q = torch.round((g - z) / s + 8.0).clamp_(0, 15).to(torch.uint8).view(n, k)
    return pack_int4(q), scale, zero


def dequantize(parts: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 weight a quantized layer stands for (into `out` if given)."""
    if "zero" not in parts:
        q, scale = parts["q"], parts["scale"]
        out = torch.empty(q.shape, dtype=torch.float32) if out is None else out
        return torch.mul(q, scale[:, None], out=out)
    packed, scale, zero = parts["q"], parts["scale"], parts["zero"]
    return dequantize_int4(packed, scale, zero, packed.shape[1] * 2 // scale.shape[1], out)


def _kernels():
    return kernels_or_none()


class QuantLinear(nn.Module):
    """A bias-free linear layer whose weight is stored int8 or int4 (see the module docstring)."""

    def __init__(self, parts: dict[str, torch.Tensor], in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kind = "int4" if "zero" in parts else "int8"
        self.group = in_features // parts["scale"].shape[1] if self.kind == "int4" else 0
        for name, t in parts.items():
            self.register_buffer(name, t)
        self._torch_int4: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kernel_ok = True

    def parts(self) -> dict[str, torch.Tensor]:
        names = ("q", "scale", "zero") if self.kind == "int4" else ("q", "scale")
        return {n: getattr(self, n) for n in names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.device.type != "cpu":
            w = dequantize(self.parts()).to(x.dtype)
            return F.linear(x, w)
        # The kernels take decode and prompts alike (their GEMM dequantizes 16 x 256 tiles in L1).
        y = self._kernel(x2) if self._kernel_ok else None
        if y is None and x2.shape[0] <= 16:
            y = self._torch_small(x2)
        elif y is None:
            y = F.linear(x2.float(), dequantize(self.parts(), fp32_scratch((self.out_features, self.in_features))))
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        if (k := _kernels()) is None:
            return None
        try:
            if self.kind == "int8":
                return k.linear_int8(x, self.q, self.scale)
            return k.linear_int4(x, self.q, self.scale, self.zero, self.group)
        except ValueError:  # a shape the kernels do not take (tiny test models): torch's ops do
            self._kernel_ok = False
            return None

    def kernel_parts(self) -> tuple[str, tuple[torch.Tensor, ...], int] | None:
        """(format, tensors, int4 group) as kernels.linear_many and the fused decoder take this layer's
        weight (see speed.linear.KernelLinear.kernel_parts), or None."""
        if not self._kernel_ok or self.q.device.type != "cpu":
            return None
        return self.kind, tuple(self.parts().values()), self.group

    def _torch_small(self, x: torch.Tensor) -> torch.Tensor:
        """torch's weight-only kernels: faster than dequantize + GEMM for a few rows."""
        if self.kind == "int8":
            xb = x.to(torch.bfloat16)
            return torch.ops.aten._weight_int8pack_mm(xb, self.q, self.scale.to(torch.bfloat16))
        if self._torch_int4 is None:  # torch's own packing, built once on first use
            n = self.out_features
            q = unpack_int4(self.q).view(n, self.in_features).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            sz = torch.stack((self.scale, self.zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self._torch_int4 = (packed, sz)
        packed, sz = self._torch_int4
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, self.group, sz)


def quantize_tensor(w: torch.Tensor, spec: QuantSpec, name: str = "a weight") -> dict[str, torch.Tensor]:
    if spec.kind == "int8":
        q, scale = quantize_int8(w, name)
        return {"q": q, "scale": scale}
    q, scale, zero = quantize_int4(w, spec.group, name)
    return {"q": q, "scale": scale, "zero": zero}


def cache_dir() -> Path:
    """Quantized weights, keyed by model fingerprint: under MIXCHAT_HOME when set (tests), else
    platformdirs' user cache folder (deleting it only costs a requantization)."""
    if os.environ.get("MIXCHAT_QUANT_CACHE"):
        return Path(os.environ["MIXCHAT_QUANT_CACHE"]).expanduser()
    from mixchat.paths import home_override

    if (home := home_override()) is not None:
        return home / "cache" / "quant"
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mixchat", appauthor=False)) / "quant"


def cache_path(fingerprint: str, spec: QuantSpec) -> Path:
    return cache_dir() / f"{fingerprint}-{spec.name}.safetensors"


_ST_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.float16: "F16", torch.float32: "F32"}


def part_shapes(shape: tuple[int, ...], spec: QuantSpec) -> dict[str, tuple[int, ...]]:
    n, k = shape
    if spec.kind == "int8":
        return {"q": (n, k), "scale": (n,)}
    return {"q": (n, k // 2), "scale": (n, k // spec.group), "zero": (n, k // spec.group)}


def _write_streaming(path: Path, state: dict[str, torch.Tensor], names: list[str], spec: QuantSpec,
                     meta: dict[str, str], advance: Callable[[int], None]) -> None:
    """Quantize tensor by tensor straight into a safetensors file: the header is known in advance
    (shapes follow from the spec), so no more than one quantized matrix is ever held in memory —
    Mixtral's experts quantized at once would not fit the memory budget they are meant to respect.

    The per-tensor CRCs (mixchat.release.checksum) are known only once the data is written, so the header
    holds a placeholder of the same length, filled in at the end."""
    header: dict[str, object] = {}
    offset = 0
    keys = []
    for n in names:
        sp = spec_for(n, spec)
        for p, shape in part_shapes(tuple(state[n].shape), sp).items():
            dtype = WEIGHT_DTYPES[sp.kind] if p == "q" else PARAM_DTYPES[sp.kind]
            size = math.prod(shape) * dtype.itemsize
            header[f"{n}.{p}"] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                                  "data_offsets": [offset, offset + size]}
            keys.append(f"{n}.{p}")
            offset += size
    placeholder = checksum.digest_metadata(dict.fromkeys(keys, 0))
    raw = json.dumps({"__metadata__": {**meta, checksum.META_KEY: placeholder}, **header},
                     separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    at = raw.index(json.dumps(placeholder).encode()) + 1  # where the placeholder's text starts
    crcs: dict[str, int] = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for n in names:
            sp = spec_for(n, spec)
            parts = quantize_tensor(state[n], sp, n)
            for p in part_shapes(tuple(state[n].shape), sp):
                data = parts[p].contiguous().view(torch.uint8).numpy().tobytes()
                crcs[f"{n}.{p}"] = checksum.crc_bytes(data)
                f.write(data)
            advance(state[n].nbytes)
        # As the header spells it (a JSON string inside JSON); same keys and fixed-width hex: same length.
        digests = json.dumps(checksum.digest_metadata(crcs))[1:-1].encode()
        assert len(digests) == len(json.dumps(placeholder)) - 2
        f.seek(8 + at)
        f.write(digests)
        f.flush()
        os.fsync(f.fileno())


class Quantized:
    """The quantized parts of each quantized tensor, from memory or from the cache file; `lazy`
    names are read from the file only when asked for (offloaded experts)."""

    def __init__(self, names: list[str], spec: QuantSpec, path: Path | None = None,
                 parts: dict[str, dict[str, torch.Tensor]] | None = None, cached: bool = False) -> None:
        self.names, self.spec, self.path, self.cached = names, spec, path, cached
        self._parts = parts
        self._file = None

    def get(self, name: str) -> dict[str, torch.Tensor]:
        if self._parts is not None:
            return self._parts[name]
        if self._file is None:
            from safetensors import safe_open

            self._file = safe_open(str(self.path), framework="pt")
        keys = ("q", "scale", "zero") if spec_for(name, self.spec).kind == "int4" else ("q", "scale")
        return {p: self._file.get_tensor(f"{name}.{p}") for p in keys}


def print_note(text: str) -> None:
    """A note for the user while loading, where no front end takes it: one line on stderr."""
    from mixchat.safetext import visible

    # a bar being drawn on the terminal (quantizing) has no newline yet: the note starts a line of its own
    lead = "\n" if sys.stderr.isatty() else ""
    print(f"{lead}mixchat: {visible(text)}", file=sys.stderr, flush=True)


def _cache_is_valid(path: Path, fingerprint: str, spec: QuantSpec, names: list[str],
                    show: bool | None = None, say: Callable[[str], None] = print_note) -> bool:
    """The cached file is this model's, under this spec, whole, and its bytes match their CRCs. The
    CRCs are read through once per file version (checksum.stamp remembers a file that passed)."""
    if not path.is_file():
        return False
    from safetensors import safe_open

    from mixchat.progress import Progress

    def reject(why: str) -> bool:
        say(f"the quantized cache {path} {why}; quantizing again")
        return False

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            if (meta.get("fingerprint"), meta.get("quant")) == (fingerprint, spec.name) and \
                    meta.get("version") != str(FORMAT_VERSIONS[spec.kind]):
                why = " (0.8.0 keeps int4's scales in fp16)" if spec.kind == "int4" else ""
                return reject(f"holds format {str(meta.get('version'))[:8]!r}, not this mixchat's "
                              f"{FORMAT_VERSIONS[spec.kind]}{why}")
            if (meta.get("fingerprint"), meta.get("quant")) != (fingerprint, spec.name) or \
                    not all(f"{n}.q" in keys for n in names):
                return False
            crcs = checksum.parse_metadata(meta)
            if crcs is None or set(crcs) != keys:
                return reject("carries no checksum (an older mixchat wrote it)")
            if checksum.is_stamped(path):
                return True
            with Progress(f"checking {path.name}", path.stat().st_size, enabled=show) as bar:
                bad = checksum.file_mismatches(path, crcs, bar.advance)
    except Exception as e:  # noqa: BLE001 - truncated or foreign: requantize rather than fail
        return reject(f"cannot be read ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})")
    if bad:
        checksum.unstamp(path)
        return reject(f"does not match its checksum ({bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''})")
    checksum.stamp(path)
    return True


def quantize_state(state: dict[str, torch.Tensor], spec: QuantSpec, fingerprint: str | None = None,
                   on_progress: ProgressListener | None = None, show: bool | None = None,
                   use_cache: bool = True, say: Callable[[str], None] | None = None) -> Quantized:
    """Quantize the quantizable tensors of `state`, or find them in the cache from an earlier start
    (keyed by the model fingerprint and the spec). Progress counts source bytes. `say` gets the notes
    for the user (a cache made again, one that cannot be written); default: stderr."""
    from mixchat.progress import Progress

    say = say or print_note
    names = [n for n in state if quantizable(n)]
    if fingerprint and use_cache:
        path = cache_path(fingerprint, spec)
        checksum.remove_stale_temporaries(path.parent, "*.safetensors.tmp*")  # left by a killed quantization
        if _cache_is_valid(path, fingerprint, spec, names, show, say):
            return Quantized(names, spec, path, cached=True)
    total = sum(state[n].nbytes for n in names)
    with Progress(f"quantizing to {spec.label}", total, enabled=show, listener=on_progress) as bar:
        def advance(nbytes: int) -> None:
            bar.advance(nbytes)

        if fingerprint and use_cache:
            # Atomically: a crash mid-write leaves no half file that a later start would trust.
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            meta = {"fingerprint": fingerprint, "quant": spec.name, "version": str(FORMAT_VERSIONS[spec.kind])}
            try:
                from mixchat.paths import make_private_dir

                make_private_dir(path.parent)
                _write_streaming(tmp, state, names, spec, meta, advance)
                checksum.unstamp(path)
                os.replace(tmp, path)
                checksum.stamp(path)  # just written from memory: no need to read it back at the next start
                return Quantized(names, spec, path)
            except BaseException as e:
                # A refused weight (MixchatError), Ctrl+C or a full disk: the partial file goes now, not at the
                # next start (a 7B's is gigabytes, and the TUI may run for days).
                try:
                    tmp.unlink(missing_ok=True)
                except OSError:
                    pass
                if not isinstance(e, OSError):
                    raise
                full = " (the disk is full)" if e.errno == errno.ENOSPC else ""
                say(
                    f"could not write the quantized weights to {path} ({e.strerror or e}){full}; quantizing in memory "
                    "for this run only, and trying to write them again at the next start (free space there, or set "
                    "MIXCHAT_QUANT_CACHE to a folder that has it)")
                bar.done = 0
        parts = {}
        for n in names:
            parts[n] = quantize_tensor(state[n], spec_for(n, spec), n)
            advance(state[n].nbytes)
    return Quantized(names, spec, parts=parts)


def install(model: nn.Module, quantized: dict[str, dict[str, torch.Tensor]]) -> None:
    """Swap each quantized weight's Linear for a QuantLinear holding the quantized parts."""
    for name, parts in quantized.items():
        module_path = name.removesuffix(".weight")
        parent_path, _, attr = module_path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, attr)
        setattr(parent, attr, QuantLinear(parts, old.in_features, old.out_features))
    weights_replaced(model)
