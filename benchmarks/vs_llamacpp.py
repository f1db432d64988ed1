"""Benchmark mixchat against llama.cpp on this machine, with the same weights, one engine at a time.

    .venv/bin/pip install gguf            # once: the GGUF writer used for the conversion
    .venv/bin/python benchmarks/vs_llamacpp.py -m /data/mistral-7b
    .venv/bin/python benchmarks/vs_llamacpp.py -m /data/mistral-7b --quant int4 --threads 2 --out results.json
    .venv/bin/python benchmarks/vs_llamacpp.py -m /data/mistral-7b --clean --skip-mixchat --skip-llamacpp

What it does, caching everything under --cache-dir (default ~/.cache/mixchat-bench):
1. Builds llama.cpp's llama-bench and llama-quantize from the llama.cpp that the llama-cpp-python
   sdist vendors (a pinned, reproducible llama.cpp that pip can fetch), for this CPU only
   (GGML_NATIVE, Release, no BLAS/GPU backends). A finished build is reused.
2. Converts the release folder to a BF16 GGUF (architecture "llama": llama.cpp runs Mistral and
   Mixtral as llama, with expert_count for MoE), streaming one tensor at a time: besides the
   memory-mapped checkpoint it holds at most one layer's stacked experts (~1 GB for Mixtral 8x7B).
3. Quantises it with llama-quantize to Q8_0 and Q4_0 (only those --quant asks for), choosing the
   tensors as mixchat's --quant does (mixchat/speed/qformat.py): every attention and feed-forward matrix
   at the one type, output.weight at 8 bits, token embedding and MoE router left in BF16 (--pure
   --token-embedding-type bf16 --output-tensor-type q8_0). llama.cpp's default recipe (Q6_K output,
   Q8_0 attention for 8 experts, quantised embedding) would make it a comparison of recipes.
   Bits per weight: Q8_0 8.5 vs mixchat int8 8 (+ a scale per row); Q4_0 4.5 vs mixchat int4 4.25
   (groups of 128 with an fp16 scale and zero; 4.5 with fp32 ones before 0.8.0); --mixchat-int4
   int4-32/int4-64 spends more bits.
4. For each precision (bf16 <-> BF16, int8 <-> Q8_0, int4 <-> Q4_0) runs `llama-bench` and then
   `mixchat bench`, never both at once, and prints prefill and decode tokens/s and the ratio
   mixchat/llama.cpp (above 1 means mixchat is faster). Around each run it probes the memory read
   rate (mixchat's read probe, between the runs, the same for both engines) and also gives the decode
   ratio per probed GB/s: on a VM whose memory speed moves over minutes, the raw ratio of one round
   says as much about the minute each engine ran in as about the engines (--no-probe skips it).

GGUF files stay in the cache for the next run (their sizes are printed); --clean deletes this
folder's GGUF files at the end. A 7B model needs about 14.5 + 7.7 + 4.4 GB of disk for all three.

Differences between the two measurements to keep in mind:
- llama-bench times decode (tg) on an empty context; mixchat bench decodes after its prompt. With
  the default 128 + 32 tokens the attention over the context is a small share of the time.
- llama-bench reports the mean of its runs, mixchat bench the median.
- llama.cpp's llama architecture ignores params.json's sliding_window; it changes nothing while the
  prompt plus decode fits in the window (4096 for Mistral-7B).
- Peak RSS (measured here, the same way for both) counts the memory-mapped weights that were
  touched; mixchat's also holds the 1 GiB matrix of its memory-bandwidth probe, which matters only
  for tiny models.
- mixchat --quant quantises at load and caches the result: the first int8/int4 run loads slowly,
  which changes load_seconds but not tokens/s.

This script is never run by CI; it needs cmake, a C++17 compiler, pip access to PyPI, and several
minutes of build time on first use. Run it on an otherwise idle machine, or the numbers mean little.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from mixchat.release.config import ModelArgs

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TARGETS = ("llama-bench", "llama-quantize")
# Bump when the conversion changes so cached GGUF files made by an older script are not reused.
CONVERT_VERSION = 1
# mixchat precision -> (GGUF file type that llama-quantize takes, file name in the cache).
PRECISIONS = {"bf16": ("BF16", "bf16.gguf"), "int8": ("Q8_0", "q8_0.gguf"), "int4": ("Q4_0", "q4_0.gguf")}
# Bytes per weight of each GGUF type, for the disk-space check before anything is written.
BYTES_PER_WEIGHT = {"BF16": 2.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32}
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mixchat-bench"


class BenchError(Exception):
    """A failure the user can act on; main() prints it as one line and exits 1."""


def log(msg: str) -> None:
    print(f"[vs_llamacpp] {msg}", flush=True)


def gb(n_bytes: float) -> float:
    return n_bytes / 1e9


# ----------------------------------------------------------------------------------------------
# 1. llama.cpp build


def run_logged(cmd: list[str], log_file: Path, what: str) -> None:
    """Run a long step with its output in log_file; on failure show its tail and point at the log."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
        except FileNotFoundError:
            raise BenchError(f"{what}: {cmd[0]} not found") from None
    if rc != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-15:]
        print("\n".join("    " + line for line in tail), file=sys.stderr)
        raise BenchError(f"{what} failed (exit {rc}); full output in {log_file}")


def fetch_llamacpp_source(cache: Path) -> Path:
    """The llama.cpp tree vendored in the llama-cpp-python sdist, downloaded and unpacked once."""
    top = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    src = cache / "src" / top / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    sdist_dir = cache / "sdist"
    sdist = sdist_dir / f"{top}.tar.gz"
    if not sdist.is_file():
        log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist into {sdist_dir}")
        run_logged([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                    "--no-deps", "--no-binary", ":all:", "-d", str(sdist_dir)],
                   cache / "download.log", "pip download of llama-cpp-python")
        if not sdist.is_file():
            raise BenchError(f"pip download did not produce {sdist}; see {cache / 'download.log'}")
    log(f"unpacking llama.cpp from {sdist.name}")
    prefix = f"{top}/vendor/llama.cpp/"
    # Unpack into a scratch folder and rename, so an interrupted unpack is never taken for a tree.
    scratch = Path(tempfile.mkdtemp(prefix="unpack-", dir=cache))
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            if not members:
                raise BenchError(f"{sdist}: no vendor/llama.cpp inside; delete it and run again")
            kwargs: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(scratch, members=members, **kwargs)
        src.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(src, ignore_errors=True)
        (scratch / prefix).rename(src)
    except (tarfile.TarError, OSError) as exc:
        raise BenchError(f"{sdist}: cannot unpack ({exc}); delete it and run again") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return src


def build_llamacpp(cache: Path, jobs: int) -> dict[str, Path]:
    """Paths of llama-bench and llama-quantize, building them on first use."""
    build = cache / "build" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}-native"
    bins = {t: build / "bin" / t for t in TARGETS}
    if all(p.is_file() and os.access(p, os.X_OK) for p in bins.values()):
        log(f"reusing the llama.cpp build in {build}")
        return bins
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found; building llama.cpp needs cmake and a C++17 compiler")
    src = fetch_llamacpp_source(cache)
    log_file = build / "build.log"
    flags = {
        "CMAKE_BUILD_TYPE": "Release",
        "GGML_NATIVE": "ON",  # -march=native: the fastest llama.cpp this CPU can run, as a user would build it
        # CPU backend only: mixchat runs on CPU torch, and BLAS would change prefill, not the engine.
        "GGML_CUDA": "OFF", "GGML_BLAS": "OFF", "GGML_VULKAN": "OFF", "GGML_METAL": "OFF", "GGML_HIP": "OFF",
        # Static binaries run from the cache without LD_LIBRARY_PATH.
        "BUILD_SHARED_LIBS": "OFF",
        "LLAMA_BUILD_COMMON": "ON", "LLAMA_BUILD_TOOLS": "ON",
        "LLAMA_BUILD_TESTS": "OFF", "LLAMA_BUILD_EXAMPLES": "OFF", "LLAMA_BUILD_SERVER": "OFF",
        "LLAMA_BUILD_APP": "OFF",
        # No network code: nothing here downloads models, and it needs no OpenSSL/curl headers.
        "LLAMA_OPENSSL": "OFF", "LLAMA_CURL": "OFF",
    }
    log(f"configuring llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s vendored copy) in {build}")
    log(f"log: {log_file}")
    start = time.perf_counter()
    run_logged(["cmake", "-S", str(src), "-B", str(build), "--no-warn-unused-cli",
                *(f"-D{k}={v}" for k, v in flags.items())], log_file, "llama.cpp cmake configure")
    log(f"building {' and '.join(TARGETS)} with {jobs} job(s); this takes several minutes the first time")
    run_logged(["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *TARGETS],
               log_file, "llama.cpp build")
    missing = [str(p) for p in bins.values() if not p.is_file()]
    if missing:
        raise BenchError(f"the build finished but {missing[0]} is missing; see {log_file}")
    log(f"built llama.cpp in {time.perf_counter() - start:.0f} s")
    return bins


# ----------------------------------------------------------------------------------------------
# 2. Release folder -> BF16 GGUF


def require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise BenchError(f"the gguf package is missing: `{sys.executable} -m pip install gguf`") from None
    return gguf


def sp_piece_types(path: Path) -> list[int]:
    """Each piece's type straight from tokenizer.model's protobuf (ModelProto.pieces[].type).

    sentencepiece's Python API answers is_control/is_byte/... but has no is_user_defined, and the
    generated protobuf module needs the protobuf package; the wire format of these three fields is
    simple enough to read here. sentencepiece's type numbers are the same as GGUF's token types.
    """

    def varint(buf: bytes, i: int) -> tuple[int, int]:
        n = shift = 0
        while True:
            b = buf[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return n, i

    def fields(buf: bytes) -> Any:
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            num, wire = key >> 3, key & 7
            if wire == 0:
                val, i = varint(buf, i)
            elif wire == 1:
                val, i = buf[i:i + 8], i + 8
            elif wire == 2:
                size, i = varint(buf, i)
                val, i = buf[i:i + size], i + size
            elif wire == 5:
                val, i = buf[i:i + 4], i + 4
            else:
                raise ValueError(f"unsupported protobuf wire type {wire}")
            yield num, val

    types = []
    for num, piece in fields(path.read_bytes()):
        if num == 1:  # ModelProto.pieces
            types.append(next((v for n, v in fields(piece) if n == 3), 1))  # SentencePiece.type, default NORMAL
    return types


def tokenizer_vocab(path: Path, vocab_size: int, gguf: Any) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types for llama.cpp's SentencePiece ("llama") tokenizer."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tt = gguf.TokenType
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(tt.UNKNOWN)
        elif sp.is_control(i):
            types.append(tt.CONTROL)
        elif sp.is_byte(i):
            types.append(tt.BYTE)
        elif sp.is_unused(i):
            types.append(tt.UNUSED)
        else:
            types.append(tt.NORMAL)
    try:
        raw = sp_piece_types(path)
    except (ValueError, IndexError):
        raw = []  # an unreadable proto only costs the USER_DEFINED marks, which tokenization alone uses
    if len(raw) == len(types):
        types = [tt.USER_DEFINED if r == tt.USER_DEFINED else t for r, t in zip(raw, types, strict=True)]
    # params.json may pad the embedding past the tokenizer (mixchat checked it is not smaller).
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(tt.UNUSED)
    return tokens, scores, [int(t) for t in types]


@dataclass
class PlannedTensor:
    """One GGUF tensor: its name, numpy-order shape and type, and how to make it when its turn comes."""

    name: str
    shape: tuple[int, ...]
    bf16: bool  # False: F32 (the norms)
    make: Any = field(repr=False)  # () -> torch.Tensor of `shape`

    @property
    def nbytes(self) -> int:
        n = 2 if self.bf16 else 4
        for d in self.shape:
            n *= d
        return n


def plan_tensors(state: dict[str, Any], args: ModelArgs) -> list[PlannedTensor]:
    """GGUF tensors of llama.cpp's llama architecture, from mixchat's experts-layout state dict.

    Mistral's wq/wk rows are already in the interleaved rotary order that llama.cpp's llama graph
    uses (Meta's layout), so unlike a Hugging Face checkpoint they are copied without a permute.
    """
    import torch

    def same(key: str) -> Any:
        return lambda: state[key]

    def stacked(keys: list[str]) -> Any:
        # The one copy the conversion makes: a layer's experts for one matrix (~1 GB for Mixtral 8x7B).
        return lambda: torch.stack([state[k] for k in keys])

    def shape_of(key: str) -> tuple[int, ...]:
        return tuple(state[key].shape)

    plan = [PlannedTensor("token_embd.weight", shape_of("tok_embeddings.weight"), True, same("tok_embeddings.weight"))]
    for i in range(args.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        for src, dst in (("attention_norm.weight", "attn_norm.weight"), ("attention.wq.weight", "attn_q.weight"),
                         ("attention.wk.weight", "attn_k.weight"), ("attention.wv.weight", "attn_v.weight"),
                         ("attention.wo.weight", "attn_output.weight"), ("ffn_norm.weight", "ffn_norm.weight")):
            plan.append(PlannedTensor(b + dst, shape_of(p + src), not dst.endswith("norm.weight"), same(p + src)))
        if args.moe is None:
            for w, dst in (("w1", "ffn_gate"), ("w2", "ffn_down"), ("w3", "ffn_up")):
                key = p + f"feed_forward.{w}.weight"
                plan.append(PlannedTensor(b + dst + ".weight", shape_of(key), True, same(key)))
            continue
        e = args.moe.num_experts
        router = p + "feed_forward.gate.weight"
        plan.append(PlannedTensor(b + "ffn_gate_inp.weight", shape_of(router), True, same(router)))
        for w, dst in (("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")):
            keys = [p + f"feed_forward.experts.{j}.{w}.weight" for j in range(e)]
            plan.append(PlannedTensor(b + dst + ".weight", (e, *shape_of(keys[0])), True, stacked(keys)))
    plan.append(PlannedTensor("output_norm.weight", shape_of("norm.weight"), False, same("norm.weight")))
    plan.append(PlannedTensor("output.weight", shape_of("output.weight"), True, same("output.weight")))
    return plan


def as_numpy(t: Any, bf16: bool) -> np.ndarray:
    """The tensor's bytes as numpy, without a copy when it already has the wanted dtype and layout
    (numpy has no bfloat16, so BF16 travels as int16 and the GGUF type says what it is)."""
    import torch

    if bf16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return t.to(torch.float32).contiguous().numpy()


def convert_to_gguf(folder: Path, out: Path) -> None:
    """Write `out` as a BF16 GGUF of the release folder, one tensor in memory at a time."""
    gguf = require_gguf()
    import numpy as np

    from mixchat.release.folder import model_state, open_release

    opened = open_release(folder)
    args = opened.args
    state = model_state(opened.state, args, opened.layout)
    plan = plan_tensors(state, args)
    total = sum(t.nbytes for t in plan)
    log(f"converting {folder} ({opened.layout} layout) to {out} ({gb(total):.2f} GB)")

    partial = out.with_name(out.name + ".partial")  # renamed when complete: a cut-off file is never reused
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name(folder.name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    # Written out because head_dim need not be dim / n_heads (Mistral NeMo: 5120 / 32 heads of 128).
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    if args.moe is not None:
        writer.add_expert_count(args.moe.num_experts)
        writer.add_expert_used_count(args.moe.num_experts_per_tok)
    tokens, scores, types = tokenizer_vocab(opened.release.tokenizer, args.vocab_size, gguf)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    tok = opened.tokenizer
    writer.add_bos_token_id(getattr(tok, "bos_id", 1))
    writer.add_eos_token_id(getattr(tok, "eos_id", 2))
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    for t in plan:
        if t.bf16:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.int16), t.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes)
    start = time.perf_counter()
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        done = 0
        last = start
        # Streaming: only the tensor being written is materialised; the rest stay pages of the
        # memory-mapped checkpoint, so a 14.5 GB folder converts in well under its own size of RAM.
        for t in plan:
            data = as_numpy(t.make(), t.bf16)
            if tuple(data.shape) != t.shape:
                raise BenchError(f"{t.name}: made shape {tuple(data.shape)}, planned {t.shape}; a bug in this script")
            writer.write_tensor_data(data)
            done += t.nbytes
            del data
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                log(f"  {gb(done):.1f} / {gb(total):.1f} GB written")
        writer.close()
        partial.rename(out)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    log(f"wrote {out} in {time.perf_counter() - start:.0f} s")


def gguf_dir(cache: Path, folder: Path) -> Path:
    """This folder's GGUF cache: keyed by its path, weights size and mtime and params.json, so
    replaced weights are converted again instead of benchmarking a stale copy."""
    from mixchat.release.folder import Release

    release = Release.find(folder)
    st = release.weights.stat()
    key = f"{CONVERT_VERSION}|{folder.resolve()}|{st.st_size}|{st.st_mtime_ns}|{release.params.read_bytes()!r}"
    return cache / "gguf" / f"{folder.resolve().name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def check_disk(where: Path, needed: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    # 1 GB of slack so the conversion cannot fill the disk to the last byte.
    if free < needed + 1_000_000_000:
        raise BenchError(f"{where}: needs {gb(needed):.1f} GB free for the GGUF files, has {gb(free):.1f} GB; "
                         "pass --cache-dir on a bigger disk or fewer --quant")


def prepare_ggufs(folder: Path, cache: Path, precisions: list[str], quantize: Path, threads: int) -> dict[str, Path]:
    """The GGUF file of each precision, converting and quantising only what the cache lacks."""
    from mixchat.release.folder import Release, read_header

    out_dir = gguf_dir(cache, folder)
    files = {p: out_dir / PRECISIONS[p][1] for p in precisions}
    files["bf16"] = out_dir / PRECISIONS["bf16"][1]  # the source of every quantisation
    n_weights = sum(t.numel for t in read_header(Release.find(folder).weights).values())
    needed = sum(int(n_weights * BYTES_PER_WEIGHT[PRECISIONS[p][0]]) for p, f in files.items() if not f.is_file())
    if needed:
        check_disk(out_dir, needed)
    if files["bf16"].is_file():
        log(f"reusing {files['bf16']}")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        convert_to_gguf(folder, files["bf16"])
    for p in precisions:
        if p == "bf16":
            continue
        qtype, out = PRECISIONS[p][0], files[p]
        if out.is_file():
            log(f"reusing {out}")
            continue
        partial = out.with_name(out.name + ".partial")
        log(f"quantising to {qtype} with llama-quantize -> {out}")
        start = time.perf_counter()
        # --pure and the two overrides: the tensors and types mixchat's --quant picks (see the docstring).
        run_logged([str(quantize), "--pure", "--token-embedding-type", "bf16", "--output-tensor-type", "q8_0",
                    str(files["bf16"]), str(partial), qtype, str(threads)],
                   out_dir / f"quantize-{qtype.lower()}.log", f"llama-quantize to {qtype}")
        partial.rename(out)
        log(f"quantised in {time.perf_counter() - start:.0f} s")
    for p in precisions:
        log(f"  {p:5s} {files[p].name:10s} {gb(files[p].stat().st_size):7.2f} GB  {files[p]}")
    return {p: files[p] for p in precisions}


def clean_ggufs(cache: Path, folder: Path) -> None:
    out_dir = gguf_dir(cache, folder)
    if not out_dir.is_dir():
        log(f"--clean: no GGUF files cached for {folder}")
        return
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    shutil.rmtree(out_dir)
    log(f"--clean: removed {out_dir} ({gb(size):.2f} GB)")


# ----------------------------------------------------------------------------------------------
# 3. Running the two benchmarks


@dataclass
class Result:
    precision: str
    engine: str  # "llama.cpp" or "mixchat"
    weights_gb: float
    prefill_tps: float
    decode_tps: float
    peak_rss_gb: float | None = None
    load_seconds: float | None = None
    raw: Any = None
    round: int = 0  # --rounds: which alternation this run belongs to
    probe_gbps: float | None = None  # the memory read rate just before and after this run (their mean)


class Prober:
    """The machine's memory read rate around each engine's run: mixchat's read probe (csrc/probe.c, the
    widest loads the CPU has, 1 GiB, on the benchmark's threads) in this process, between the runs, so both
    engines are measured against the same yardstick. On a VM whose memory speed moves by half over minutes
    (33 to 66 GB/s on the 2-core EPYC these figures come from) a round's decode ratio follows which engine
    ran in the faster minutes; tokens/s per probed GB/s does not. None where the kernels cannot be built."""

    def __init__(self, threads: int, enabled: bool) -> None:
        self.threads, self.reason = threads, None
        if not enabled:
            self.reason = "--no-probe"
            return
        try:
            from mixchat.speed import kernels

            if not kernels.available():
                self.reason = kernels.reason()
        except Exception as exc:  # noqa: BLE001 - a figure to print beside the results, never a reason to stop
            self.reason = f"{type(exc).__name__}: {exc}"

    def rate(self) -> float | None:
        """GB/s now; the 1 GiB it reads is allocated for the probe and freed before the next engine runs (held
        across a run, it would be memory the engine's own choices, huge pages and context, count as taken)."""
        if self.reason is not None:
            return None
        try:
            from mixchat.speed import kernels

            return kernels.read_probe(threads=self.threads, reps=3)
        except Exception as exc:  # noqa: BLE001
            log(f"read probe failed ({type(exc).__name__}: {exc}); no probe figure for this run")
            return None

    def around(self, run: Callable[[], Result]) -> Result:
        before = self.rate()
        result = run()
        after = self.rate()
        if before and after:
            result.probe_gbps = round((before + after) / 2, 2)
        return result


def vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_measured(cmd: list[str], log_file: Path) -> tuple[str, float]:
    """stdout of `cmd` and its peak RSS in GB; stderr goes to log_file, and a failure raises with
    its tail and the log's path.

    The peak is the child's VmHWM, polled until it exits. Its ru_maxrss would not do: Linux carries
    the forking process's RSS over exec into it, and this process may hold torch and a mapped
    checkpoint from the conversion, which would add to a small model's figure (mixchat's own
    peak_rss_gb has the same flaw, so both engines are measured here).
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as out, open(log_file, "wb") as err:
        err.write(f"$ {' '.join(cmd)}\n".encode())
        err.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err)  # returns once the child has exec'd
        except FileNotFoundError:
            raise BenchError(f"{cmd[0]} not found") from None
        peak_kib = 0
        try:
            while True:
                peak_kib = max(peak_kib, vm_hwm_kib(proc.pid))  # monotonic, so polling loses little
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                time.sleep(0.05)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keeps Popen from waiting again
        out.seek(0)
        stdout = out.read().decode(errors="replace")
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-10:]
        print("\n".join("    " + line for line in tail), file=sys.stderr)
        raise BenchError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}); its output is in {log_file}")
    return stdout, (peak_kib or usage.ru_maxrss) * 1024 / 1e9  # both in KiB on Linux


def bench_llamacpp(bench: Path, model: Path, precision: str, ns: argparse.Namespace, logs: Path) -> Result:
    cmd = [str(bench), "-m", str(model), "-p", str(ns.prompt_tokens), "-n", str(ns.decode_tokens),
           "-t", str(ns.threads), "-r", str(ns.runs), "-o", "json"]
    log(f"llama.cpp {precision}: {' '.join(cmd)}")
    log_file = logs / f"llama-bench-{precision}.log"
    stdout, rss = run_measured(cmd, log_file)
    try:
        records = json.loads(stdout)
        # llama-bench reports one record per test: pp (n_gen 0) is prefill, tg (n_prompt 0) is decode.
        pp = next(r for r in records if r["n_prompt"] > 0 and r["n_gen"] == 0)
        tg = next(r for r in records if r["n_gen"] > 0 and r["n_prompt"] == 0)
    except (json.JSONDecodeError, StopIteration, KeyError, TypeError):
        raise BenchError(f"llama-bench printed no pp/tg results; its log is {log_file}") from None
    return Result(precision, "llama.cpp", round(gb(model.stat().st_size), 3), round(float(pp["avg_ts"]), 2),
                  round(float(tg["avg_ts"]), 3), peak_rss_gb=round(rss, 2), raw=records)


def mixchat_command() -> list[str]:
    # The venv's console script when this runs from the venv, else the module from this interpreter.
    script = Path(sys.executable).with_name("mixchat")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mixchat"]


def mixchat_quant_choices() -> set[str]:
    """The --quant values this checkout's `mixchat bench` takes; empty where it has no --quant
    (it arrived after bench itself, and only bf16 can be compared then)."""
    proc = subprocess.run([*mixchat_command(), "bench", "--help"], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"`mixchat bench --help` failed: {last[0]}")
    m = re.search(r"--quant \{([^}]*)\}", proc.stdout)
    return set(m[1].split(",")) if m else set()


def mixchat_quant_flag(precision: str, choices: set[str], int4: str) -> list[str] | None:
    """mixchat bench's arguments for `precision`; None where this mixchat cannot run it."""
    if precision == "bf16":
        return ["--quant", "none"] if "none" in choices else []  # the release dtype: bf16 for Mistral's files
    value = int4 if precision == "int4" else precision
    return ["--quant", value] if value in choices else None


def mixchat_weights_gb(folder: Path, quant: str | None) -> float:
    """The weight bytes mixchat keeps for `quant` (its bench's "quant" name, e.g. int4-64; None
    for the release dtype): `mixchat inspect`'s estimate, else the release file's size."""
    from mixchat.release.folder import Release

    try:
        from mixchat.release.inspection import inspect_release

        estimate = inspect_release(folder).get("memory_estimate_bytes", {}).get(quant or "bf16")
        if estimate:
            return gb(estimate)
    except Exception:  # only a display nicety, and mixchat/release/inspection.py is still changing
        pass
    return gb(Release.find(folder).weights.stat().st_size)


def bench_mixchat(folder: Path, precision: str, quant_flag: list[str], ns: argparse.Namespace, logs: Path) -> Result:
    cmd = [*mixchat_command(), "bench", "-m", str(folder), "--json", "--prompt-tokens", str(ns.prompt_tokens),
           "--decode-tokens", str(ns.decode_tokens), "--threads", str(ns.threads), "--runs", str(ns.runs),
           *quant_flag]
    log(f"mixchat {precision}: {' '.join(cmd)}")
    log_file = logs / f"mixchat-bench-{precision}.log"
    stdout, rss = run_measured(cmd, log_file)
    start = stdout.find("{")
    try:
        data = json.loads(stdout[start:]) if start >= 0 else None
        prefill, decode = float(data["prefill_tokens_per_second"]), float(data["decode_tokens_per_second"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise BenchError(f"mixchat bench printed no JSON result; its log is {log_file}") from None
    return Result(precision, "mixchat", round(mixchat_weights_gb(folder, data.get("quant")), 3), prefill, decode,
                  peak_rss_gb=round(rss, 2), load_seconds=data.get("load_seconds"),
                  raw=data)


# ----------------------------------------------------------------------------------------------
# 4. Report


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def summarize(results: list[Result]) -> tuple[list[Result], dict[str, dict[str, Any]]]:
    """One Result per (precision, engine) with the median over rounds, and per precision the ratios
    mixchat/llama.cpp: the median of each round's own ratio (the two runs of a round are back to back, so
    a drift in the machine's memory speed between rounds cancels) and the list of them."""
    merged: list[Result] = []
    for key in dict.fromkeys((r.precision, r.engine) for r in results):
        runs = [r for r in results if (r.precision, r.engine) == key]
        first = runs[0]
        rss = [r.peak_rss_gb for r in runs if r.peak_rss_gb is not None]
        probes = [r.probe_gbps for r in runs if r.probe_gbps]
        merged.append(Result(first.precision, first.engine, first.weights_gb,
                             round(median([r.prefill_tps for r in runs]), 2),
                             round(median([r.decode_tps for r in runs]), 3),
                             peak_rss_gb=max(rss) if rss else None, load_seconds=first.load_seconds,
                             raw=[r.raw for r in runs] if len(runs) > 1 else first.raw,
                             probe_gbps=round(median(probes), 2) if probes else None))
    ratios: dict[str, dict[str, Any]] = {}
    for p in dict.fromkeys(r.precision for r in results):
        pairs = [(m, c) for m in results for c in results if m.precision == c.precision == p
                 and m.round == c.round and m.engine == "mixchat" and c.engine == "llama.cpp"]
        if pairs:
            pre = [ratio(m.prefill_tps, c.prefill_tps) for m, c in pairs]
            dec = [ratio(m.decode_tps, c.decode_tps) for m, c in pairs]
            ratios[p] = {"prefill": round(median(pre), 3), "decode": round(median(dec), 3),
                         "prefill_rounds": pre, "decode_rounds": dec}
            if all(m.probe_gbps and c.probe_gbps for m, c in pairs):
                # each engine's decode per GB/s the machine read around its own run
                fair = [ratio(m.decode_tps / m.probe_gbps, c.decode_tps / c.probe_gbps) for m, c in pairs]
                ratios[p].update(decode_per_probe=round(median(fair), 3), decode_per_probe_rounds=fair)
    return merged, ratios


def print_table(results: list[Result]) -> None:
    header = ("precision", "engine", "weights GB", "prefill tok/s", "decode tok/s", "peak RSS GB", "probe GB/s",
              "prefill ratio", "decode ratio", "per probe")
    rounds = len({r.round for r in results})
    results, ratios = summarize(results)
    rows = []
    for r in results:
        mine = ratios.get(r.precision, {}) if r.engine == "mixchat" else {}
        pre, dec, fair = mine.get("prefill"), mine.get("decode"), mine.get("decode_per_probe")
        size = f"{r.weights_gb:.2f}" if r.weights_gb >= 1 else f"{r.weights_gb:.3f}"  # tiny test models
        rows.append((r.precision, r.engine, size, f"{r.prefill_tps:.1f}", f"{r.decode_tps:.2f}",
                     "" if r.peak_rss_gb is None else f"{r.peak_rss_gb:.2f}",
                     "" if r.probe_gbps is None else f"{r.probe_gbps:.1f}",
                     "" if pre is None else f"{pre:.2f}x", "" if dec is None else f"{dec:.2f}x",
                     "" if fair is None else f"{fair:.2f}x"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    print("\nratio: mixchat tokens/s over llama.cpp's at the same precision (above 1: mixchat is faster).")
    if rounds > 1:
        print(f"{rounds} rounds, the engines alternating: tok/s are medians over rounds, ratios the median of the "
              "rounds' own ratios:")
        for p, r in ratios.items():
            fair = r.get("decode_per_probe_rounds")
            print(f"  {p}: prefill {', '.join(f'{x:.2f}' for x in r['prefill_rounds'])}; "
                  f"decode {', '.join(f'{x:.2f}' for x in r['decode_rounds'])}"
                  + (f"; decode per probe {', '.join(f'{x:.2f}' for x in fair)}" if fair else ""))
    if any(r.probe_gbps for r in results):
        print("probe GB/s: the memory read rate probed just before and after each run (median over rounds); per "
              "probe: the decode ratio with each engine's tok/s divided by the rate around its own run, so a VM's "
              "faster or slower minutes do not decide it.")
    print("weights GB: llama.cpp's GGUF file; mixchat's weights in memory (`mixchat inspect`'s estimate).\n")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(path: Path, folder: Path, ns: argparse.Namespace, results: list[Result]) -> None:
    _, ratios = summarize(results)
    doc = {
        "model": str(folder), "cpu": cpu_name(), "cores": os.cpu_count(),
        "llama_cpp": f"vendored in llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}, GGML_NATIVE, CPU backend",
        "settings": {"prompt_tokens": ns.prompt_tokens, "decode_tokens": ns.decode_tokens, "threads": ns.threads,
                     "runs": ns.runs, "rounds": ns.rounds},
        "results": [r.__dict__ for r in results],
        "ratios_mixchat_over_llamacpp": ratios,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {path}")


# ----------------------------------------------------------------------------------------------


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, default=os.environ.get("MIXCHAT_MODEL"),
                    help="release folder (params.json, consolidated.00.pth, tokenizer.model); default $MIXCHAT_MODEL")
    ap.add_argument("--quant", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS),
                    help="precisions to compare (default: bf16 int8 int4)")
    ap.add_argument("--prompt-tokens", type=positive, default=128)
    ap.add_argument("--decode-tokens", type=positive, default=32)
    ap.add_argument("--threads", type=positive, default=2, help="threads for both engines (default 2)")
    ap.add_argument("--runs", type=positive, default=3, help="repetitions per test (default 3)")
    ap.add_argument("--rounds", type=positive, default=1,
                    help="run both engines this many times, alternating (llama.cpp first in odd rounds, mixchat in "
                    "even ones), and report medians: this machine's memory speed drifts by 20%% over minutes, so "
                    "one run of each can mislead (default 1)")
    ap.add_argument("--mixchat-int4", default="int4", metavar="CHOICE",
                    help="mixchat's --quant for int4 (default int4: groups of 128, 4.25 bits per weight against "
                    "Q4_0's 4.5; int4-64 spends as many as Q4_0, int4-32 more)")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                    help=f"llama.cpp download, build and GGUF files (default {DEFAULT_CACHE})")
    ap.add_argument("--jobs", type=positive, default=os.cpu_count() or 1, help="parallel compile jobs")
    ap.add_argument("--skip-mixchat", action="store_true", help="only run llama.cpp")
    ap.add_argument("--skip-llamacpp", action="store_true", help="only run mixchat (no build, no GGUF)")
    ap.add_argument("--clean", action="store_true", help="delete this folder's cached GGUF files at the end")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    ap.add_argument("--no-probe", action="store_true",
                    help="skip the memory read probe around each run (3 passes over 1 GiB before and after; it "
                    "gives the decode ratio per probed GB/s)")
    ns = ap.parse_args(argv)
    if ns.model is None:
        ap.error("pass the release folder with -m/--model (or set MIXCHAT_MODEL)")
    ns.quant = list(dict.fromkeys(ns.quant))  # keep the order given, drop repeats
    return ns


def run(ns: argparse.Namespace) -> int:
    from mixchat.release.folder import Release

    folder = ns.model.expanduser()
    Release.find(folder)  # a wrong folder fails now, not after a long build
    cache = ns.cache_dir.expanduser()
    results: list[Result] = []
    logs = cache / "logs"

    ggufs: dict[str, Path] = {}
    bins: dict[str, Path] = {}
    if not ns.skip_llamacpp:
        require_gguf()  # before the build, so a missing package costs seconds, not minutes
        bins = build_llamacpp(cache, ns.jobs)
        ggufs = prepare_ggufs(folder, cache, ns.quant, bins["llama-quantize"], ns.threads)
        os.sync()  # GB of freshly written GGUF still being flushed would slow the first benchmark
    flags: dict[str, list[str] | None] = {}
    if not ns.skip_mixchat:
        choices = mixchat_quant_choices()
        flags = {p: mixchat_quant_flag(p, choices, ns.mixchat_int4) for p in ns.quant}
        for p, flag in flags.items():
            if flag is None:
                log(f"this mixchat's `bench --quant` cannot run {p} (it takes {sorted(choices) or 'no --quant'}); "
                    "llama.cpp only for it")

    prober = Prober(ns.threads, not ns.no_probe)
    if prober.reason and not ns.no_probe:
        log(f"no read probe ({prober.reason}): decode ratios are not normalised by the memory rate")
    # Strictly one engine at a time: both want every core and all memory bandwidth.
    try:
        for p in ns.quant:
            for n in range(ns.rounds):
                engines = ([] if ns.skip_llamacpp else ["llama.cpp"]) + ([] if flags.get(p) is None else ["mixchat"])
                for engine in engines if n % 2 == 0 else engines[::-1]:
                    if engine == "llama.cpp":
                        result = prober.around(lambda p=p: bench_llamacpp(bins["llama-bench"], ggufs[p], p, ns, logs))
                    else:
                        result = prober.around(lambda p=p: bench_mixchat(folder, p, flags[p], ns, logs))
                    result.round = n
                    results.append(result)
    finally:
        if results:
            print_table(results)  # what finished is shown even when a later step fails

    if ns.out:
        write_json(ns.out, folder, ns, results)
    if ns.clean:
        clean_ggufs(cache, folder)
    elif ggufs:
        log(f"GGUF files kept in {gguf_dir(cache, folder)} "
            f"({gb(sum(f.stat().st_size for f in ggufs.values())):.2f} GB); --clean removes them")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        from mixchat.errors import MixchatError
    except ImportError:
        print("vs_llamacpp: error: cannot import mixchat; run this with the project's venv (.venv/bin/python)",
              file=sys.stderr)
        return 1
    try:
        return run(ns)
    except KeyboardInterrupt:
        print("\nvs_llamacpp: interrupted", file=sys.stderr)
        return 130
    # mixchat's own errors (bad folder, params.json, tokenizer) are already one actionable line.
    except (BenchError, MixchatError) as exc:
        print(f"vs_llamacpp: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
