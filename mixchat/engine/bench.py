"""`mixchat bench --model DIR`: load time, peak RSS, prefill and decode tokens/sec, and the memory
read ceiling measured on the same machine (decode reads every active weight once per token)."""

from __future__ import annotations

import json
import resource
import statistics
import time
from argparse import Namespace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mixchat.engine.engine import Engine


def format_experts(engine) -> str:
    """One line on the expert cache (--memory-budget): what it holds and how often it had the expert."""
    c = engine.experts
    st = c.stats
    total = engine.args.n_layers * engine.args.moe.num_experts
    return (f"{c.capacity} of {total} experts resident; hit rate {st.hit_rate:.0%} ({st.hits} hits, {st.misses} "
            f"misses; {st.prefetch_used} of {st.prefetched} prefetches used); {st.loaded_bytes / 1e9:.1f} GB loaded, "
            f"{st.wait_seconds:.1f} s waiting")


def resident_memory() -> dict[str, int]:
    """This process's resident bytes now: all, anonymous (its own allocations) and file-backed
    (mapped files' pages in memory); empty where /proc does not say (not Linux)."""
    names = {"VmRSS": "rss", "RssAnon": "anonymous", "RssFile": "file"}
    found: dict[str, int] = {}
    try:
        for line in open("/proc/self/status", encoding="ascii", errors="replace"):  # noqa: SIM115
            key, _, value = line.partition(":")
            if key in names and value.strip().endswith("kB"):
                found[names[key]] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return {}
    return found if len(found) == len(names) else {}


class ReadCeiling:
    """The memory read rate decode is judged against, measured on this machine around each decode run.

    With the compiled kernels: their read probe (csrc/probe.c), the widest loads the build has (512-bit on
    AVX-512) over 1 GiB on the threads decoding uses, so no engine can read faster; best of 3 passes just
    before and just after each run. On a shared machine the rate the cores get drifts by half within
    seconds (measured 13-32 GB/s on one 2-core VM), so one probe taken at another moment would make the
    fraction of the ceiling a matter of luck; each run is compared to the rate of its own moment.
    Without the kernels: torch's fp32 matrix-vector product over a 1 GiB matrix, once, the fastest read
    torch has (AVX2 at best: on an AVX-512 CPU it read under half the probe's rate, and decode then showed
    140-160 % "of the ceiling")."""

    def __init__(self, threads: int | None = None) -> None:
        from mixchat.speed import kernels

        self.per_run = kernels.available()  # the kernels' probe, around each run; else torch's figure, once
        self.rates: list[float] = []
        if self.per_run:
            # mc_simd_level: 0 scalar, 1 AVX2, 2-3 AVX-512 (see kernels.SIMD_LEVELS); probe.c loads as wide.
            width = ("64-bit", "256-bit", "512-bit", "512-bit")[kernels.simd_level()]
            self.threads = threads or kernels.get_num_threads()
            from mixchat.speed import hugepages

            pages = "huge pages, as the weights" if hugepages.supported() else "4 KiB pages"
            self.how = (f"{width} loads, {self.threads} threads, over 1 GiB in {pages}, best of 3 with and 3 "
                        "without software prefetch, before and after each run")
        else:
            self.how = "torch fp32 matrix-vector product (no compiled kernels), measured once"

    def measure(self) -> float:
        """GB/s now (the kernels' probe), or the torch figure (measured once)."""
        from mixchat.speed import kernels

        if self.per_run:
            # A fresh 1 GiB each time rather than one held through the runs: held, it could push the pages
            # of weights read in place from the release's files out of memory and slow the decode measured.
            rate = kernels.read_probe(threads=self.threads, reps=3)
        elif self.rates:
            return self.rates[0]
        else:
            rate = torch_read_rate()
        self.rates.append(rate)
        return rate


class BetweenTokens:
    """The read rate of decode's own moments: a short probe pass (the kernels' probe, with and without
    software prefetch, over BYTES held through the runs) after every decoded token, outside the timed steps.

    On a VM that shares its memory the rate the cores get can jump between two levels every second or so
    (measured on a 2-core Zen 4: 30-33 or 52-57 GB/s, the same for every buffer at a given moment, about a
    third of the time at the lower), so a ceiling taken as the best probe around a run counts the slow moments
    against decode. A reader that always got the probe's rate of each moment would read one token's bytes in
    bytes / rate_i, so over the run it reaches the harmonic mean of the samples: the figure decode is compared
    to here. 128 MiB, four times the largest L3 seen here, so a pass is not served from cache (one of 32 MiB
    read 1.5x the 1 GiB probe beside it, 64 and 128 MiB within 1 %); about 5 ms a token at 50 GB/s."""

    BYTES = 128 << 20

    def __init__(self, threads: int) -> None:
        from mixchat.speed import hugepages

        self.threads = threads
        self.buffer = hugepages.empty((self.BYTES,)).fill_(1)
        self.rates: list[float] = []

    def sample(self) -> None:
        from mixchat.speed import kernels

        self.rates.append(kernels.read_probe(threads=self.threads, reps=1, buffer=self.buffer))


def torch_read_rate() -> float:
    import torch

    w = torch.randn(16384, 16384)
    x = torch.randn(1, 16384)
    torch.nn.functional.linear(x, w)
    rates = []
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end or len(rates) < 3:
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        rates.append(w.nbytes / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


def active_bytes_per_token(engine) -> int:
    """Weight bytes one decode step reads: everything but the embedding table (one row is
    gathered) and, for MoE, only top_k of the experts."""
    a = engine.args
    tensors = [*engine.model.named_parameters(), *engine.model.named_buffers()]  # quantized weights are buffers
    total = sum(t.nbytes for _, t in tensors) - engine.model.tok_embeddings.weight.nbytes
    if a.moe:
        experts = sum(t.nbytes for n, t in tensors if ".experts." in n)
        if engine.experts is not None:  # offloaded: not in the model, all the same size
            experts = engine.experts.expert_bytes * a.n_layers * a.moe.num_experts
            total += experts
        total -= experts - experts * a.moe.num_experts_per_tok // a.moe.num_experts
    return total


def _clock(engine: Engine) -> float:
    """perf_counter once the device has finished what was queued (CUDA runs kernels asynchronously: a time
    read without waiting would leave a step's work to the next measurement)."""
    if engine.device.type == "cuda":
        import torch

        torch.cuda.synchronize(engine.device)
    return time.perf_counter()


def run(ns: Namespace) -> int:
    import torch

    from mixchat.engine.engine import Engine, load_options
    from mixchat.errors import MixchatError
    from mixchat.model.cache import DEFAULT_CHUNK

    for flag, value, most in (("--prompt-tokens", ns.prompt_tokens, DEFAULT_CHUNK), ("--decode-tokens",
                              ns.decode_tokens, 1 << 20), ("--runs", ns.runs, 1000)):
        if not 1 <= value <= most:
            raise MixchatError(f"{flag} {value}: must be from 1 to {most}")
    if getattr(ns, "measure_again", False):
        measure_again()
    start = time.perf_counter()
    engine = Engine.load(ns.model, **load_options(ns))
    load_s = time.perf_counter() - start
    after_load = resident_memory()
    context = engine.new_cache().max_tokens
    if ns.prompt_tokens + ns.decode_tokens >= context:
        raise MixchatError(f"--prompt-tokens {ns.prompt_tokens} + --decode-tokens {ns.decode_tokens} do not fit "
                           f"{engine.release.folder}'s context of {context} tokens; ask for fewer")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, engine.args.vocab_size, (ns.prompt_tokens,), generator=gen).to(engine.device)

    per_token = active_bytes_per_token(engine)
    if engine.device.type == "cpu":
        from mixchat.speed import linear

        # a first measurement of the prompt GEMMs must not land in a timed run (Engine.load measured the
        # row kernels' reads)
        linear.prompt_gemm()
    # One untimed run first, as llama-bench does (a prompt and a decoded token): the process's first prompt
    # also faults in the heap its activations will reuse (mixchat.speed.heap) and wakes the threads. Its
    # prefill rate is reported apart, as what the first prompt after loading gets.
    cache = engine.new_cache()
    t = _clock(engine)
    token = engine.model(prompt, cache, last_only=True).logits[-1].argmax()
    first_prefill = ns.prompt_tokens / (_clock(engine) - t)
    engine.model(token.view(1), cache)
    del cache
    if engine.experts is not None:  # the stats printed below count the timed runs only
        from mixchat.speed.experts import ExpertStats

        engine.experts.stats = ExpertStats()
    ceiling = ReadCeiling() if engine.device.type == "cpu" else None
    # Not under torchrun: the other ranks' steps would wait for rank 0's probe passes.
    between = BetweenTokens(ceiling.threads) if ceiling is not None and ceiling.per_run \
        and engine.pipeline is None else None
    prefill, decode, fractions, ceilings, moments = [], [], [], [], []
    link = engine.pipeline.group if engine.pipeline is not None else None
    waited, moved, decoded = 0.0, 0, 0  # decode's waits on other ranks and bytes to and from them
    for _ in range(ns.runs):
        cache = engine.new_cache()
        t = _clock(engine)
        out = engine.model(prompt, cache, last_only=True)
        prefill.append(ns.prompt_tokens / (_clock(engine) - t))
        token = out.logits[-1].argmax()
        before = ceiling.measure() if ceiling else 0.0
        t, w0 = _clock(engine), engine.rank_wait()
        b0 = link.bytes_sent + link.bytes_received if link is not None else 0
        if between is None:
            for _ in range(ns.decode_tokens):
                token = engine.model(token.view(1), cache).logits[-1].argmax()
            decode.append(ns.decode_tokens / (_clock(engine) - t))
        else:  # each step timed alone, a probe pass after it (outside the time); CPU only, so no device sync
            spent = 0.0
            for _ in range(ns.decode_tokens):
                t = time.perf_counter()
                token = engine.model(token.view(1), cache).logits[-1].argmax()
                spent += time.perf_counter() - t
                between.sample()
            decode.append(ns.decode_tokens / spent)
            run_rate = statistics.harmonic_mean(between.rates[-ns.decode_tokens:])
            moments.append(decode[-1] * per_token / 1e9 / run_rate)
        if ceiling:
            ceilings.append(max(before, ceiling.measure()))
            fractions.append(decode[-1] * per_token / 1e9 / ceilings[-1])
        waited += engine.rank_wait() - w0
        moved += (link.bytes_sent + link.bytes_received - b0) if link is not None else 0
        decoded += ns.decode_tokens

    bandwidth = statistics.median(ceilings) if ceilings else None
    result = {
        "model": str(engine.release.folder), "layout": engine.layout, "dtype": str(engine.dtype).removeprefix("torch."),
        "device": str(engine.device), "threads": torch.get_num_threads(),
        "quant": engine.quant.label if engine.quant else None,
        "load_seconds": round(load_s, 2),
        # The whole process's peak, loading included: quantizing reads every bf16 page of the release,
        # and those file-backed pages count while mapped. The memory a chat needs is nearer
        # after_load's figures (anonymous: the model's own copies; file: weights used in place).
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        **{f"{k}_after_load_gb": round(v / 1e9, 2) for k, v in after_load.items()},
        "prompt_tokens": ns.prompt_tokens, "decode_tokens": ns.decode_tokens, "runs": ns.runs,
        "prefill_tokens_per_second": round(statistics.median(prefill), 2),
        "first_prefill_tokens_per_second": round(first_prefill, 2),
        "decode_tokens_per_second": round(statistics.median(decode), 3),
        "weight_bytes_per_token": per_token,
        "decode_weight_gb_per_second": round(statistics.median(decode) * per_token / 1e9, 2),
    }
    if bandwidth:
        # Each run against the read rate of its own moment (ReadCeiling); the medians of both.
        result.update(read_bandwidth_gb_per_second=round(bandwidth, 2), read_bandwidth_probe=ceiling.how,
                      read_bandwidth_range_gb_per_second=[round(min(ceiling.rates), 2), round(max(ceiling.rates), 2)],
                      decode_ceiling_tokens_per_second=round(bandwidth * 1e9 / per_token, 3),
                      decode_fraction_of_ceiling=round(statistics.median(fractions), 3))
    if moments:
        result.update(read_bandwidth_between_tokens_gb_per_second=round(statistics.harmonic_mean(between.rates), 2),
                      read_bandwidth_between_tokens_range_gb_per_second=[round(min(between.rates), 2),
                                                                          round(max(between.rates), 2)],
                      decode_fraction_of_moments=round(statistics.median(moments), 3))
    if engine.device.type == "cpu":
        result["prompt_gemm"] = prompt_gemm_line(engine)
        if (line := row_reads_line()) is not None:
            result["row_reads"] = line
    if engine.experts is not None:
        result["experts"] = {"capacity": engine.experts.capacity, **engine.experts.stats.as_dict()}
    if link is not None:  # torchrun: rank 0's view of the split
        result.update(world_size=engine.world_size, split=engine.split,
                      rank_wait_ms_per_token=round(waited / decoded * 1e3, 3),
                      link_bytes_per_token=round(moved / decoded))
    if ns.json:
        print(json.dumps(result, indent=2))
        return 0
    weights = result["quant"] or result["dtype"]
    print(f"{result['model']} ({result['layout']}, {weights} on {result['device']}, "
          f"{result['threads']} threads)")
    print(f"  load        {load_s:.2f} s, peak RSS {result['peak_rss_gb']} GB (the whole process, loading included)")
    if after_load:
        print(f"  memory      {result['rss_after_load_gb']} GB resident after loading: "
              f"{result['anonymous_after_load_gb']} GB the model's own, "
              f"{result['file_after_load_gb']} GB read in place from the release's files")
    print(f"  prefill     {result['prefill_tokens_per_second']:.2f} tok/s ({ns.prompt_tokens}-token prompt, "
          f"median of {ns.runs} after an untimed one; that first prompt at "
          f"{result['first_prefill_tokens_per_second']:.2f} tok/s)")
    print(f"  decode      {result['decode_tokens_per_second']:.3f} tok/s ({ns.decode_tokens} tokens), reading "
          f"{per_token / 1e9:.2f} GB of weights per token = {result['decode_weight_gb_per_second']} GB/s")
    if bandwidth:
        low, high = result["read_bandwidth_range_gb_per_second"]
        spread = f"; {low:.1f}-{high:.1f} GB/s over the runs" if ceiling.per_run else ""
        against = " (the median of each run's share of the rate probed around it)" if ceiling.per_run else ""
        print(f"  ceiling     {result['decode_ceiling_tokens_per_second']:.3f} tok/s at the measured "
              f"{bandwidth:.1f} GB/s memory read rate ({ceiling.how}{spread}); decode reaches "
              f"{result['decode_fraction_of_ceiling']:.0%} of it{against}")
    if moments:
        low, high = result["read_bandwidth_between_tokens_range_gb_per_second"]
        print(f"  moments     a {BetweenTokens.BYTES >> 20} MiB probe pass after each decoded token read "
              f"{result['read_bandwidth_between_tokens_gb_per_second']:.1f} GB/s (harmonic mean; "
              f"{low:.1f}-{high:.1f}); decode reaches {result['decode_fraction_of_moments']:.0%} of the rate of "
              "its own moments")
    if "prompt_gemm" in result:
        print(f"  prompts     {result['prompt_gemm']}")
    if "row_reads" in result:
        print(f"  row reads   {result['row_reads']}")
    if engine.experts is not None:
        print(f"  experts     {format_experts(engine)}")
    if link is not None:
        print(f"  ranks       {engine.world_size} ({engine.split}): {result['rank_wait_ms_per_token']} ms of each "
              f"decoded token waiting on the others, {result['link_bytes_per_token']} bytes to and from them per token")
    return 0


def measure_again() -> None:
    """Drop the kept kernel choices of the loaded kernels (row reads, prompt GEMM), so that loading the model
    and the first prompt measure them anew (and keep the new answers)."""
    from mixchat.speed import kernels, linear
    from mixchat.speed.kernels import measured, prefetch

    if (lib := kernels.library()) is not None:
        measured.discard(lib, (prefetch.FILE, linear.PROMPT_GEMM_FILE))
        kernels.reapply_settings()


def row_reads_line() -> str | None:
    """How the row kernels (decode) read their weights, per format (software prefetch, rows per pass), and
    what decided it; None without SIMD kernels (nothing to set)."""
    from mixchat.speed import kernels
    from mixchat.speed.kernels import prefetch

    if not kernels.simd():
        return None
    if (forced := prefetch.forced()) is not None:
        return f"build rows, prefetch {forced} for every format (MIXCHAT_ROW_PREFETCH={forced})"
    return prefetch.note(kernels.library(), kernels.get_num_threads()) or "the build's own (not measured yet)"


def prompt_gemm_line(engine: Engine) -> str:
    """Which product multiplied the prompt's weights, and on native-bf16 CPUs what decided it."""
    import torch

    from mixchat.speed import kernels, linear

    dot = "vdpbf16ps (x rounded to bf16, fp32 sums)" if kernels.bf16dot() else "fp32"
    if not kernels.available():
        return f"torch ({kernels.reason()})"
    if engine.quant is not None:
        if engine.quant.kind == "int8":
            return f"int8 weights: the kernels' {dot} GEMM"
        return f"{engine.quant.label} weights: the kernels' 8-bit-activation kernel"
    if engine.dtype != torch.bfloat16:
        return f"{str(engine.dtype).removeprefix('torch.')} weights: torch"
    choice = linear.prompt_gemm()
    if (note := linear.prompt_gemm_note()) is not None:
        return note
    if choice == "torch":
        how = "bf16 GEMM" if linear.native_bf16() else "fp32 GEMM on an fp32 copy of each weight"
        return f"torch's {how} (MIXCHAT_PROMPT_GEMM=torch)"
    return f"the kernels' {dot} GEMM"
