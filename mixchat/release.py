"""Release-folder I/O: find the files, open the weights without copying them, recognise the weight
layout, check every shape against params.json, and map release tensor names onto the model's.

No nn.Module lives here: this module only knows files, names and shapes.

The three layouts Mistral has shipped:
- dense:   layers.N.feed_forward.{w1,w2,w3}.weight            (Mistral-7B)
- torrent: layers.N.block_sparse_moe.gate.weight and stacked layers.N.block_sparse_moe.{w1,w2,w3},
           each [E*H, D]; w2's per-expert blocks are stored as [H, D], the transpose of dense w2
           (the Dec 2023 Mixtral torrent)
- experts: layers.N.feed_forward.gate.weight and layers.N.feed_forward.experts.J.{w1,w2,w3}.weight
           with dense shapes (mistral-inference)
The model's own parameter names are the experts layout's, so dense and experts load with no renaming
and the torrent is cut into per-expert *views* of the mapped file.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mixchat.config import ModelArgs
from mixchat.errors import ReleaseError

WEIGHT_NAMES = ("consolidated.safetensors", "consolidated.00.pth", "consolidated.pth")
LAYOUTS = ("dense", "torrent", "experts")

_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class Release:
    """The files of one release folder. Only params.json and the weights are mandatory to open it."""

    folder: Path
    params: Path
    weights: Path
    tokenizer: Path
    release_file: Path

    @classmethod
    def find(cls, folder: str | Path) -> Release:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise ReleaseError(f"{folder}: no such folder; pass the folder that holds params.json and the weights")
        params = folder / "params.json"
        if not params.is_file():
            raise ReleaseError(f"{params}: missing; a release folder needs the params.json shipped with its weights")
        weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
        shards = sorted(folder.glob("consolidated.0[1-9].pth"))
        if shards:
            raise ReleaseError(
                f"{shards[0]}: model-parallel shards are not supported; merge them into one consolidated.00.pth"
            )
        if weights is None:
            raise ReleaseError(
                f"{folder}: no weights found (looked for {', '.join(WEIGHT_NAMES)}); "
                "download consolidated.00.pth from the release"
            )
        return cls(folder, params, weights, folder / "tokenizer.model", folder / "RELEASE")

    def args(self) -> ModelArgs:
        return ModelArgs.from_file(self.params)


def open_weights(path: Path) -> dict[str, torch.Tensor]:
    """Open a weights file as a dict of tensors backed by a private memory map of the file.

    Nothing is read until a tensor is touched, and pages that are only read are shared with the
    page cache, so a 14 GB file costs no anonymous memory.
    """
    if path.suffix == ".safetensors":
        return _open_safetensors(path)
    return _open_pth(path)


def _open_pth(path: Path) -> dict[str, torch.Tensor]:
    if path.stat().st_size == 0:
        raise ReleaseError(f"{path}: file is empty; download it again (`mixchat verify` checks it against RELEASE)")
    if not zipfile.is_zipfile(path):
        raise ReleaseError(
            f"{path}: not a PyTorch zip checkpoint (truncated, corrupt or the legacy format); "
            "download it again and check it with `mixchat verify`"
        )
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        reason = next((line for line in first if "Unsupported" in line or "GLOBAL" in line), first[0] if first else "")
        raise ReleaseError(
            f"{path}: refusing to load, the file needs unsafe unpickling that could run code ({reason.strip()}); "
            "mixchat only loads plain tensors, re-save the state dict with torch.save"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ReleaseError(
            f"{path}: cannot read the checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "the file is truncated or corrupt, download it again and check it with `mixchat verify`"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ReleaseError(f"{path}: expected a flat dict of named tensors, as Mistral releases ship")
    return sd


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header and the byte offset where tensor data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ReleaseError(f"{path}: file is truncated (no header); download it again")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise ReleaseError(f"{path}: corrupt safetensors header; download it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ReleaseError(f"{path}: corrupt safetensors header; download it again") from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ReleaseError(
            f"{path}: file is truncated ({size} bytes, header promises {8 + n + end}); "
            "download it again and check it with `mixchat verify`"
        )
    return header, 8 + n


def _open_safetensors(path: Path) -> dict[str, torch.Tensor]:
    header, base = read_safetensors_header(path)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    blob = torch.empty(0, dtype=torch.uint8).set_(storage)
    out = {}
    for name, meta in header.items():
        dtype = _SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ReleaseError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        start, end = (base + int(o) for o in meta["data_offsets"])
        raw = blob[start:end]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if start % itemsize:  # an unaligned tensor cannot be viewed in place
            raw = raw.clone()
        out[name] = raw.view(dtype).view(meta["shape"])
    return out


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(".block_sparse_moe." in k for k in keys):
        return "torrent"
    if any(".feed_forward.experts." in k or k.endswith(".feed_forward.gate.weight") for k in keys):
        return "experts"
    return "dense"


def expected_shapes(args: ModelArgs, layout: str) -> dict[str, tuple[int, ...]]:
    """Every tensor a release in `layout` must contain, with the shape params.json implies."""
    d, h, v = args.dim, args.hidden_dim, args.vocab_size
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (q, d), p + "attention.wk.weight": (kv, d),
            p + "attention.wv.weight": (kv, d), p + "attention.wo.weight": (d, q),
            p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
        })
        if layout == "dense":
            shapes.update({p + "feed_forward.w1.weight": (h, d), p + "feed_forward.w2.weight": (d, h),
                           p + "feed_forward.w3.weight": (h, d)})
        elif layout == "torrent":
            e = args.moe.num_experts
            shapes[p + "block_sparse_moe.gate.weight"] = (e, d)
            for w in ("w1", "w2", "w3"):
                shapes[p + f"block_sparse_moe.{w}"] = (e * h, d)
        else:
            shapes[p + "feed_forward.gate.weight"] = (args.moe.num_experts, d)
            for j in range(args.moe.num_experts):
                e = p + f"feed_forward.experts.{j}."
                shapes.update({e + "w1.weight": (h, d), e + "w2.weight": (d, h), e + "w3.weight": (h, d)})
    return shapes


def validate(sd: dict[str, torch.Tensor], args: ModelArgs, source: Path, params: Path) -> str:
    """Check names and shapes against params.json before anything is built; returns the layout."""
    layout = detect_layout(sd)
    if layout == "dense" and args.is_moe:
        raise ReleaseError(
            f"{params}: declares moe ({args.moe.num_experts} experts) but {source.name} holds dense feed-forward "
            "weights; use the params.json that came with these weights"
        )
    if layout != "dense" and not args.is_moe:
        raise ReleaseError(
            f"{params}: has no 'moe' section but {source.name} holds mixture-of-experts weights ({layout} layout); "
            "use the params.json that came with these weights"
        )
    expected = expected_shapes(args, layout)
    missing = [k for k in expected if k not in sd]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ReleaseError(
            f"{source}: tensor {missing[0]}{more} missing for the {layout} layout that params.json "
            f"({args.n_layers} layers) implies; the weights and params.json do not belong together"
        )
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise ReleaseError(
            f"{source}: unexpected tensor {unexpected[0]}{more} for a {args.n_layers}-layer {layout} model; "
            "the weights and params.json do not belong together"
        )
    bad = [(k, s) for k, s in expected.items() if tuple(sd[k].shape) != s]
    if bad:
        name, shape = bad[0]
        more = f" ({len(bad) - 1} other tensors disagree too)" if len(bad) > 1 else ""
        raise ReleaseError(
            f"{source}: tensor {name} has shape {list(sd[name].shape)} but {params.name} implies {list(shape)}{more}; "
            "use the params.json that came with these weights"
        )
    floats = {t.dtype for t in sd.values()}
    if any(not dt.is_floating_point for dt in floats):
        raise ReleaseError(f"{source}: holds non-float tensors ({sorted(map(str, floats))}); not a Mistral release")
    return layout


def model_state(sd: dict[str, torch.Tensor], args: ModelArgs, layout: str) -> dict[str, torch.Tensor]:
    """Release tensors under the model's parameter names. Views only: no weight is copied."""
    if layout != "torrent":
        return dict(sd)
    e, h, d = args.moe.num_experts, args.hidden_dim, args.dim
    out = {}
    for name, t in sd.items():
        m = re.fullmatch(r"layers\.(\d+)\.block_sparse_moe\.(gate\.weight|w1|w2|w3)", name)
        if m is None:
            out[name] = t
            continue
        p = f"layers.{m[1]}.feed_forward."
        if m[2] == "gate.weight":
            out[p + "gate.weight"] = t
            continue
        blocks = t.view(e, h, d)
        for j in range(e):
            # The torrent stores each expert's w2 as [H, D]; the model wants dense w2 [D, H].
            out[p + f"experts.{j}.{m[2]}.weight"] = blocks[j].t() if m[2] == "w2" else blocks[j]
    return out


_MD5_LINE = re.compile(r"\b([0-9a-fA-F]{32})\s+\*?([^\s║|]+)")


def parse_release_md5(path: Path) -> dict[str, str]:
    """File name -> md5 from a RELEASE file's box-drawn checksum block."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot read ({exc.strerror})") from None
    sums = {}
    for line in text.splitlines():
        m = _MD5_LINE.search(line)
        if m:
            sums[m[2]] = m[1].lower()
    return sums


@dataclass
class OpenedRelease:
    """A release folder that passed every check that needs no weights read: params.json parses,
    every tensor name and shape fits it, and the tokenizer's vocabulary matches."""

    release: Release
    args: ModelArgs
    state: dict[str, torch.Tensor]  # release names, memory-mapped
    layout: str
    tokenizer: object  # mixchat.tokenizer.Tokenizer


def open_release(folder: str | Path) -> OpenedRelease:
    from mixchat.tokenizer import Tokenizer

    release = Release.find(folder)
    args = release.args()
    tokenizer = Tokenizer(release.tokenizer)
    tokenizer.check_vocab(args.vocab_size, release.params)
    state = open_weights(release.weights)
    layout = validate(state, args, release.weights, release.params)
    return OpenedRelease(release, args, state, layout, tokenizer)
