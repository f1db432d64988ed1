"""The context a conversation may hold: sized by the memory its KV cache can take, not only by
params.json's max_seq_len (a 12B model's 128k tokens need ~20 GB of bf16 KV), chosen with --context
or the settings sheet, and shown by inspect, the one-shot summary and the app's context gauge."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_args
from tui.pilot import wait_until

from mixchat.engine.engine import Engine
from mixchat.engine.generation import Session
from mixchat.engine.sampling import SamplingSettings
from mixchat.errors import ContextError
from mixchat.model import cache
from mixchat.model.cache import choose_context, kv_bytes, kv_tokens_within
from mixchat.release.config import ModelArgs
from mixchat.release.inspection import format_report, inspect_release

NEMO = ModelArgs.from_dict({"dim": 5120, "n_layers": 40, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
                            "n_kv_heads": 8, "norm_eps": 1e-5, "vocab_size": 131072, "rope_theta": 1e6,
                            "max_seq_len": 131072})
GB = 10**9


def test_a_full_nemo_context_takes_the_twenty_gigabytes_the_issue_names():
    per_token = kv_bytes(NEMO, torch.bfloat16, 1)
    assert per_token == 2 * 40 * 8 * 128 * 2  # keys and values, every layer, n_kv_heads x head_dim, 2 bytes
    assert kv_bytes(NEMO, torch.bfloat16, 131072) == per_token * 131072  # ~21.5 GB: no window caps it
    assert 20 * GB < kv_bytes(NEMO, torch.bfloat16, 131072) < 22 * GB


def test_a_window_caps_what_its_layers_keep():
    args = tiny_args(sliding_window=[8, None, 8, None], n_layers=4, max_seq_len=1000)
    per_layer_slot = 2 * args.n_kv_heads * args.head_dim * 4
    # two full layers hold every token, the two window-8 layers 8 + chunk - 1 slots
    assert kv_bytes(args, torch.float32, 1000, chunk_size=16) == per_layer_slot * (2 * 1000 + 2 * (8 + 15))


@pytest.mark.parametrize("free", [1, 5 * 10**6, 3 * GB, 7 * GB, 21 * GB])
def test_the_context_that_fits_is_the_largest_that_fits(free):
    fits = kv_tokens_within(NEMO, torch.bfloat16, free)
    assert kv_bytes(NEMO, torch.bfloat16, fits) <= free
    assert fits == NEMO.max_seq_len or kv_bytes(NEMO, torch.bfloat16, fits + 1) > free


def test_memory_shortens_the_context_and_says_so():
    context, note = choose_context(NEMO, torch.bfloat16, 8 * GB)
    assert context == kv_tokens_within(NEMO, torch.bfloat16, 8 * GB) and 40_000 < context < 60_000
    assert note.startswith(f"context {context} of the model's 131072 tokens") and "--context" in note
    assert choose_context(NEMO, torch.bfloat16, 30 * GB) == (131072, None)
    assert choose_context(NEMO, torch.bfloat16, 0) == (131072, None)  # memory unknown: params.json decides


def test_an_asked_context_must_fit_the_model_and_the_memory():
    assert choose_context(NEMO, torch.bfloat16, 8 * GB, 32768) == (32768, None)
    with pytest.raises(ContextError, match="max_seq_len, 131072"):
        choose_context(NEMO, torch.bfloat16, 30 * GB, 200_000)
    with pytest.raises(ContextError, match="--context 100000: its KV cache takes 16.4 GB .* use --context 48"):
        choose_context(NEMO, torch.bfloat16, 8 * GB, 100_000)
    with pytest.raises(ContextError, match="no memory is left"):
        choose_context(NEMO, torch.bfloat16, 100 * 1024)


def low_memory(monkeypatch, free: int) -> None:
    """As if the machine had `free` bytes available beside everything else."""
    monkeypatch.setattr(cache, "available_memory", lambda: free)


def test_an_engine_on_a_small_machine_gives_conversations_the_context_that_fits(make_release, monkeypatch):
    args = tiny_args(n_layers=2, max_seq_len=4096)
    folder = make_release(args, seed=3)
    per_token = kv_bytes(args, torch.float32, 1)
    low_memory(monkeypatch, cache.KV_RESERVE + 300 * per_token)
    engine = Engine.load(folder, dtype="fp32", warm=False)
    assert engine.context == 300 and "context 300 of the model's 4096 tokens" in engine.context_note
    session = Session(engine)
    assert session.context_limit == 300 and session.cache.max_tokens == 300
    with pytest.raises(ContextError, match=r"the prompt is 400 tokens but the context holds 300 \(context 300"):
        list(session.generate([1] + [5] * 399, SamplingSettings(temperature=0, max_tokens=4)))
    # The conversation runs up to the context and stops there, never past what memory holds.
    done = list(session.generate([1] + [5] * 280, SamplingSettings(temperature=0, max_tokens=100)))[-1]
    assert done.stop == "context" and session.cache.pos == 300
    engine.set_context(200)
    assert engine.context == 200 and engine.context_note is None and Session(engine).context_limit == 200
    with pytest.raises(ContextError, match="use --context 300 or less"):
        engine.set_context(1000)


def test_inspect_shows_kv_per_token_and_the_context_that_fits(make_release, monkeypatch):
    args = tiny_args(n_layers=2, max_seq_len=4096)
    folder = make_release(args, seed=3)
    per_token_bf16 = kv_bytes(args, torch.bfloat16, 1)
    report = inspect_release(folder)
    assert report["kv_cache_bytes_per_token_bf16"] == per_token_bf16
    assert report["kv_cache_max_bytes_bf16"] == per_token_bf16 * 4096
    assert report["kv_cache_fits_tokens_now"] == 4096  # this machine holds a tiny model's whole context
    weights = report["memory_estimate_bytes"]["bf16"]
    low_memory(monkeypatch, weights + cache.KV_RESERVE + 1000 * per_token_bf16)
    small = inspect_release(folder)
    assert small["kv_cache_fits_tokens_now"] == 1000
    assert "context that fits now: 1000 tokens" in format_report(small)


def mixchat(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixchat", *args], input=stdin, capture_output=True, timeout=120)


def test_the_context_flag_end_to_end(make_release):
    folder = str(make_release(tiny_args(n_layers=2, max_seq_len=4096), seed=3))
    fast = ("--model", folder, "--dtype", "fp32", "--temperature", "0", "--no-save")
    proc = mixchat(*fast, "--context", "64", "--json", "--max-tokens", "100", "-p", "Say something long")
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout.decode().splitlines()[-1])
    assert done["context"] == 64 and done["kv_bytes_per_token"] == kv_bytes(tiny_args(n_layers=2), torch.float32, 1)
    assert done["stop"] == "context" and len(done["prompt_tokens"]) + done["generated_tokens"] == 64
    for bad, says in (("5000", "max_seq_len, 4096"), ("1", "from 2 to"), ("-3", "from 2 to")):
        proc = mixchat(*fast, "--context", bad, "-p", "hi")
        err = proc.stderr.decode()
        assert proc.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"--context {bad}" in err and says in err
    proc = mixchat(*fast, "--context", "16", "-p", "a prompt that is a good deal longer than sixteen tokens, surely")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "the context holds 16" in err and "Traceback" not in err


def test_the_settings_sheet_sets_the_context_of_new_conversations(make_release, monkeypatch, tmp_path):
    from mixchat.conversations.store import Store
    from mixchat.frontends.tui.app import MixchatApp
    from mixchat.frontends.tui.screens import SettingsScreen
    from mixchat.frontends.tui.status import status_text
    from mixchat.settings import Settings

    folder = str(make_release(tiny_args(n_layers=2, max_seq_len=4096), seed=3))

    async def scenario():
        app = MixchatApp(model=folder, settings=Settings(dtype="fp32", context=512),
                         store=Store(tmp_path / "s.sqlite3"))
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.pane is not None and app.pane.chat is not None)
            assert app.engine.context == 512 and app.pane.chat.session.context_limit == 512
            line = status_text(app.engine, app.pane, None, folder).plain
            assert "0/512 ·" in line and "KV 512 B/token (of 4096)" in line  # asked for, not memory's choice
            assert "as memory allows" not in line
            await pilot.press("f2")
            await pilot.pause(0.1)
            sheet = app.screen
            assert isinstance(sheet, SettingsScreen)
            sheet.query_one("#set-context").value = "1024"
            await pilot.press("ctrl+s")
            await pilot.pause(0.1)
            assert app.engine.context == 1024 and app.settings.context == 1024
            await pilot.press("ctrl+n")
            await wait_until(pilot, lambda: app.pane.chat is not None and app.pane.chat.session.context_limit == 1024)
            await pilot.press("f2")
            await pilot.pause(0.1)
            app.screen.query_one("#set-context").value = "99999"  # beyond max_seq_len: refused, nothing changes
            await pilot.press("ctrl+s")
            await pilot.pause(0.1)
            assert app.engine.context == 1024 and app.settings.context == 1024

    asyncio.run(scenario())


def test_the_ui_thread_keeps_its_torch_ops_serial_without_slowing_other_threads():
    """MixchatApp makes its (UI) thread serial: a parallel op there would keep an OpenMP team that
    slows decoding in the worker thread 3-4x on 2 cores (benchmarks/app_stream.py). Other threads
    keep torch's thread count. In a subprocess: it changes the calling thread for good."""
    code = ("import threading, torch\n"
            "torch.set_num_threads(2)\n"
            "from mixchat.engine.engine import keep_thread_serial\n"
            "assert keep_thread_serial()\n"
            "torch.zeros(10_000_000)\n"
            "seen = []\n"
            "t = threading.Thread(target=lambda: seen.append(torch.get_num_threads())); t.start(); t.join()\n"
            "print(torch.get_num_threads(), seen[0])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"1", b"2"]
