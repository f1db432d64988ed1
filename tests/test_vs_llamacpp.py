"""benchmarks/vs_llamacpp.py's report: with --rounds, medians per engine and the median of each round's
own ratio (the script itself needs a llama.cpp build and is never run here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "vs_llamacpp.py"
spec = importlib.util.spec_from_file_location("vs_llamacpp", SCRIPT)
vs = importlib.util.module_from_spec(spec)
sys.modules["vs_llamacpp"] = vs  # dataclasses look their module up there
spec.loader.exec_module(vs)


def result(engine: str, decode: float, n: int, precision: str = "bf16") -> object:
    r = vs.Result(precision, engine, 12.0, prefill_tps=10.0 * decode, decode_tps=decode, peak_rss_gb=12.0 + n)
    r.round = n
    return r


def test_rounds_pair_up_back_to_back_runs():
    # The machine slows down in round 1: each engine's median hides it, the per-round ratios do not.
    results = [result("llama.cpp", 8.0, 0), result("mixchat", 8.8, 0),
               result("mixchat", 6.0, 1), result("llama.cpp", 5.0, 1),
               result("llama.cpp", 7.0, 2), result("mixchat", 7.7, 2),
               result("llama.cpp", 4.0, 0, "int8"), result("mixchat", 5.0, 0, "int8")]
    merged, ratios = vs.summarize(results)
    by = {(r.precision, r.engine): r for r in merged}
    assert len(merged) == 4
    assert by["bf16", "llama.cpp"].decode_tps == 7.0 and by["bf16", "mixchat"].decode_tps == 7.7
    assert by["bf16", "mixchat"].peak_rss_gb == 14.0  # the highest of the rounds
    assert ratios["bf16"]["decode_rounds"] == [1.1, 1.2, 1.1]
    assert ratios["bf16"]["decode"] == 1.1
    assert ratios["int8"] == {"prefill": 1.25, "decode": 1.25, "prefill_rounds": [1.25], "decode_rounds": [1.25]}


def test_one_round_prints_the_plain_table(capsys):
    vs.print_table([result("llama.cpp", 2.0, 0), result("mixchat", 3.0, 0)])
    out = capsys.readouterr().out
    assert "1.50x" in out and "rounds" not in out
    vs.print_table([result("llama.cpp", 2.0, 0), result("mixchat", 3.0, 0),
                    result("mixchat", 2.0, 1), result("llama.cpp", 2.0, 1)])
    out = capsys.readouterr().out
    assert "2 rounds" in out and "decode 1.50, 1.00" in out and "1.25x" in out


def test_decode_per_probe_takes_each_runs_own_memory_rate(capsys):
    # Round 0: mixchat ran in a fast minute (probe 60 against 40), so its raw ratio is 1.5; per GB/s probed
    # around each run the engines decode alike. Round 1: the other way round.
    results = [result("llama.cpp", 4.0, 0), result("mixchat", 6.0, 0),
               result("mixchat", 4.0, 1), result("llama.cpp", 6.0, 1)]
    for r, probe in zip(results, (40.0, 60.0, 40.0, 60.0), strict=True):
        r.probe_gbps = probe
    merged, ratios = vs.summarize(results)
    assert ratios["bf16"]["decode_rounds"] == [1.5, 0.667]
    assert ratios["bf16"]["decode_per_probe_rounds"] == [1.0, 1.0] and ratios["bf16"]["decode_per_probe"] == 1.0
    assert {r.engine: r.probe_gbps for r in merged} == {"llama.cpp": 50.0, "mixchat": 50.0}
    vs.print_table(results)
    out = capsys.readouterr().out
    assert "decode per probe 1.00, 1.00" in out and "probe GB/s" in out
    results[0].probe_gbps = None  # a run without its probe: no normalised figure rather than a wrong one
    assert "decode_per_probe" not in vs.summarize(results)[1]["bf16"]


def test_the_prober_reads_around_a_run_or_says_why_not():
    from mixchat.speed import kernels

    off = vs.Prober(2, enabled=False)
    assert off.rate() is None and off.reason == "--no-probe"
    assert off.around(lambda: result("mixchat", 1.0, 0)).probe_gbps is None
    if not kernels.available():
        pytest.skip(f"no compiled kernels: {kernels.reason()}")
    on = vs.Prober(2, enabled=True)
    r = on.around(lambda: result("mixchat", 1.0, 0))
    assert r.probe_gbps is not None and 0.5 < r.probe_gbps < 2000
