"""`mixchat inspect` (what is in a release folder, from headers and shapes only) and
`mixchat verify` (md5 sums against RELEASE). Named so it does not shadow the stdlib `inspect`."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from mixchat.errors import ChecksumError, DamagedFileError, MixchatError, ReleaseError
from mixchat.model.cache import kv_bytes, kv_memory, kv_tokens_within
from mixchat.progress import Progress, human_bytes
from mixchat.release.config import ModelArgs
from mixchat.release.folder import (
    Release,
    TensorInfo,
    detect_layout,
    open_release,
    parse_release_md5,
    read_headers,
    text_model,
    validate,
)
from mixchat.safetext import one_line, visible
from mixchat.speed.qformat import memory_estimates


def _role(name: str) -> str:
    return re.sub(r"experts\.\d+\.", "experts.J.", re.sub(r"^layers\.\d+\.", "layers.N.", name))


def implied_by_shapes(sd: dict[str, TensorInfo], layout: str) -> dict[str, Any]:
    """What the tensor shapes alone say about the architecture (for checking params.json). Names and
    shapes come from the file, so a tensor of an unexpected rank says nothing rather than failing."""

    def dim(name: str, axis: int, rank: int = 2) -> int | None:
        t = sd.get(name)
        return int(t.shape[axis]) if t is not None and len(t.shape) == rank else None

    out: dict[str, Any] = {}
    if dim("tok_embeddings.weight", 0) is not None:
        out["vocab_size"], out["dim"] = dim("tok_embeddings.weight", 0), dim("tok_embeddings.weight", 1)
    layer_ids = {int(m[1]) for k in sd if (m := re.match(r"layers\.(\d{1,6})\.", k))}
    out["n_layers"] = max(layer_ids) + 1 if layer_ids else 0
    if (q := dim("layers.0.attention.wq.weight", 0)) is not None:
        out["n_heads * head_dim"] = q
    if (kv := dim("layers.0.attention.wk.weight", 0)) is not None:
        out["n_kv_heads * head_dim"] = kv
    if layout == "dense" and (h := dim("layers.0.feed_forward.w1.weight", 0)) is not None:
        out["hidden_dim"] = h
    elif layout == "experts" and (e := dim("layers.0.feed_forward.gate.weight", 0)) is not None:
        out["moe.num_experts"] = e
        if (h := dim("layers.0.feed_forward.experts.0.w1.weight", 0)) is not None:
            out["hidden_dim"] = h
    elif layout == "torrent" and (e := dim("layers.0.block_sparse_moe.gate.weight", 0)):
        out["moe.num_experts"] = e
        if (h := dim("layers.0.block_sparse_moe.w1", 0)) is not None:
            out["hidden_dim"] = h // e
    return out


# The releases mixchat recognises, by the shapes that identify them. n_layers is left out of the match
# (benchmarks cut folders to a few layers) and said beside the name instead.
FAMILIES: list[tuple[str, dict[str, Any], int]] = [
    ("Mistral-7B v0.1", {"dim": 4096, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 32000,
                         "moe": None}, 32),
    ("Mistral-7B v0.3 / Mathstral-7B", {"dim": 4096, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
                                        "vocab_size": 32768, "moe": None}, 32),
    ("Mixtral-8x7B", {"dim": 4096, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8, "moe": 8}, 32),
    ("Mixtral-8x22B", {"dim": 6144, "hidden_dim": 16384, "n_heads": 48, "n_kv_heads": 8, "moe": 8}, 56),
    ("Mistral-Nemo (12B) / Pixtral-12B", {"dim": 5120, "hidden_dim": 14336, "head_dim": 128, "n_heads": 32,
                                          "n_kv_heads": 8, "vocab_size": 131072, "moe": None}, 40),
    ("Mistral-Small (24B)", {"dim": 5120, "hidden_dim": 32768, "head_dim": 128, "n_heads": 32, "n_kv_heads": 8,
                             "vocab_size": 131072, "moe": None}, 40),
    ("Mistral-Small (22B) / Codestral-22B", {"dim": 6144, "hidden_dim": 16384, "n_heads": 48, "n_kv_heads": 8,
                                             "vocab_size": 32768, "moe": None}, 56),
    ("Ministral-8B", {"dim": 4096, "hidden_dim": 12288, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 131072,
                      "moe": None}, 36),
    ("Mistral-Large 2 (123B)", {"dim": 12288, "hidden_dim": 28672, "n_heads": 96, "n_kv_heads": 8,
                                "vocab_size": 32768, "moe": None}, 88),
]


def family(args: ModelArgs, layout: str = "dense") -> str:
    """A one-line description: the release family these shapes belong to (or the architecture), the
    layers and the width, e.g. "Mistral-Nemo (12B) / Pixtral-12B-like: 40 layers, dim 5120"."""
    values = {"dim": args.dim, "hidden_dim": args.hidden_dim, "head_dim": args.head_dim, "n_heads": args.n_heads,
              "n_kv_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
              "moe": args.moe.num_experts if args.moe else None}
    shape = f"{args.n_layers} layers, dim {args.dim}"
    for name, wanted, layers in FAMILIES:
        if all(values[k] == v for k, v in wanted.items()):
            cut = "" if args.n_layers == layers else f" (cut to {args.n_layers} of its {layers} layers)"
            return f"{name}-like: {shape}{cut}"
    kind = f"Mixtral-style MoE ({args.moe.num_experts} experts)" if args.moe else "Mistral-style dense model"
    return f"{kind}: {shape}"


def _declared(args: ModelArgs) -> dict[str, Any]:
    d = {"vocab_size": args.vocab_size, "dim": args.dim, "n_layers": args.n_layers,
         "n_heads * head_dim": args.n_heads * args.head_dim,
         "n_kv_heads * head_dim": args.n_kv_heads * args.head_dim, "hidden_dim": args.hidden_dim}
    if args.moe:
        d["moe.num_experts"] = args.moe.num_experts
    return d


def inspect_release(folder: str | Path) -> dict[str, Any]:
    """Everything `mixchat inspect` shows, as plain data (the --json output)."""
    release = Release.find(folder)
    args = release.args()
    everything = read_headers(release)
    sd = text_model(everything, args)  # a vision encoder's tensors are skipped: mixchat chats in text
    skipped = {k: t for k, t in everything.items() if k not in sd}
    layout = detect_layout(sd)

    namespaces = Counter(k.split(".")[0] for k in sd)
    per_layer = Counter(int(m[1]) for k in sd if (m := re.match(r"layers\.(\d{1,6})\.", k)))
    roles: dict[tuple, int] = Counter((_role(k), t.shape, t.dtype) for k, t in sd.items())
    n_params = sum(t.numel for t in sd.values())
    n_bytes = sum(t.nbytes for t in sd.values())
    # the input dimensions of the model's matrices (wq/wk/wv/w1/w3; wo; w2), whatever layout stores them
    estimates = memory_estimates({k: tuple(t.shape) for k, t in sd.items()},
                                 {args.dim, args.n_heads * args.head_dim, args.hidden_dim})

    try:
        validate(sd, args, release.weights_label, release.params)
        problem = None
    except ReleaseError as exc:
        problem = str(exc)
    implied = implied_by_shapes(sd, layout)
    declared = _declared(args)
    checks = [{"field": f, "params_json": declared.get(f), "shapes": implied.get(f),
               "ok": declared.get(f) == implied.get(f)} for f in declared]

    # What the engine would choose for a bf16 load now: weights mapped from the file stay in the page cache.
    kv_per_token = kv_bytes(args, torch.bfloat16, 1)
    kv_free = kv_memory(torch.device("cpu"), estimates.get("bf16", n_bytes))
    fits = kv_tokens_within(args, torch.bfloat16, kv_free) if kv_free else args.max_seq_len
    if args.moe:
        expert_params = sum(t.numel for k, t in sd.items() if ".experts." in k or ".block_sparse_moe.w" in k)
        active = n_params - expert_params + expert_params * args.moe.num_experts_per_tok // args.moe.num_experts
        arch = f"Mixtral (sparse MoE: {args.moe.num_experts} experts, top-{args.moe.num_experts_per_tok})"
    else:
        active, arch = n_params, "Mistral (dense)"

    tok: dict[str, Any] = {"path": release.tokenizer.name, "present": release.tokenizer.is_file()}
    if tok["present"]:
        from mixchat.text.tokenizer import find_tokenizer, load_tokenizer

        try:
            t = load_tokenizer(find_tokenizer(release.folder))
            tok.update(kind=t.kind, vocab_size=t.vocab_size, version=t.version, notes=list(t.notes),
                       matches_params=t.vocab_size == args.vocab_size)
        except MixchatError as exc:
            tok["error"] = str(exc)
    if problem is None:  # the loader refuses these too, so the verdict (and the exit status) must say so
        if not tok["present"]:
            problem = (f"{release.folder}: no tokenizer (tekken.json or tokenizer.model…): missing; copy the one "
                       "shipped with the release into the folder")
        elif "error" in tok:
            problem = tok["error"]
        elif not tok["matches_params"]:
            problem = (f"{release.tokenizer}: has {tok['vocab_size']} pieces but {release.params} says vocab_size "
                       f"{args.vocab_size}; use the tokenizer shipped with these weights")
    release_sums = parse_release_md5(release.release_file) if release.release_file.is_file() else {}

    return {
        "folder": str(release.folder),
        "family": family(args, layout) + (f", {tok['kind']} {tok['version']}" if "kind" in tok else ""),
        "weights": {"file": release.weights_label.name, "files": [p.name for p in release.weight_files],
                    "bytes": sum(p.stat().st_size for p in release.weight_files)},
        "vision_encoder": None if not skipped and "vision_encoder" not in args.extra else {
            "tensors": len(skipped), "bytes": sum(t.nbytes for t in skipped.values()),
            "note": "skipped: mixchat chats in text; images are not supported"},
        "tokenizer": tok,
        "release_md5_entries": len(release_sums),
        "architecture": arch,
        "layout": layout,
        "params": {
            "dim": args.dim, "n_layers": args.n_layers, "head_dim": args.head_dim, "hidden_dim": args.hidden_dim,
            "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "norm_eps": args.norm_eps,
            "vocab_size": args.vocab_size, "rope_theta": args.rope_theta,
            "sliding_window": args.sliding_window if len(set(args.layer_windows)) <= 1 else list(args.layer_windows),
            "max_seq_len": args.max_seq_len,
            "moe": None if args.moe is None else {"num_experts": args.moe.num_experts,
                                                  "num_experts_per_tok": args.moe.num_experts_per_tok},
        },
        "defaulted": list(args.defaulted),
        "unknown_params": sorted(args.extra),
        "tensors": len(sd),
        "namespaces": dict(namespaces),
        "layers": len(per_layer),
        "tensors_per_layer": sorted(set(per_layer.values())),
        "roles": [{"role": r, "shape": list(s), "dtype": d, "count": c} for (r, s, d), c in roles.items()],
        "dtypes": dict(Counter(t.dtype for t in sd.values())),
        "parameters": n_params,
        "active_parameters_per_token": active,
        "bytes": n_bytes,
        "shape_check": checks,
        "problem": problem,
        "memory_estimate_bytes": estimates,
        "kv_cache_bytes_per_token_bf16": kv_per_token,
        "kv_cache_max_tokens": args.max_seq_len,
        "kv_cache_max_bytes_bf16": kv_bytes(args, torch.bfloat16, args.max_seq_len),
        "kv_cache_free_bytes_now": kv_free,
        "kv_cache_fits_tokens_now": fits,
    }


def instruct_name(tok: dict[str, Any]) -> str:
    """How the instruct format is usually named: v3-tekken for Mistral-Nemo's tekken v3, and so on."""
    return f"{tok['version']}-tekken" if tok.get("kind") == "tekken" else tok["version"]


def human_count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def format_report(r: dict[str, Any]) -> str:
    p = r["params"]
    files = r["weights"]["files"]
    lines = [
        f"{one_line(r['folder'])}",
        f"  family         {r['family']}",
        f"  architecture   {r['architecture']}, {r['layout']} layout",
        f"  weights        {r['weights']['file']} ({human_bytes(r['weights']['bytes'])}"
        + (f" in {len(files)} shards" if len(files) > 1 else "") + "), "
        f"{r['tensors']} tensors, dtypes {', '.join(f'{k}×{v}' for k, v in r['dtypes'].items())}",
        f"  parameters     {human_count(r['parameters'])} ({human_bytes(r['bytes'])})"
        + (f", {human_count(r['active_parameters_per_token'])} active per token"
           if r["active_parameters_per_token"] != r["parameters"] else ""),
    ]
    tok = r["tokenizer"]
    if not tok["present"]:
        lines.append("  tokenizer      MISSING (tekken.json or tokenizer.model)")
    elif "error" in tok:
        lines.append(f"  tokenizer      ERROR {tok['error']}")
    else:
        note = "" if tok["matches_params"] else f"  MISMATCH: params.json says {p['vocab_size']}"
        lines.append(f"  tokenizer      {tok['path']}: {tok['kind']}, {tok['vocab_size']} ids, instruct format "
                     f"{instruct_name(tok)}{note}")
        lines += [f"                 note: {n}" for n in tok.get("notes", [])]
    if r["vision_encoder"]:
        v = r["vision_encoder"]
        lines.append(f"  vision encoder {v['tensors']} tensors ({human_bytes(v['bytes'])}), {v['note']}")
    lines.append(f"  RELEASE        {r['release_md5_entries']} md5 entries (check them with `mixchat verify`)")
    lines.append("")
    lines.append("params.json (* = not in the file, default used)")
    for k, v in p.items():
        mark = "*" if k in r["defaulted"] or (k == "moe" and "moe" in r["defaulted"]) else " "
        lines.append(f"  {mark} {k:<15} {v}")
    if r["unknown_params"]:
        lines.append(f"    ignored keys:   {', '.join(r['unknown_params'])}")
    lines.append("")
    ns = ", ".join(f"{k} {v}" for k, v in r["namespaces"].items())
    lines.append(f"tensors by namespace: {ns}; {r['layers']} layers × {'/'.join(map(str, r['tensors_per_layer']))} "
                 "tensors per layer")
    width = max((len(x["role"]) for x in r["roles"]), default=4)
    lines.append(f"  {'role':<{width}}  {'shape':<18} {'dtype':<9} count")
    for x in r["roles"]:
        lines.append(f"  {x['role']:<{width}}  {str(x['shape']):<18} {x['dtype']:<9} {x['count']}")
    lines.append("")
    lines.append("params.json against the shapes")
    for c in r["shape_check"]:
        lines.append(f"  {'ok ' if c['ok'] else 'BAD'} {c['field']:<22} params.json {c['params_json']!s:<8} "
                     f"shapes {c['shapes']}")
    lines.append("  verdict: " + ("consistent" if r["problem"] is None else r["problem"]))
    lines.append("")
    est = r["memory_estimate_bytes"]
    lines.append("memory: weights " + ", ".join(f"{k} {human_bytes(v)}" for k, v in est.items())
                 + f"; KV cache {human_bytes(r['kv_cache_bytes_per_token_bf16'])}/token in bf16, "
                 f"{human_bytes(r['kv_cache_max_bytes_bf16'])} for the whole context "
                 f"({r['kv_cache_max_tokens']} tokens)")
    fits, free = r["kv_cache_fits_tokens_now"], r["kv_cache_free_bytes_now"]
    if fits < r["kv_cache_max_tokens"]:
        lines.append(f"context that fits now: {fits} tokens (what a KV cache can take in the {human_bytes(free)} "
                     "free beside the bf16 weights); mixchat uses that unless --context asks for less")
    elif free:
        lines.append(f"context that fits now: all {fits} tokens ({human_bytes(free)} free beside the bf16 weights)")
    return "\n".join(lines)


def md5_file(path: Path, show: bool | None = None) -> str:
    h = hashlib.md5()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with Progress(f"md5 {path.name}", path.stat().st_size, enabled=show) as bar, open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            bar.advance(n)
    return h.hexdigest()


def _inside(folder: Path, name: str) -> bool:
    """True if RELEASE's `name` is a plain file in `folder` (or below it), reached without leaving it."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return False
    target = (folder / p).resolve()  # a symlink that points outside fails here
    return target.is_relative_to(folder) and (not target.exists() or target.is_file())


def verify_release(folder: str | Path, out=print, show_progress: bool | None = None) -> None:
    """Check that the folder loads (params.json, names and shapes, tokenizer), then every md5 sum
    RELEASE lists. Raises ReleaseError (exit 2) for an unusable folder and ChecksumError (exit 1)
    if a listed file is missing or differs."""
    # A folder that does not load (a truncated or damaged weight file: the loader's error says to run
    # verify) still has its files checked against RELEASE: that is how a bad download shows.
    try:
        opened = open_release(folder)
    except ReleaseError as exc:
        opened, unloadable = None, exc
        release_file = Path(folder) / "RELEASE"
        if not release_file.is_file():
            raise
        out(f"FAILED    the folder does not load: {exc}")
    else:
        unloadable = None
        a = opened.args
        out(f"OK        params.json, {opened.release.weights_label.name} and {opened.release.tokenizer.name} fit "
            f"together ({opened.layout} layout, {a.n_layers} layers, vocab {a.vocab_size})")
        release_file = opened.release.release_file
        if not release_file.is_file():
            raise ReleaseError(f"{release_file}: missing, so there are no checksums to verify against")
    sums = parse_release_md5(release_file)
    if not sums:
        raise ReleaseError(f"{release_file}: holds no md5 lines ('<32 hex digits>  <file name>')")
    bad: list[str] = []
    refused: list[str] = []
    shown = release_file.parent
    folder = shown.resolve()
    for name, expected in sums.items():
        path = shown / name
        if not _inside(folder, name):
            # RELEASE is input: it must not make mixchat read /etc/shadow or a 1 TB file elsewhere.
            out(f"REFUSED   {visible(name)}: not a plain file inside {shown}")
            refused.append(visible(name))
            continue
        if not path.is_file():
            out(f"MISSING   {visible(name)}")
            bad.append(visible(name))
            continue
        found = md5_file(path, show_progress)
        if found == expected:
            out(f"OK        {visible(name)}  {found}")
        else:
            out(f"MISMATCH  {visible(name)}  expected {expected}, found {found}")
            bad.append(visible(name))
    for path in opened.release.weight_files if opened else ():
        if path.name not in sums:  # the release did not list it: nothing to compare with, but say so
            out(f"UNLISTED  {visible(path.name)}: RELEASE has no md5 for it")
    if refused:
        raise ChecksumError(
            f"{release_file}: lists {len(refused)} file(s) outside the folder ({', '.join(refused)[:200]}), which "
            "mixchat does not read" + (f", and {len(bad)} file(s) missing or not matching" if bad else "")
            + "; use the RELEASE file shipped with the weights"
        )
    if bad:
        mismatch = (f"{release_file}: {len(bad)} of {len(sums)} files missing or not matching "
                    f"({', '.join(bad)[:200]}); download them again")
        if unloadable is not None:
            # Unusable (exit 2) as the loader says, and the files RELEASE names as the likely cause.
            why = unloadable.what if isinstance(unloadable, DamagedFileError) else str(unloadable)
            raise ReleaseError(f"{why}; {mismatch}")
        raise ChecksumError(mismatch)
    if unloadable is not None:
        # Every file is as released, so the download is not the problem: the loader's reason is.
        raise ReleaseError(f"{unloadable} (its files match RELEASE)")
    out(f"all {len(sums)} files match RELEASE")
