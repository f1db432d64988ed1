"""`echo question | mixchat --model DIR` and `mixchat -p TEXT`: one answer streamed to stdout."""

from __future__ import annotations

import json
import signal
import sys
import threading
from argparse import Namespace
from typing import TextIO

from mixchat.errors import MixchatError


def read_stdin(stream: TextIO | None = None) -> str:
    """All of stdin as one message. It must be UTF-8: guessing another encoding would silently
    change what the model reads, so a clear error asks the user to convert it instead."""
    raw = (stream or sys.stdin).buffer.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MixchatError(
            f"stdin is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    if not text.strip():
        raise MixchatError("stdin is empty; pipe a question in, or pass -p TEXT")
    return text.removeprefix("\ufeff")


def recommended_sampling(engine=None, extra: dict | None = None) -> dict:
    """Sampling defaults a release folder recommends in params.json under "mixchat": {"sampling":
    {...}} (the demo model does: greedy decoding of a model that small loops). Flags still win."""
    rec = (engine.args.extra if engine is not None else extra or {}).get("mixchat", {})
    rec = rec.get("sampling", {}) if isinstance(rec, dict) else {}
    keys = ("temperature", "top_p", "top_k", "repeat_penalty", "max_tokens")
    return {k: v for k, v in rec.items() if k in keys} if isinstance(rec, dict) else {}


def sampling_from(ns: Namespace, recommended: dict | None = None):
    """Sampling settings from the flags given, then the model's recommendation, then the defaults."""
    from mixchat.sampling import SamplingSettings

    given = {k: getattr(ns, k, None) for k in ("temperature", "top_p", "top_k", "repeat_penalty", "max_tokens",
                                                 "seed")}
    s = SamplingSettings(**{**(recommended or {}), **{k: v for k, v in given.items() if v is not None}})
    s.check()
    return s


class _StopOnSigint:
    """First Ctrl+C asks the generator to stop after the current token (the partial answer and the
    summary are still printed); a second one aborts at once."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __enter__(self) -> threading.Event:
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self.event

    def _handle(self, signum, frame) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._old)


def format_stats(done) -> str:
    return (f"{len(done.prompt_tokens)} prompt tokens ({done.cached_tokens} cached, {done.prefilled_tokens} prefilled "
            f"at {done.prefill_tokens_per_second:.1f} tok/s), {len(done.generated)} generated at "
            f"{done.decode_tokens_per_second:.2f} tok/s, first token after {done.time_to_first_token:.2f} s, "
            f"stop: {done.stop}")


def _resolve_conversation(ns: Namespace, store):
    """The conversation -c/--cid continues, or None for a new one."""
    if ns.cid:
        return store.get(ns.cid)
    if ns.cont:
        conv = store.latest()
        if conv is None:
            raise MixchatError("no conversation to continue yet; run without -c to start one")
        return conv
    return None


def _raw(engine, text: str, settings, cancel):
    from mixchat.generation import Session

    return Session(engine).generate(engine.tokenizer.encode(text, bos=True), settings, cancel)


def run(ns: Namespace, text: str, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from mixchat import kvstore, paths
    from mixchat.chat import Chat
    from mixchat.engine import Engine, load_options
    from mixchat.generation import Done, TokenEvent
    from mixchat.store import Store

    out, err = out or sys.stdout, err or sys.stderr  # looked up now: tests and callers may swap them
    sampling_from(ns)  # fail on a bad flag before the model loads; the real settings come after
    continuing = bool(ns.cont or ns.cid)
    if ns.raw and continuing:
        raise MixchatError("--raw is a plain completion, not a conversation: it cannot continue one (-c/--cid)")
    save = not (ns.no_save or ns.raw)  # plain completions are not conversations
    store = Store(paths.store_path()) if (save or continuing) else None
    conv = _resolve_conversation(ns, store) if continuing else None
    model = ns.model or (conv.model_path if conv else None)
    if not model:
        raise MixchatError("no model given: pass --model DIR (a Mistral/Mixtral release folder) or set MIXCHAT_MODEL")

    engine = Engine.load(model, **load_options(ns))
    settings = sampling_from(ns, recommended_sampling(engine))
    show_stats = ns.stats or err.isatty()
    done = None
    with _StopOnSigint() as cancel:
        if ns.raw:
            chat, events = None, _raw(engine, text, settings, cancel)
        else:
            chat = Chat(engine, kvstore.SessionPool(engine, paths.kv_dir()), store, conv, ns.system)
            for note in chat.notes:
                err.write(note + "\n")
            if conv and ns.system is not None and ns.system != conv.system:
                store.update_settings(conv.id, ns.system, conv.settings)
            events = chat.send(text, settings, cancel, save=save)
        for event in events:
            if isinstance(event, TokenEvent):
                if ns.json:
                    line = {"token": event.id, "text": event.text}
                    if event.experts is not None:
                        line["experts"] = event.experts
                    out.write(json.dumps(line, ensure_ascii=False) + "\n")
                else:
                    out.write(event.text)
                out.flush()
            elif isinstance(event, Done):
                done = event
    cid = chat.id if chat and save else None
    if ns.json:
        out.write(json.dumps({
            "done": True, "prompt_tokens": done.prompt_tokens, "cached_tokens": done.cached_tokens,
            "prefilled_tokens": done.prefilled_tokens, "generated_tokens": len(done.generated), "stop": done.stop,
            "prefill_tokens_per_second": round(done.prefill_tokens_per_second, 3),
            "decode_tokens_per_second": round(done.decode_tokens_per_second, 3),
            "time_to_first_token": round(done.time_to_first_token, 3),
            "conversation": cid,
            **({"experts": engine.experts.stats.as_dict()} if engine.experts is not None else {}),
        }) + "\n")
    elif not done.text.endswith("\n"):
        out.write("\n")
    out.flush()
    if show_stats:
        err.write(format_stats(done) + (f", saved as {cid}" if cid else "") + "\n")
        if engine.experts is not None:
            from mixchat.bench import format_experts

            err.write("experts: " + format_experts(engine) + "\n")
    return 130 if done.stop == "interrupted" else 0
