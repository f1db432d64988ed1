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

import collections
import json
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixchat.errors import DamagedFileError, ReleaseError
from mixchat.release.config import ModelArgs

if TYPE_CHECKING:  # torch is imported where weights are opened, so `inspect` never pays for it
    import torch

WEIGHT_NAMES = ("consolidated.safetensors", "consolidated.00.pth", "consolidated.pth")
LAYOUTS = ("dense", "torrent", "experts")

# dtype name -> (bytes per element, is floating point); names as torch spells them.
DTYPES = {"bfloat16": (2, True), "float16": (2, True), "float32": (4, True), "float64": (8, True),
          "int64": (8, False), "int32": (4, False), "int16": (2, False), "int8": (1, False), "uint8": (1, False),
          "bool": (1, False)}
_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
# The legacy storage classes torch.save still names in its pickles.
_PTH_STORAGES = {"BFloat16Storage": "bfloat16", "HalfStorage": "float16", "FloatStorage": "float32",
                 "DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
                 "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}


@dataclass(frozen=True)
class TensorInfo:
    """What a weights file's header says about one tensor; enough to inspect and validate."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][0]

    @property
    def is_float(self) -> bool:
        return DTYPES[self.dtype][1]


@dataclass(frozen=True)
class Release:
    """The files of one release folder. Only params.json and the weights are mandatory to open it."""

    folder: Path
    params: Path
    weights: Path  # the weights file, or the first of several shards
    tokenizer: Path
    release_file: Path
    shards: tuple[Path, ...] = ()  # every weights file (consolidated-0000N-of-0000M.safetensors); one if unsharded

    @property
    def weight_files(self) -> tuple[Path, ...]:
        return self.shards or (self.weights,)

    @property
    def weights_label(self) -> Path:
        """How messages name the weights: the file, or the shards' common pattern."""
        if len(self.weight_files) == 1:
            return self.weights
        return self.folder / f"consolidated-*-of-{len(self.weight_files):05d}.safetensors"

    @classmethod
    def find(cls, folder: str | Path) -> Release:
        folder = Path(folder).expanduser()
        try:
            os.listdir(folder)  # a folder we may not read looks empty to is_file(): say so instead
        except PermissionError:
            raise ReleaseError(f"{folder}: permission denied; make the folder readable (chmod a+rx) or run mixchat "
                               "as its owner") from None
        except NotADirectoryError:
            raise ReleaseError(f"{folder}: is a file, not a folder; pass the folder that holds params.json and "
                               "the weights") from None
        except OSError:
            raise ReleaseError(f"{folder}: no such folder; pass the folder that holds params.json and the "
                               "weights") from None
        params = folder / "params.json"
        if not params.is_file():
            raise ReleaseError(f"{params}: missing; a release folder needs the params.json shipped with its weights")
        found = [folder / n for n in WEIGHT_NAMES if (folder / n).is_file()]
        if len(found) > 1:
            # Which of them the user meant cannot be known, and loading one while RELEASE lists the other
            # would let `verify` pass on weights it never checked (mistral-inference refuses it too).
            raise ReleaseError(f"{folder}: holds both {found[0].name} and {found[1].name}; keep the weights file of "
                               "one release (the one RELEASE lists) and move the other out of the folder")
        weights = found[0] if found else None
        parallel = sorted(folder.glob("consolidated.0[1-9].pth"))
        if parallel:
            raise ReleaseError(
                f"{parallel[0]}: model-parallel shards are not supported; merge them into one consolidated.00.pth"
            )
        shards = _shards(folder)
        if shards and weights is not None:
            raise ReleaseError(f"{folder}: holds both {weights.name} and {shards[0].name}…; keep the files of one "
                               "release")
        if shards:
            weights = shards[0]
        if weights is None:
            raise ReleaseError(
                f"{folder}: no weights found (looked for {', '.join(WEIGHT_NAMES)} and consolidated-0000N-of-0000M"
                ".safetensors); download the weights from the release"
            )
        from mixchat.text.tokenizer import tokenizer_candidates

        # The preferred tokenizer file (tekken.json, tokenizer.model.v7, .v3, …); whether two of them
        # disagree is checked where it is read (open_release, inspect), not here, which only lists files.
        tokenizer = (tokenizer_candidates(folder) or [folder / "tokenizer.model"])[0]
        return cls(folder, params, weights, tokenizer, folder / "RELEASE", tuple(shards))

    def args(self) -> ModelArgs:
        return ModelArgs.from_file(self.params)


_SHARD = re.compile(r"consolidated-(\d{5})-of-(\d{5})\.safetensors")


def _shards(folder: Path) -> list[Path]:
    """Larger releases split their weights into consolidated-0000N-of-0000M.safetensors: all M of
    them, or a one-line error naming the first that is missing."""
    found = {}
    totals = set()
    for p in folder.glob("consolidated-*-of-*.safetensors"):
        if m := _SHARD.fullmatch(p.name):
            found[int(m[1])] = p
            totals.add(int(m[2]))
    if not found:
        return []
    if len(totals) != 1:
        raise ReleaseError(f"{folder}: holds shards of different splits (of {', '.join(map(str, sorted(totals)))}); "
                           "keep the files of one release")
    (total,) = totals
    for i in range(1, total + 1):
        if i not in found:
            missing = folder / f"consolidated-{i:05d}-of-{total:05d}.safetensors"
            raise ReleaseError(f"{missing}: missing ({len(found)} of {total} shards are here); download it from "
                               "the release")
    if max(found) > total:
        raise ReleaseError(f"{found[max(found)]}: a shard past {total}; keep the files of one release")
    return [found[i] for i in range(1, total + 1)]


def read_headers(release: Release) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of every weights file of the release, as one state dict."""
    merged: dict[str, TensorInfo] = {}
    where: dict[str, Path] = {}
    for path in release.weight_files:
        for name, info in read_header(path).items():
            if name in merged:
                raise ReleaseError(f"{path}: tensor {name[:60]!r} is also in {where[name].name}; the shards belong to "
                                   "different releases")
            merged[name], where[name] = info, path
    return merged


def open_release_weights(release: Release) -> dict[str, torch.Tensor]:
    """Every weights file of the release memory-mapped, as one state dict (no tensor is read)."""
    state: dict[str, torch.Tensor] = {}
    for path in release.weight_files:
        state.update(open_weights(path))
    return state


def open_weights(path: Path) -> dict[str, torch.Tensor]:
    """Open a weights file as a dict of tensors backed by a private memory map of the file.

    Nothing is read until a tensor is touched, and pages that are only read are shared with the
    page cache, so a 14 GB file costs no anonymous memory.
    """
    if path.suffix == ".safetensors":
        return _open_safetensors(path)
    return _open_pth(path)


def _open_readable(path: Path):
    """open(path, 'rb'), with a permission problem named as one rather than as a corrupt download."""
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except PermissionError:
        raise ReleaseError(f"{path}: permission denied; make it readable (chmod a+r) or run mixchat as the "
                           "file's owner") from None
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot open ({exc.strerror}); check the file, or download it again") from None


def _check_zip(path: Path) -> None:
    _open_readable(path).close()
    if path.stat().st_size == 0:
        raise DamagedFileError(path, "file is empty")
    if not zipfile.is_zipfile(path):
        raise DamagedFileError(path, "not a PyTorch zip checkpoint (truncated, corrupt or the legacy format)")


def _unsafe(path: Path, reason: str) -> ReleaseError:
    return ReleaseError(
        f"{path}: refusing to load, the file needs unsafe unpickling that could run code ({reason}); "
        "mixchat only loads plain tensors, re-save the state dict with torch.save"
    )


def _open_pth(path: Path) -> dict[str, torch.Tensor]:
    import torch

    _check_zip(path)
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        reason = next((line for line in first if "Unsupported" in line or "GLOBAL" in line), first[0] if first else "")
        raise _unsafe(path, reason.strip()) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DamagedFileError(
            path, f"cannot read the checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "the file is truncated or corrupt") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ReleaseError(f"{path}: expected a flat dict of named tensors, as Mistral releases ship")
    return sd


def _corrupt(path: Path, what: str) -> ReleaseError:
    return DamagedFileError(path, f"corrupt safetensors header ({what})")


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header and the byte offset where tensor data starts.

    Every entry is checked before anything trusts it: a dtype mixchat knows, a shape of non-negative
    integers, two integer offsets in order whose span is exactly numel × itemsize, inside the file."""
    size = path.stat().st_size
    with _open_readable(path) as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ReleaseError(f"{path}: file is truncated (no header); download it again")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise _corrupt(path, f"it claims {n} bytes of header in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise _corrupt(path, "not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"a JSON {type(header).__name__} where an object of tensors belongs")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, meta in header.items():
        if not isinstance(meta, dict):
            raise _corrupt(path, f"entry {name[:60]!r} is not an object")
        dtype = _safetensors_dtype(path, name, meta)
        shape, offsets = meta.get("shape"), meta.get("data_offsets")
        if not isinstance(shape, list) or len(shape) > 8 or \
                not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape):
            raise _corrupt(path, f"tensor {name[:60]!r} has shape {str(shape)[:40]}")
        if not isinstance(offsets, list) or len(offsets) != 2 or \
                not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
            raise _corrupt(path, f"tensor {name[:60]!r} has data_offsets {str(offsets)[:40]}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise _corrupt(path, f"tensor {name[:60]!r} has data_offsets {offsets} out of order")
        if end > data:
            raise DamagedFileError(path, f"file is truncated ({size} bytes, tensor {name[:60]!r} ends at "
                                         f"{8 + n + end})")
        if end - begin != math.prod(shape) * DTYPES[dtype][0]:
            raise _corrupt(path, f"tensor {name[:60]!r} spans {end - begin} bytes, its shape {shape} of {dtype} "
                                 f"needs {math.prod(shape) * DTYPES[dtype][0]}")
    return header, 8 + n


def _open_safetensors(path: Path) -> dict[str, torch.Tensor]:
    import torch

    header, base = read_safetensors_header(path)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    blob = torch.empty(0, dtype=torch.uint8).set_(storage)
    out = {}
    for name, meta in header.items():
        dtype = getattr(torch, _safetensors_dtype(path, name, meta))
        start, end = (base + int(o) for o in meta["data_offsets"])
        raw = blob[start:end]
        itemsize = dtype.itemsize
        if start % itemsize:  # an unaligned tensor cannot be viewed in place
            raw = raw.clone()
        out[name] = raw.view(dtype).view(meta["shape"])
    return out


def _safetensors_dtype(path: Path, name: str, meta: dict) -> str:
    dtype = meta.get("dtype")
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
        raise ReleaseError(f"{path}: tensor {name[:60]!r} has unsupported dtype {str(dtype)[:20]!r}; "
                           "mixchat reads BF16/F16/F32 release weights")
    return _SAFETENSORS_DTYPES[meta["dtype"]]


class _HeaderUnpickler(pickle.Unpickler):
    """Reads torch.save's data.pkl for names, shapes and dtypes only. It knows the three globals a
    plain state dict uses and refuses every other, so nothing in the file can run."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, *_: TensorInfo(tuple(size), storage)
        if module == "torch" and name in _PTH_STORAGES:
            return _PTH_STORAGES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")

    def persistent_load(self, pid: Any) -> str:
        # ('storage', dtype name (via find_class), key, location, numel): keep the dtype.
        return pid[1]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of a weights file without importing torch or reading the data:
    milliseconds even for 87 GB."""
    if path.suffix == ".safetensors":
        header, _ = read_safetensors_header(path)
        return {k: TensorInfo(tuple(v["shape"]), _safetensors_dtype(path, k, v)) for k, v in header.items()}
    _check_zip(path)
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                raise ReleaseError(f"{path}: no data.pkl inside, so not a torch.save checkpoint")
            sd = _HeaderUnpickler(z.open(pkl)).load()
    except pickle.UnpicklingError as exc:
        raise _unsafe(path, str(exc)) from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, TypeError, IndexError) as exc:
        raise DamagedFileError(
            path, f"cannot read the checkpoint ({exc or type(exc).__name__}); the file is truncated or corrupt"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, TensorInfo) for v in sd.values()):
        raise ReleaseError(f"{path}: expected a flat dict of named tensors, as Mistral releases ship")
    return dict(sd)


def describe(sd: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in sd.items()}


# The image tower's tensors in Pixtral and Mistral-Small 3.1 releases.
VISION_TOWER = ("vision_encoder.", "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm.")


def text_model(sd: dict, args: ModelArgs) -> dict:
    """The tensors of the language model. A release with a vision encoder (Pixtral, Mistral-Small 3.1)
    also ships its image tower (vision_encoder.*, vision_language_adapter.*, …): mixchat chats in
    text, so those are skipped (inspect says so). Only those: any other tensor must be the language
    model's, and validate() names one that is not (a declared vision encoder hides no stray tensor)."""
    if args.extra.get("vision_encoder") is None:
        return sd
    return {k: v for k, v in sd.items() if not k.startswith(VISION_TOWER)}


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(".block_sparse_moe." in k for k in keys):
        return "torrent"
    if any(".feed_forward.experts." in k or k.endswith(".feed_forward.gate.weight") for k in keys):
        return "experts"
    return "dense"


def expected_count(args: ModelArgs, layout: str) -> int:
    """How many tensors expected_shapes lists, without listing them."""
    ffn = {"dense": 3, "torrent": 4}.get(layout, 1 + 3 * (args.moe.num_experts if args.moe else 0))
    return 3 + args.n_layers * (6 + ffn)


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


def validate(sd: dict[str, TensorInfo], args: ModelArgs, source: Path, params: Path) -> str:
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
    count = expected_count(args, layout)
    if count > len(sd):  # before listing them: params.json may claim a million layers
        raise ReleaseError(
            f"{source}: holds {len(sd)} tensors but {params.name} ({args.n_layers} layers"
            + (f", {args.moe.num_experts} experts" if args.moe else "")
            + f") implies {count}; the weights and params.json do not belong together"
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
    if not all(t.is_float for t in sd.values()):
        dtypes = sorted({t.dtype for t in sd.values()})
        raise ReleaseError(f"{source}: holds non-float tensors ({', '.join(dtypes)}); not a Mistral release")
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
        if path.stat().st_size > 1 << 20:  # Mistral's are a few KB of credits and sums
            raise ReleaseError(f"{path}: {path.stat().st_size} bytes, too large for a RELEASE file; "
                               "restore the one shipped with the weights")
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
    tokenizer: object  # mixchat.text.tokenizer.TextTokenizer (SentencePiece or tekken)


def open_release(folder: str | Path) -> OpenedRelease:
    from mixchat.text.tokenizer import find_tokenizer, load_tokenizer

    release = Release.find(folder)
    args = release.args()
    tokenizer_path = find_tokenizer(release.folder)
    tokenizer = load_tokenizer(tokenizer_path)
    # Names and shapes are checked from the header first: a mismatch is reported before torch loads anything.
    header = text_model(read_headers(release), args)
    embedding = header.get("tok_embeddings.weight")
    if args.vocab_size != tokenizer.vocab_size and embedding is not None \
            and embedding.shape[0] == tokenizer.vocab_size:
        # Tokenizer and weights agree with each other: params.json is the odd one out.
        raise ReleaseError(f"{release.params}: says vocab_size {args.vocab_size}, but {tokenizer_path.name} and the "
                           f"embedding in {release.weights_label.name} both have {tokenizer.vocab_size}; set "
                           f"vocab_size to {tokenizer.vocab_size} or use the params.json shipped with these weights")
    tokenizer.check_vocab(args.vocab_size, release.params)
    layout = validate(header, args, release.weights_label, release.params)
    state = text_model(open_release_weights(release), args)
    validate(describe(state), args, release.weights_label, release.params)  # the same files, read by torch
    return OpenedRelease(release, args, state, layout, tokenizer)
