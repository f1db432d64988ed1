"""`mixchat bench` on a small release: every figure it prints is there and says what it counts."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from conftest import tiny_args
from test_release import run_cli


def test_bench_reports_speed_and_what_its_memory_figures_count(make_release, monkeypatch):
    monkeypatch.delenv("MIXCHAT_ROW_PREFETCH", raising=False)  # the line below says what measured
    folder = make_release(tiny_args())
    proc = run_cli("bench", "-m", str(folder), "--prompt-tokens", "8", "--decode-tokens", "4", "--runs", "1",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["prefill_tokens_per_second"] > 0 and r["decode_tokens_per_second"] > 0
    assert r["first_prefill_tokens_per_second"] > 0  # the untimed first run, reported apart
    if sys.platform == "linux":
        # Resident memory after loading, split into the model's own and the files read in place: the
        # peak counts the whole process, loading included, so it is never below what follows it.
        assert 0 < r["anonymous_after_load_gb"] <= r["rss_after_load_gb"] <= r["peak_rss_gb"] + 0.01
        assert abs(r["anonymous_after_load_gb"] + r["file_after_load_gb"] - r["rss_after_load_gb"]) <= 0.02
    assert r["read_bandwidth_gb_per_second"] > 0 and r["decode_fraction_of_ceiling"] > 0
    from mixchat.speed import kernels

    # which product took the prompt: the tiny model's bf16 weights go through the kernels' GEMM or torch's
    assert "GEMM" in r["prompt_gemm"] if kernels.available() else r["prompt_gemm"].startswith("torch")
    # how decode's row kernels read, per format, as measured on this machine (kernels.prefetch)
    if kernels.simd():
        line = r["row_reads"]
        assert line.startswith(("bf16 short rows build rows, prefetch o", "bf16 short rows one row, prefetch o")), line
        assert ", long rows build rows, prefetch o" in line, line  # bf16's long rows' x does not fit one row
        assert "; int8 short rows " in line and "; int4 short rows build rows, prefetch o" in line, line
        assert " GB/s" in line, line
        assert "measured" in line, line

    # The ceiling is the kernels' own probe, with their widest loads on the decoding threads.
    if kernels.available():
        assert f"loads, {r['threads']} threads" in r["read_bandwidth_probe"], r["read_bandwidth_probe"]
        # over memory in the pages the weights are pinned in (huge where the kernel offers them)
        from mixchat.speed import hugepages

        pages = "in huge pages, as the weights" if hugepages.supported() else "in 4 KiB pages"
        assert f"threads, over 1 GiB {pages}," in r["read_bandwidth_probe"], r["read_bandwidth_probe"]
        assert r["read_bandwidth_probe"].split()[0] in ("512-bit", "256-bit", "64-bit")
        # Probed around the run, so the ceiling lies within what the probes read, and (one run) the fraction
        # is that run's read rate over the ceiling of its own moment.
        low, high = r["read_bandwidth_range_gb_per_second"]
        assert 0 < low <= r["read_bandwidth_gb_per_second"] <= high
        expected = r["decode_tokens_per_second"] * r["weight_bytes_per_token"] / 1e9 / r["read_bandwidth_gb_per_second"]
        assert abs(r["decode_fraction_of_ceiling"] - expected) <= 0.01 * expected + 0.002, (r, expected)
        # and against the probe passes between its decoded tokens: their harmonic mean (one run: that run's)
        low, high = r["read_bandwidth_between_tokens_range_gb_per_second"]
        assert 0 < low <= r["read_bandwidth_between_tokens_gb_per_second"] <= high
        expected = r["decode_weight_gb_per_second"] / r["read_bandwidth_between_tokens_gb_per_second"]
        assert abs(r["decode_fraction_of_moments"] - expected) <= 0.01 * expected + 0.002, (r, expected)
    else:
        assert "decode_fraction_of_moments" not in r


def test_decode_is_compared_to_the_harmonic_mean_of_probes_between_its_tokens_untimed(make_release, monkeypatch,
                                                                                      capsys):
    """A probe pass follows each decoded token, outside the timed step; decode is judged against the harmonic
    mean of those passes (what a reader at each moment's rate would reach), not their arithmetic mean."""
    from mixchat.engine import bench
    from mixchat.frontends.cli import build_parser
    from mixchat.speed import kernels

    if not kernels.available():
        pytest.skip("no kernels: no probe between tokens")
    levels = iter([10.0, 40.0] * 8)

    def slow_sample(self):  # a probe pass that takes 50 ms and alternates between two levels
        time.sleep(0.05)
        self.rates.append(next(levels))

    monkeypatch.setattr(bench.BetweenTokens, "sample", slow_sample)
    folder = make_release(tiny_args())
    ns = build_parser().parse_args(["bench", "-m", str(folder), "--prompt-tokens", "4", "--decode-tokens", "4",
                                    "--runs", "2", "--json"])
    assert bench.run(ns) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["read_bandwidth_between_tokens_gb_per_second"] == 16.0  # 2 / (1/10 + 1/40), not 25
    assert r["read_bandwidth_between_tokens_range_gb_per_second"] == [10.0, 40.0]
    # 8 samples of 50 ms were taken, none inside the timed steps: a tiny model's step takes a few ms
    assert r["decode_tokens_per_second"] > 1 / 0.05
    expected = r["decode_weight_gb_per_second"] / 16.0
    assert abs(r["decode_fraction_of_moments"] - expected) <= 0.01 * expected + 0.002, (r, expected)


def test_measure_again_drops_the_kept_kernel_choices(monkeypatch, tmp_path):
    """`bench --measure-again` throws away this machine's kept kernel choices (row reads, prompt GEMM), so the
    load and the first prompt measure them anew: the way out of a measurement taken on a busy machine."""
    from mixchat.engine import bench
    from mixchat.speed import kernels, linear
    from mixchat.speed.kernels import measured, prefetch

    if kernels.library() is None:
        pytest.skip("no kernels, nothing measured")
    files = {name: tmp_path / name for name in (prefetch.FILE, linear.PROMPT_GEMM_FILE, "other.json")}
    for path in files.values():
        path.write_text("{}")
    monkeypatch.setattr(measured, "choice_file", lambda lib, name: files.get(name))
    monkeypatch.setattr(measured, "_found", {(str(files[prefetch.FILE]), 2): {"kept": 1},
                                             (str(files["other.json"]), 2): {"kept": 2}})
    try:
        bench.measure_again()
        assert not files[prefetch.FILE].exists() and not files[linear.PROMPT_GEMM_FILE].exists()
        assert files["other.json"].exists() and list(measured._found) == [(str(files["other.json"]), 2)]
        bench.measure_again()  # nothing left to drop: no error
    finally:
        monkeypatch.undo()
        kernels.reapply_settings()


def test_bench_measure_again_measures_anew(make_release):
    from mixchat.speed import kernels

    folder = make_release(tiny_args())
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    proc = run_cli("bench", "-m", str(folder), "--prompt-tokens", "4", "--decode-tokens", "2", "--runs", "1",
                   "--json", "--measure-again")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    if kernels.simd() and "MIXCHAT_ROW_PREFETCH" not in os.environ:
        assert r["row_reads"].rsplit("measured ", 1)[1] >= started, r["row_reads"]
