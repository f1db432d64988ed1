"""Does showing a reply in the app slow the model? Decode speed of one reply streamed in the app
(driven headless by Textual's Pilot), with the expert view off and on, against the same reply
decoded with no UI at all (Chat.send in this process, saved as it goes, as the one-shot command
does), in alternating rounds. Prints each run and the ratio app / one-shot; the target is >= 90 %.

    .venv/bin/python benchmarks/app_stream.py --rounds 3
    .venv/bin/python benchmarks/app_stream.py --model /path/to/release --max-tokens 500

The model is the demo Mixtral by default (512-token context: the prompt is short so that a greedy
reply of --max-tokens tokens fits). The demo was trained to end its replies after a few dozen
tokens, so when its reply is shorter than 90 % of --max-tokens (or with --synthetic) the demo's
shape and tokenizer are written with random weights and a 4096-token context instead: as fast per
token, and its greedy replies run to the limit. Each run's speed is Done's decode tokens/s
(generated tokens over decode time), which the app shows in its status bar when the reply ends.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HOME = tempfile.mkdtemp(prefix="mixchat-bench-")
os.environ["MIXCHAT_HOME"] = HOME  # the user's history, settings and conversations stay untouched

from mixchat.settings import Settings  # noqa: E402


def cpu_kind() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
                return f"{line.split(':', 1)[1].strip()} ({isa}), {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def synthetic_release(folder: Path) -> Path:
    """The demo's shape and tokenizer with random weights and a 4096-token context: as fast per
    token as the demo, but its greedy replies run to the token limit."""
    import json

    from mixchat import paths
    from mixchat.dev.synthetic import write_release
    from mixchat.release.config import ModelArgs

    demo = paths.demo_model()
    params = json.loads((demo / "params.json").read_text())
    params.pop("mixchat", None)
    params["max_seq_len"] = 4096
    return write_release(folder, ModelArgs.from_dict(params), "torrent", seed=3, std=0.05,
                         tokenizer=demo / "tokenizer.model")


def one_shot(engine, settings: Settings, prompt: str) -> tuple[float, int]:
    from mixchat.conversations.chat import Chat
    from mixchat.conversations.kvstore import SessionPool
    from mixchat.conversations.store import Store
    from mixchat.engine.generation import Done

    # Saved as it is written, as `mixchat -p` and the app do (a commit every few tokens).
    store = Store(Path(tempfile.mkdtemp(dir=HOME)) / "s.sqlite3")
    chat = Chat(engine, SessionPool(engine, Path(HOME) / "kv", 0), store)
    for ev in chat.send(prompt, settings.sampling()):
        if isinstance(ev, Done):
            return ev.decode_tokens_per_second, len(ev.generated)
    raise RuntimeError("no Done event")


def in_thread(fn, *args):
    """fn(*args) in a thread of its own, as the app decodes in its worker thread: both then run
    torch from a thread that is not the main one (its thread pool is per calling thread)."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)))
    thread.start()
    thread.join()
    if not out:
        raise RuntimeError("the one-shot run failed")
    return out[0]


async def in_app(folder: str, settings: Settings, prompt: str, experts: bool) -> tuple[float, int, float]:
    """Decode tokens/s, tokens, and the CPU seconds the UI thread spent on the reply."""
    from mixchat.conversations.store import Store
    from mixchat.frontends.tui.app import MixchatApp

    app = MixchatApp(model=folder, settings=settings, store=Store(Path(tempfile.mkdtemp(dir=HOME)) / "s.sqlite3"))
    async with app.run_test(size=(120, 40)) as pilot:
        while app.engine is None:
            if app.model_error:
                raise RuntimeError(app.model_error)
            await pilot.pause(0.05)
        if experts:
            await pilot.press("f3")
        await pilot.pause(0.2)  # the start-up's drawing done
        cpu = time.thread_time()  # this thread is the app's: its event loop, handlers and drawing
        app.send(prompt)
        pane = app.pane
        while pane.busy or pane.reply is None or pane.reply.streaming:
            # Not pilot.pause: it makes every widget handle a message and redraws the screen, work
            # a real terminal's app does not do.
            await asyncio.sleep(0.05)
        ui = time.thread_time() - cpu
        await pilot.pause(0.1)
        if pane.phase == "error":
            raise RuntimeError("the reply failed")
        return pane.stats["decode_tps"], pane.stats["generated"], ui


def main() -> int:
    from mixchat.engine.engine import keep_thread_serial

    # This thread is the app's UI thread below: serial before any torch op, as MixchatApp makes it (the
    # synthetic folder's random weights are made here too).
    keep_thread_serial()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="release folder (default: the demo model)")
    ap.add_argument("--synthetic", action="store_true",
                    help="the demo's shape with random weights and a 4096-token context")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=500)
    ap.add_argument("--prompt", default="Tell me a story.")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ns = ap.parse_args()

    from mixchat import paths
    from mixchat.engine.engine import Engine

    folder = (synthetic_release(Path(HOME) / "synthetic") if ns.synthetic else
              Path(ns.model) if ns.model else paths.demo_model())
    if folder is None:
        print("no demo model in this install: give --model or --synthetic", file=sys.stderr)
        return 2
    # Greedy, no penalty, no early stop but the model's own end of sequence: the same tokens every run.
    settings = Settings(temperature=0, top_p=1.0, repeat_penalty=1.0, max_tokens=ns.max_tokens, seed=1,
                        dtype=ns.dtype, threads=ns.threads)
    # Everything that runs torch runs outside the main thread, as in the app (which loads and decodes in
    # worker threads): once the main thread has run a parallel op, its OpenMP team spins beside every
    # other thread's and decoding from another thread is about 3x slower on 2 cores (measured here).
    def load(path: Path):
        return Engine.load(str(path), dtype=settings.dtype, threads=settings.threads or None, show_progress=False)

    engine = in_thread(load, folder)
    _, n = in_thread(one_shot, engine, settings, ns.prompt)  # also a warm-up: allocations and kernel choice
    if n < 0.9 * ns.max_tokens and not (ns.model or ns.synthetic):
        # The demo was trained to end its replies (a few dozen tokens): too short to time streaming.
        print(f"the demo model's greedy reply ends after {n} tokens: using its shape with random weights "
              "and a 4096-token context instead")
        folder = synthetic_release(Path(HOME) / "synthetic")
        engine = in_thread(load, folder)
        in_thread(one_shot, engine, settings, ns.prompt)
    print(f"model {folder} · {cpu_kind()} · torch threads {__import__('torch').get_num_threads()}")

    runs: dict[str, list[float]] = {"one-shot": [], "app": [], "app+experts": []}
    for r in range(ns.rounds):
        for kind in runs:
            start = time.monotonic()
            if kind == "one-shot":
                (tps, n), ui = in_thread(one_shot, engine, settings, ns.prompt), None
            else:
                tps, n, ui = asyncio.run(in_app(str(folder), settings, ns.prompt, kind == "app+experts"))
            runs[kind].append(tps)
            load = os.getloadavg()[0]
            ui_note = f"  UI thread {ui * 1000:5.0f} ms CPU" if ui is not None else " " * 22
            print(f"round {r + 1} {kind:12s} {n:4d} tokens  {tps:8.1f} tok/s{ui_note}  "
                  f"({time.monotonic() - start:.1f} s, load {load:.1f})")
            if n < ns.max_tokens * 0.9:
                print(f"  only {n} tokens: the reply ended early (try --synthetic)", file=sys.stderr)
    base = statistics.median(runs["one-shot"])
    print(f"one-shot median {base:.1f} tok/s")
    ok = True
    for kind in ("app", "app+experts"):
        med = statistics.median(runs[kind])
        ok &= med >= 0.9 * base
        print(f"{kind:12s} median {med:.1f} tok/s = {med / base:.0%} of one-shot")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
