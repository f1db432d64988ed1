"""Engine: a loaded release folder (model + tokenizer + device + dtype), ready to run sequences.

Never imports Textual: every front end (one-shot CLI, line REPL, TUI) drives this same API.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mixchat.distributed import group as dist_group
from mixchat.errors import MixchatError
from mixchat.model.cache import DEFAULT_CHUNK, KVCache, available_memory, choose_context, kv_bytes, kv_memory
from mixchat.model.model import FeedForward, Transformer
from mixchat.paths import env_flag
from mixchat.progress import Progress, ProgressListener, human_bytes
from mixchat.release.config import ModelArgs
from mixchat.release.folder import Release, model_state, open_release
from mixchat.speed import heap, hugepages, linear
from mixchat.speed.decoder import FusedDecoder
from mixchat.speed.experts import ExpertCache, offload
from mixchat.speed.qformat import QuantSpec, expert_bytes, fits, fitting_choices, model_bytes, parse_quant
from mixchat.speed.quant import install, quantize_state
from mixchat.text.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from mixchat.distributed.pipeline import Part, Pipeline

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def resolve_device(device: str = "cpu") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MixchatError(f"--device {device}: no CUDA device is available here; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise MixchatError(f"--device {device}: unknown device; use cpu or cuda") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16: decoding reads every weight once per token, so half the bytes is close to
    twice the speed, and it is the dtype the weights ship in (no conversion, no copy). Only a CPU
    without AVX2 (no fast bf16 conversion) or a GPU without bf16 gets another choice."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if torch.backends.cpu.get_cpu_capability() != "DEFAULT" else torch.float32
    if dtype not in DTYPES:
        raise MixchatError(f"--dtype {dtype}: unknown; use auto, bf16, fp16 or fp32")
    return DTYPES[dtype]


def set_threads(threads: int | None) -> None:
    if threads:
        if threads < 1:
            raise MixchatError(f"--threads {threads}: must be at least 1")
        torch.set_num_threads(threads)


def keep_thread_serial(threads: int = 1) -> bool:
    """Make the calling thread run its own torch ops on `threads` threads (1: serially); other threads
    keep torch's count.

    For the app's UI thread, which decodes nothing but allocates a KV cache now and then: once a thread
    has run one parallel op, libgomp keeps a team of worker threads for it for good, and with more such
    threads than cores it stops spinning between parallel regions in every team, so decoding in the
    worker thread ran 3-4x slower on 2 cores (measured: 1013 against 278 tok/s on the demo's shape after
    one torch.zeros in the main thread). Returns whether it could (False: no libgomp found)."""
    import ctypes
    import glob

    torch.get_num_threads()  # torch's per-thread OpenMP set-up now, or its first parallel op would undo this
    libs = sorted(glob.glob(str(Path(torch.__file__).parent / "lib" / "libgomp*.so*")))
    try:
        lib = ctypes.CDLL(libs[0]) if libs else None
        if lib is None or not hasattr(lib, "omp_set_num_threads"):
            return False
        lib.omp_set_num_threads(threads)
    except OSError:
        return False
    return True


def warm_page_cache(path: Path, show: bool | None = None, on_progress: ProgressListener | None = None) -> None:
    """Fault the whole file into the page cache before the first token, with a progress bar.

    The mapped weights would be paged in anyway by the first forward pass, but in layer order
    with no sign of life. Touching one byte per page of a read-only mapping, chunk by chunk after
    asking the kernel to read ahead, runs at disk speed from a cold cache and takes a fraction of a
    second from a warm one (a read() loop copies every byte: 6 s for 14.5 GB even when cached).
    Skipped when the file would not fit in free memory: the mmap then pages on demand.
    """
    import mmap
    import warnings

    size = path.stat().st_size
    if size == 0 or size > 0.9 * available_memory():
        return
    step = 256 << 20
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm, \
            Progress(f"reading {path.name}", size, enabled=show, listener=on_progress) as bar:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "buffer is not writable": it is only read here
            data = torch.frombuffer(mm, dtype=torch.uint8)
        for start in range(0, size, step):
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_WILLNEED, start, min(2 * step, size - start))
            data[start : start + step : mmap.PAGESIZE].sum()  # one byte per page
            bar.update(min(start + step, size))
        del data


def touch_pages(t: torch.Tensor) -> None:
    """Fault a memory-mapped tensor's pages in now, one byte per page (the kernel reads ahead, so this
    runs at disk speed). For the embedding table when the rest of the file is not warmed (--quant,
    --memory-budget): each decoded token reads one row of it, and a row that is not in the page cache
    then waits ~1 ms on the disk, every new token."""
    import mmap

    t.detach().reshape(-1).view(torch.uint8)[:: mmap.PAGESIZE].sum()


def model_fingerprint(release: Release) -> str:
    """Identifies a model cheaply: params.json and tokenizer.model by content, the weights by
    name, size and modification time (hashing 14 GB at every start would take a minute)."""
    import hashlib

    h = hashlib.sha256()
    for path in (release.params, release.tokenizer):
        h.update(path.read_bytes() if path.is_file() else b"")
    for path in release.weight_files:
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


MAX_THREADS = 1024
MAX_CONTEXT = 1 << 24  # beyond config.LIMITS' max_seq_len: checked against the model's own at load


def load_options(ns) -> dict:
    """Engine.load's keyword arguments from the model flags every front end shares (cli._model_options),
    checked first: a flag's mistake is named by the flag, before any weight is read."""
    threads, budget = ns.threads, getattr(ns, "memory_budget", None)
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise MixchatError(f"--threads {threads}: must be from 1 to {MAX_THREADS} (leave it out for torch's choice)")
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise MixchatError(f"--memory-budget {budget}: must be a positive number of GB (leave it out to keep every "
                           "weight in memory)")
    context = getattr(ns, "context", None)
    if context is not None and not 1 < context <= MAX_CONTEXT:
        raise MixchatError(f"--context {context}: must be a number of tokens from 2 to the model's max_seq_len")
    rank_layers = getattr(ns, "rank_layers", None)
    if rank_layers is not None:
        try:
            rank_layers = [int(n) for n in rank_layers.split(",")]
        except ValueError:
            raise MixchatError(f"--rank-layers {rank_layers[:40]}: give the layer count of each rank, comma-separated "
                               "(e.g. 16,16)") from None
        if len(rank_layers) > MAX_THREADS or min(rank_layers) < 1:
            raise MixchatError("--rank-layers: every rank holds at least one layer")
    return {"dtype": ns.dtype, "device": ns.device, "threads": ns.threads, "quant": getattr(ns, "quant", None),
            "memory_budget": budget * 1e9 if budget else None, "context": context, "rank_layers": rank_layers,
            "split": getattr(ns, "split", None)}


class QuantDoesNotFit(MixchatError):
    """A --quant choice the model's shapes do not allow (the front ends say who chose it: a flag or the
    settings). `problem` is what is wrong, `best` the largest choice that fits."""

    def __init__(self, problem: str, best: str) -> None:
        super().__init__(f"{problem}; choose {best} (--quant, or quant in the settings)")
        self.problem, self.best = problem, best


def check_quant_fits(spec: QuantSpec, shapes: dict[str, tuple[int, ...]], folder: Path) -> None:
    """Refuse, before anything is read, an int4 group size that does not divide every matrix's input dimension,
    naming the largest that does (the choice `inspect` would offer), else int8."""
    if fits(shapes, spec):
        return
    best = fitting_choices(spec, lambda other: fits(shapes, other))[0]
    raise QuantDoesNotFit(f"quant {spec.label}: groups of {spec.group} do not divide every input dimension of "
                          f"{folder.name}'s matrices", best)


def _expert_bytes(args: ModelArgs, dt: torch.dtype, spec: QuantSpec | None) -> int:
    return expert_bytes(args.dim, args.hidden_dim, dt.itemsize, spec)


def _copy_expert(parts: dict[str, torch.Tensor], dev: torch.device, dt: torch.dtype) -> dict[str, torch.Tensor]:
    """An expert's weights copied out of the mapped file. On the CPU into one huge-page region: a fresh
    allocation in 4 KiB pages costs a page fault per page (90,000 for a 350 MB bf16 expert), on every
    cache miss, and decode then streams it from 2 MiB pages."""
    if dev.type == "cpu" and hugepages.supported():
        copied = hugepages.copy_into_huge_pages(parts, show=False, dtypes=dict.fromkeys(parts, dt))
        if all(copied[k].data_ptr() != t.data_ptr() for k, t in parts.items()):  # each one really copied
            return copied
    return {k: t.to(device=dev, dtype=dt, copy=True) for k, t in parts.items()}


def _expert_capacity(args: ModelArgs, state: dict[str, torch.Tensor], expert_names: list[str], dt: torch.dtype,
                     spec: QuantSpec | None, budget: float | None) -> int | None:
    """How many experts fit the budget beside the resident weights; None when all of them do (or
    there is no budget, or no experts)."""
    if not budget or args.moe is None:
        return None
    skip = set(expert_names)
    shapes = {n: tuple(t.shape) for n, t in state.items() if n not in skip}
    resident = model_bytes(shapes, dt.itemsize, spec)
    one = _expert_bytes(args, dt, spec)
    capacity = int((budget - resident) // one)
    if capacity >= len(expert_names) // 3:  # all of them (this rank's, under the expert split) fit
        return None
    if capacity < 2:
        raise MixchatError(f"--memory-budget {human_bytes(budget)} is too small for this model: the non-expert "
                           f"weights need {human_bytes(resident)} and two experts {human_bytes(2 * one)} more; give at "
                           f"least {human_bytes(resident + 2 * one)}, or add --quant int8/int4")
    return capacity


@dataclass
class Engine:
    release: Release
    args: ModelArgs
    layout: str
    model: Transformer
    tokenizer: TextTokenizer
    device: torch.device
    dtype: torch.dtype
    fingerprint: str

    quant: QuantSpec | None = None
    quant_cached: bool = False  # the quantized weights came from the cache, not from quantizing now
    experts: ExpertCache | None = None  # set when a memory budget keeps only some experts resident
    context: int = 0  # the tokens a new conversation's KV cache may grow to (choose_context); 0: max_seq_len
    context_note: str | None = None  # why context is below max_seq_len, when memory made it so
    kv_free: int = 0  # bytes the KV cache could take when the model was loaded (0: unknown)
    decoder: FusedDecoder | None = None  # the fused one-token step, attached to the model while fused_decode
    pass_seconds: dict[int, float] = field(default_factory=dict)  # drafting: rows -> measured seconds of a pass
    pipeline: Pipeline | None = None  # rank 0 of a torchrun launch: the later layers run on the other ranks
    split: str = ""  # how the layers are split across ranks ("" in one process); part of the KV caches' identity

    @property
    def world_size(self) -> int:
        return 1 + len(self.pipeline.remotes) if self.pipeline is not None else 1

    def rank_wait(self) -> float:
        """Seconds spent so far waiting on the other ranks' layers (0 in one process)."""
        return self.pipeline.wait_seconds if self.pipeline is not None else 0.0

    @property
    def fused_decode(self) -> bool:
        """Whether a decoded token goes through the compiled layer step (mixchat.speed.decoder) where the
        kernels take the model's weights; off, the model's plain path runs (tests compare the two)."""
        return self.model.decoder is not None

    @fused_decode.setter
    def fused_decode(self, on: bool) -> None:
        if on and self.decoder is None and self.device.type == "cpu":
            self.decoder = FusedDecoder(self.model)
        self.model.decoder = self.decoder if on else None

    def weights_replaced(self) -> None:
        """Call after replacing or moving any of the model's weights: the fused step builds again."""
        if self.decoder is not None:
            self.decoder.invalidate()

    @classmethod
    def load(cls, folder: str | Path, dtype: str = "auto", device: str = "cpu", threads: int | None = None,
             warm: bool = True, show_progress: bool | None = None,
             on_progress: ProgressListener | None = None, quant: str | None = None,
             memory_budget: float | None = None, prefetch: bool = True, huge_pages: bool | None = None,
             context: int | None = None, fused_decode: bool = True, part: Part | None = None,
             rank_layers: list[int] | None = None, split: str | None = None,
             on_note: Callable[[str], None] | None = None) -> Engine:
        """`on_progress(label, bytes_done, bytes_total)` reports reading, converting or quantizing the
        weights (the TUI's progress bar); `show_progress` draws a bar on stderr (default: when it is
        a tty). `on_note(text)` gets what loading has to tell the user (a quantized cache made again, and
        why); by default it goes to stderr.
        `quant` is 'int8', 'int4' or 'int4-G' (see mixchat.speed.quant); None keeps the weights.
        `memory_budget` (bytes of weights) keeps a MoE model's experts in an LRU cache that fits
        it, loading the others when tokens are routed to them (mixchat.speed.experts). `huge_pages` copies
        the weights into huge pages when they fit in free memory (default: yes on Linux, unless the
        environment sets MIXCHAT_HUGEPAGES=0); otherwise they stay mapped from the file. Decode streams
        every weight once per token, and from 4 KiB page-cache pages it pays a TLB miss per page (see
        mixchat.speed.hugepages; README's speed section has the figures).
        `context` is the tokens a conversation may hold (default: max_seq_len, or less when its KV cache
        would not fit the memory left after the weights; see choose_context). On the CPU the linear layers
        are kernel-backed (mixchat.speed.linear) and, with `fused_decode`, a decoded token goes through the
        compiled layer step (mixchat.speed.decoder; see the fused_decode property).

        Under torchrun (mixchat.distributed) rank 0 plans the `split` ("pipeline": contiguous layers per rank,
        rank 0's with the embedding and head; `rank_layers`: the layer count per rank instead of a split by free
        memory; "experts": every layer everywhere, each rank a share of every layer's experts) and loads its own
        part; the other ranks load the `part` it gives them. Each reads and quantizes only its own tensors."""
        set_threads(threads)
        heap.release_freed()  # what a dropped model left in the heap, before this one's weights come
        asked_to_warm = warm
        if huge_pages is None:
            huge_pages = env_flag("MIXCHAT_HUGEPAGES", True)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        spec = parse_quant(quant)
        opened = open_release(folder)
        release, args, layout = opened.release, opened.args, opened.layout
        state = model_state(opened.state, args, layout)
        if spec is not None:
            check_quant_fits(spec, {n: tuple(t.shape) for n, t in state.items()}, release.folder)
        fingerprint = model_fingerprint(release)
        pipeline = None
        if part is None and (group := dist_group.current()) is not None and group.rank == 0:
            from mixchat.distributed.pipeline import Pipeline, layer_sizes

            split, rank_layers = split or group.split, rank_layers or group.rank_layers  # default: the launch's
            if memory_budget and split != "experts":
                raise MixchatError("--memory-budget works across ranks with --split experts only (each rank's budget "
                                   "then covers its own experts); with the pipeline split each rank holds its layers")
            pipeline = Pipeline.of(group)
            options = {"dtype": dtype, "device": device, "threads": threads, "quant": quant,
                       "huge_pages": huge_pages, "fused_decode": fused_decode, "memory_budget": memory_budget,
                       "prefetch": prefetch}
            part = pipeline.plan(release.folder.resolve(), options, args, *layer_sizes(args, state, dt, spec),
                                 rank_layers, split)
        if part is not None:
            from mixchat.distributed.pipeline import owns

            state = {n: t for n, t in state.items() if owns(n, part)}
        quantized: dict[str, dict[str, torch.Tensor]] = {}
        cached, store = False, None
        expert_names = [n for n in state if ".feed_forward.experts." in n]
        capacity = _expert_capacity(args, state, expert_names, dt, spec, memory_budget)
        offloaded = {n: state.pop(n) for n in expert_names} if capacity is not None else {}
        if spec is not None:
            # Quantized weights replace their bf16 originals, which are then never read: do not warm them.
            # A rank's share is cached apart from the whole model's: neither may stand for the other.
            key = fingerprint if part is None else f"{fingerprint}-{part.label().replace(' ', '')}"
            store = quantize_state({**state, **offloaded}, spec, key, on_progress, show_progress, say=on_note)
            cached = store.cached
            held = [n for n in store.names if n in state]
            # Read from the cache file (gigabytes for a 7B), unless they were just quantized in memory.
            with Progress(f"reading the {spec.label} weights", model_bytes({n: tuple(state[n].shape) for n in held},
                                                                           dt.itemsize, spec),
                    enabled=show_progress if store.path is not None else False,
                    listener=on_progress if store.path is not None else None) as bar:
                for name in held:
                    del state[name]
                    quantized[name] = {p: t.to(dev) for p, t in store.get(name).items()}
                    bar.advance(sum(t.nbytes for t in quantized[name].values()))
            warm = False
        if capacity is not None:
            warm = False  # the point of a budget: the whole file need not (or cannot) be in memory
        # Decode streams the weights a little faster from huge pages than from the file's 4 KiB page-cache
        # pages (mixchat.speed.hugepages); the copy reads the file, so it replaces warming the page cache.
        state_bytes = sum(t.numel() for t in state.values()) * dt.itemsize  # once converted to dt
        resident = state_bytes + sum(t.nbytes for parts in quantized.values() for t in parts.values())
        convert = {name: dt for name in state}  # the release's tensors, not the quantized parts added below
        pin = huge_pages and dev.type == "cpu" and capacity is None and hugepages.supported() \
            and resident < 0.85 * available_memory()
        warm = warm and not pin
        # Pinned weights are converted as they are copied into huge pages (below): one copy, not two.
        mapped = 0
        if dev.type == "cpu" and (pin or all(t.dtype == dt for t in state.values())):
            mapped = 0 if pin else state_bytes
            if warm and part is not None:  # a rank's share only, not the whole file
                for t in state.values():
                    touch_pages(t)
            elif warm:
                for path in release.weight_files:
                    warm_page_cache(path, show_progress, on_progress)
            elif asked_to_warm and not pin:  # --quant or a budget leave the file cold, but not the embedding rows
                touch_pages(state["tok_embeddings.weight"])
        else:
            # A dtype or device change copies every tensor: show it, it takes a while on 14 GB.
            with Progress(f"converting to {str(dt).removeprefix('torch.')} on {dev}", state_bytes,
                          enabled=show_progress, listener=on_progress) as bar:
                for name, t in state.items():
                    state[name] = t.to(device=dev, dtype=dt)
                    bar.advance(state[name].nbytes)
        with torch.device("meta"):
            model = Transformer(args)
        if quantized:
            install(model, quantized)
            for name, parts in quantized.items():
                for p, t in parts.items():
                    state[f"{name.removesuffix('.weight')}.{p}"] = t
        # Swapped in before the experts are offloaded, so the routers they predict with are swapped too;
        # the weights come with load_state_dict below.
        kernel_layers = dev.type == "cpu"
        if kernel_layers:
            heap.keep_freed_memory()  # a prompt's activations: faulted in once, not at every layer
            linear.install(model)
            if (k := linear.kernels_or_none()) is not None:
                k.settle()  # the row reads are measured once per machine (a few seconds): here, not in a reply
        experts = None
        if capacity is not None:
            def load_expert(layer: int, e: int) -> torch.nn.Module:
                with torch.device("meta"):
                    ff = FeedForward(args.dim, args.hidden_dim)
                names = {f"w{j}.weight": f"layers.{layer}.feed_forward.experts.{e}.w{j}.weight" for j in (1, 2, 3)}
                if store is not None:
                    install(ff, {k: {p: t.to(dev) for p, t in store.get(n).items()} for k, n in names.items()})
                else:  # a copy out of the mapped file, into memory the cache accounts for; same strides
                    # as the mapped view (the torrent's w2 is transposed), so the same kernels run and
                    # the tokens are the same as with every expert resident
                    ff.load_state_dict(_copy_expert({k: offloaded[n] for k, n in names.items()}, dev, dt),
                                       assign=True)
                if kernel_layers:
                    linear.install(ff)
                return ff

            experts = offload(model, load_expert, _expert_bytes(args, dt, spec), capacity, prefetch,
                              part.experts if part is not None else None)
        if pin:
            state = hugepages.copy_into_huge_pages(state, f"reading {release.weights_label.name}",
                                                   show=show_progress, listener=on_progress,
                                                   dtypes=convert, release_sources=True)
        # assign=True makes the parameters *be* these tensors (mapped or pinned) instead of copies.
        if part is None:
            model.load_state_dict(state, strict=True, assign=True)
        else:  # the other ranks' tensors stay on the meta device, never read here
            missing = model.load_state_dict(state, strict=False, assign=True).missing_keys
            if lost := [n for n in missing if owns(n, part)]:
                raise MixchatError(f"{release.weights_label}: {lost[0]} is missing; download the release again")
            model.owned = part.layers
            if part.experts is not None:
                from mixchat.distributed.experts import split_experts

                group = dist_group.current()
                split_experts(model, part.experts, pipeline.reduce if pipeline is not None else group.all_reduce)
        model.eval()
        # Weights mapped from the file sit in the page cache, which MemAvailable counts as free: the KV
        # cache must not count on evicting them. Converted, pinned or quantized weights are already taken.
        kv_free = kv_memory(dev, mapped)
        chosen, note = choose_context(args, dt, kv_free, context)
        engine = cls(release, args, layout, model, opened.tokenizer, dev, dt, fingerprint, spec, cached, experts,
                     chosen, note, kv_free)
        engine.fused_decode = fused_decode
        if pipeline is not None:
            pipeline.attach(engine)
            engine.pipeline, engine.split = pipeline, f"{pipeline.label} of {pipeline.group.size}"
        return engine

    def explain_non_finite(self) -> str:
        """Why the model produced NaN or infinite logits, as one line for the user: the first weight
        that holds a non-finite value (reading all of them: seconds on a 7B, and only on this error
        path), or, with every weight finite, an overflow of the activations."""
        folder = self.release.folder
        for name, t in (*self.model.named_parameters(), *self.model.named_buffers()):
            if not t.is_floating_point() or t.device.type == "meta" or bool(torch.isfinite(t).all()):
                continue
            if name.rpartition(".")[2] in ("scale", "zero") and self.quant is not None:
                from mixchat.speed.quant import cache_path

                return (f"the model produced NaN/infinite logits: the quantized weights {name} hold non-finite values "
                        f"(from {cache_path(self.fingerprint, self.quant)}); check the release with `mixchat verify "
                        f"{folder}`, then delete that file so mixchat quantizes again")
            return (f"the model produced NaN/infinite logits: tensor {name} in {self.release.weights_label} holds "
                    f"non-finite values; the file is damaged or not a real release: check it with `mixchat verify "
                    f"{folder}` and download it again")
        return (f"the model produced NaN/infinite logits although every weight of {folder} is finite: the "
                f"activations overflowed in {str(self.dtype).removeprefix('torch.')}; try --dtype fp32")

    def new_cache(self, chunk_size: int = DEFAULT_CHUNK, max_tokens: int | None = None) -> KVCache:
        """A KV cache that may grow to `max_tokens` (default: the engine's context)."""
        if self.pipeline is not None:
            from mixchat.distributed.pipeline import ShardedCache

            return ShardedCache(self.pipeline, self.args, self.dtype, self.device, chunk_size=chunk_size,
                                max_tokens=max_tokens or self.context or None, layers=self.model.owned)
        return KVCache(self.args, self.dtype, self.device, chunk_size=chunk_size,
                       max_tokens=max_tokens or self.context or None)

    @property
    def kv_bytes_per_token(self) -> int:
        """What one more token costs in the KV cache while no sliding window is full."""
        return kv_bytes(self.args, self.dtype, 1)

    def set_context(self, requested: int | None, what: str = "--context") -> None:
        """Choose the context for conversations started from now on (None: what fits, as at load)."""
        self.context, self.context_note = choose_context(self.args, self.dtype, self.kv_free, requested, what)
