"""Engine: a loaded release folder (model + tokenizer + device + dtype), ready to run sequences.

Never imports Textual: every front end (one-shot CLI, line REPL, TUI) drives this same API.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mixchat.cache import DEFAULT_CHUNK, KVCache
from mixchat.config import ModelArgs
from mixchat.errors import MixchatError
from mixchat.model import Transformer
from mixchat.progress import Progress
from mixchat.release import Release, model_state, open_release
from mixchat.tokenizer import Tokenizer

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


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def warm_page_cache(path: Path, show: bool | None = None,
                    on_progress: Callable[[int, int], None] | None = None) -> None:
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
    if size == 0 or size > 0.9 * _available_memory():
        return
    step = 256 << 20
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm, \
            Progress(f"reading {path.name}", size, enabled=show) as bar:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "buffer is not writable": it is only read here
            data = torch.frombuffer(mm, dtype=torch.uint8)
        for start in range(0, size, step):
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_WILLNEED, start, min(2 * step, size - start))
            data[start : start + step : mmap.PAGESIZE].sum()  # one byte per page
            bar.update(min(start + step, size))
            if on_progress is not None:
                on_progress(min(start + step, size), size)
        del data


def model_fingerprint(release: Release) -> str:
    """Identifies a model cheaply: params.json and tokenizer.model by content, the weights by
    name, size and modification time (hashing 14 GB at every start would take a minute)."""
    import hashlib

    h = hashlib.sha256()
    for path in (release.params, release.tokenizer):
        h.update(path.read_bytes() if path.is_file() else b"")
    st = release.weights.stat()
    h.update(f"{release.weights.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@dataclass
class Engine:
    release: Release
    args: ModelArgs
    layout: str
    model: Transformer
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    fingerprint: str

    @classmethod
    def load(cls, folder: str | Path, dtype: str = "auto", device: str = "cpu", threads: int | None = None,
             warm: bool = True, show_progress: bool | None = None,
             on_progress: Callable[[int, int], None] | None = None) -> Engine:
        """`on_progress(bytes_done, bytes_total)` reports reading or converting the weights (the
        TUI's progress bar); `show_progress` draws a bar on stderr (default: when it is a tty)."""
        set_threads(threads)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        opened = open_release(folder)
        release, args, layout = opened.release, opened.args, opened.layout
        state = model_state(opened.state, args, layout)
        if all(t.dtype == dt for t in state.values()) and dev.type == "cpu":
            if warm:
                warm_page_cache(release.weights, show_progress, on_progress)
        else:
            # A dtype or device change copies every tensor: show it, it takes a while on 14 GB.
            total = sum(t.numel() * torch.empty(0, dtype=dt).element_size() for t in state.values())
            with Progress(f"converting to {str(dt).removeprefix('torch.')} on {dev}", total,
                          enabled=show_progress) as bar:
                for name, t in state.items():
                    state[name] = t.to(device=dev, dtype=dt)
                    bar.advance(state[name].nbytes)
                    if on_progress is not None:
                        on_progress(int(bar.done), int(bar.total))
        with torch.device("meta"):
            model = Transformer(args)
        # assign=True makes the parameters *be* the mapped tensors instead of copying into fresh ones.
        model.load_state_dict(state, strict=True, assign=True)
        model.eval()
        return cls(release, args, layout, model, opened.tokenizer, dev, dt, model_fingerprint(release))

    def new_cache(self, chunk_size: int = DEFAULT_CHUNK, max_tokens: int | None = None) -> KVCache:
        return KVCache(self.args, self.dtype, self.device, chunk_size=chunk_size, max_tokens=max_tokens)
