"""`echo question | mixchat --model DIR` and `mixchat -p TEXT`: one answer streamed to stdout."""

from __future__ import annotations

import json
import sys
import threading
from argparse import Namespace
from typing import Any, TextIO

from mixchat.errors import MixchatError
from mixchat.safetext import json_text, visible
from mixchat.signals import StopOnSignals

# 64 MB of text is millions of tokens, beyond every context; reading more only fills memory.
MAX_INPUT_BYTES = 64 * 10**6


def check_text(text: str, source: str, fix: str) -> str:
    """A message as the user gave it, refused with one line when it cannot be one: bytes that are
    not UTF-8 (argv arrives with them as surrogate escapes), NUL bytes (binary data), or nothing but
    whitespace and control characters. Guessing would silently change what the model reads."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = text.encode("utf-8", "surrogateescape")
        offset = len(text[: exc.start].encode("utf-8", "surrogateescape"))
        raise MixchatError(
            f"{source} is not UTF-8 (byte 0x{raw[offset]:02x} at offset {offset}); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    if "\0" in text:
        raise MixchatError(f"{source} holds a NUL byte at offset {len(text[: text.index(chr(0))].encode())}: that is "
                           "binary data, not a message; give text")
    if not "".join(c for c in text if c.isprintable()).strip():
        raise MixchatError(f"{source} is empty; {fix}")
    return text


def read_stdin(stream: TextIO | None = None) -> str:
    """All of stdin as one message. It must be UTF-8: guessing another encoding would silently
    change what the model reads, so a clear error asks the user to convert it instead."""
    raw = (stream or sys.stdin).buffer.read(MAX_INPUT_BYTES + 1)
    if len(raw) > MAX_INPUT_BYTES:
        raise MixchatError(f"stdin holds more than {MAX_INPUT_BYTES // 10**6} MB: far more than any model's context; "
                           "pipe in only what the model should read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MixchatError(
            f"stdin is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    return check_text(text.removeprefix("\ufeff"), "stdin", "pipe a question in, or pass -p TEXT")


def recommended_sampling(engine=None, extra: dict | None = None) -> dict:
    """Sampling defaults a release folder recommends in params.json under "mixchat": {"sampling":
    {...}} (the demo model does: greedy decoding of a model that small loops). Flags still win.
    Unchecked: sampling_from checks the values it uses, naming the file for those it took from it."""
    if engine is not None:
        extra = engine.args.extra
    rec = (extra or {}).get("mixchat", {})
    rec = rec.get("sampling", {}) if isinstance(rec, dict) else {}
    keys = ("temperature", "top_p", "top_k", "repeat_penalty", "max_tokens")
    return {k: v for k, v in rec.items() if k in keys} if isinstance(rec, dict) else {}


def sampling_from(ns: Namespace, recommended: dict | None = None, source: str = "params.json",
                  saved: dict | None = None, saved_source: str = "settings.json"):
    """Sampling settings from the flags given, then the values the user saved (`saved`: only the keys
    settings.json holds), then the model's recommendation, then the defaults (settings.py's rule). A
    bad value is blamed on where it came from: a flag, `saved_source` or `source`."""
    from mixchat.engine.sampling import SamplingSettings, flag_name
    from mixchat.settings import SAMPLING_KEYS

    given = {k: v for k in SAMPLING_KEYS if (v := getattr(ns, k, None)) is not None}
    recommended, saved = recommended or {}, {k: v for k, v in (saved or {}).items() if k in SAMPLING_KEYS}
    s = SamplingSettings(**{**recommended, **saved, **given})

    def name(f: str) -> str:
        if f in given:
            return flag_name(f)
        if f in saved:
            return f"{saved_source}: {f}"
        return f"{source}: mixchat.sampling.{f}" if f in recommended else flag_name(f)

    s.check(name=name)
    return s


# The model-loading flags and the settings.json keys (the app's F2 sheet) they stand for.
LOAD_FLAGS = (("dtype", "dtype"), ("threads", "threads"), ("quant", "quant"), ("memory_budget", "memory_budget_gb"),
              ("context", "context"))


def load_flags_given(ns: Any) -> dict[str, Any]:
    """The model-loading flags given now, by settings key (their defaults, None and auto, are not given)."""
    return {key: value for flag, key in LOAD_FLAGS if (value := getattr(ns, flag, None)) and value != "auto"}


def apply_saved_load_options(ns: Any, saved: Any) -> dict[str, Any]:
    """How the app (F2) loads a model, where no flag says otherwise now: its dtype, threads, quantization,
    memory budget and context, by the app's own rule (cli._interactive: a flag given now wins, then the saved
    value; the saved defaults, auto/0/none, change nothing). Returns the flags set from the saved values."""
    given = load_flags_given(ns)
    applied = {}
    for flag, key in LOAD_FLAGS:
        if key not in given and (value := getattr(saved, key)) and value not in ("auto", "none"):
            setattr(ns, flag, value)
            applied[flag] = value
    return applied


def model_given(ns: Any) -> str | None:
    """The folder --model or $MIXCHAT_MODEL names, if any: it wins over every saved or remembered one."""
    import os

    return ns.model or os.environ.get("MIXCHAT_MODEL")


def model_for(given: str | None, conv: Any, default: str | None) -> str:
    """The model a turn runs on: the one given (--model, $MIXCHAT_MODEL), else the one that last wrote the
    conversation being continued, else the usual choice. A conversation's folder that has gone says so, with
    the way to go on (it said only "no such folder", as if the user had named it)."""
    if given:
        return given
    if conv is not None and conv.model_path:
        from pathlib import Path

        if Path(conv.model_path).expanduser().is_dir():
            return conv.model_path
        from mixchat.conversations.store import short_id
        from mixchat.safetext import one_line

        raise MixchatError(f"conversation {short_id(conv.id)} was last written with {one_line(conv.model_path)}, "
                           "which is not a folder any more; pass --model DIR to go on with another model")
    if not default:
        raise MixchatError("no model given: pass --model DIR (a Mistral/Mixtral release folder) or set MIXCHAT_MODEL")
    return default


def load_engine(model: str, ns: Any, from_saved: dict[str, Any]):
    """Engine.load with the flags; a quantization the model's shapes refuse says so when the saved settings
    chose it (the user gave no flag: `quant int4` came from settings.json, and a flag overrides it)."""
    from mixchat.engine.engine import Engine, QuantDoesNotFit, load_options
    from mixchat.settings import settings_path

    try:
        return Engine.load(model, **load_options(ns))
    except QuantDoesNotFit as exc:
        if "quant" not in from_saved:
            raise
        chosen = f"--quant {from_saved['quant']}"
        blamed = MixchatError(f"{exc} (the saved settings, {settings_path()}, chose {chosen}; a flag given now "
                              "overrides them)")
        blamed.exit_code = exc.exit_code
        raise blamed from None


def saved_settings() -> tuple[Any, dict[str, Any], frozenset[str]]:
    """settings.json as every front end reads it: the settings, and the sampling values the user
    saved (those win over a folder's recommendation; defaults do not)."""
    from mixchat import settings as settings_mod

    saved, keys, problems = settings_mod.read()
    for problem in problems:  # a value left out is said, not silently replaced by its default
        _say(sys.stderr, f"note: {problem}")
    return saved, {k: getattr(saved, k) for k in settings_mod.SAMPLING_KEYS if k in keys}, keys


def when_full_from(ns: Namespace, saved, keys: frozenset[str]) -> str:
    """--when-full if given, else the saved setting, else "drop"."""
    from mixchat.settings import WHEN_FULL, choose

    value, _ = choose("when_full", {"when_full": getattr(ns, "when_full", None)}, saved, keys)
    if value not in WHEN_FULL:
        raise MixchatError(f"--when-full {str(value)[:20]}: use drop (the oldest turns make room) or stop (a full "
                           "conversation refuses new messages)")
    return value


def _say(err: TextIO, line: str) -> None:
    """A line on stderr, where a hung-up terminal must not turn a saved reply into a traceback."""
    try:
        err.write(visible(line) + "\n")
        err.flush()
    except OSError:
        pass


class _Output:
    """stdout for the reply. When it fails (the reader went away, the terminal hung up and writes
    give EIO) the reply is asked to stop, and the rest is not written: the conversation still ends
    properly, saved with what was generated and its KV cache."""

    def __init__(self, stream: TextIO, cancel: threading.Event) -> None:
        self.stream, self.cancel = stream, cancel
        self.failed: OSError | None = None

    def write(self, text: str) -> None:
        if self.failed is not None:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError as exc:
            self.failed = exc
            self.cancel.set()


def format_stats(done) -> str:
    drafts = f" ({done.accepted} of {done.drafted} drafted tokens kept, {done.passes} passes)" if done.drafted else ""
    ranks = f", {done.rank_wait_per_token * 1e3:.1f} ms/token waiting on other ranks" if done.rank_wait else ""
    return (f"{len(done.prompt_tokens)} prompt tokens ({done.cached_tokens} cached, {done.prefilled_tokens} prefilled "
            f"at {done.prefill_tokens_per_second:.1f} tok/s), {len(done.generated)} generated at "
            f"{done.decode_tokens_per_second:.2f} tok/s{drafts}{ranks}, first token after "
            f"{done.time_to_first_token:.2f} s, stop: {done.stop}")


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
    from mixchat.engine.generation import Session

    return Session(engine).generate(engine.tokenizer.encode(text, bos=True), settings, cancel)


def run(ns: Namespace, text: str, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from mixchat import paths
    from mixchat.conversations import kvstore
    from mixchat.conversations.chat import Chat, ContextTrimmed
    from mixchat.conversations.store import Store
    from mixchat.engine.generation import Done, TokenEvent
    from mixchat.settings import settings_path

    out, err = out or sys.stdout, err or sys.stderr  # looked up now: tests and callers may swap them
    sampling_from(ns)  # fail on a bad flag before the model loads; the real settings come after
    saved, saved_sampling, saved_keys = saved_settings()
    from_saved = apply_saved_load_options(ns, saved)
    when_full = when_full_from(ns, saved, saved_keys)
    continuing = bool(ns.cont or ns.cid)
    if ns.raw and continuing:
        raise MixchatError("--raw is a plain completion, not a conversation: it cannot continue one (-c/--cid)")
    save = not (ns.no_save or ns.raw)  # plain completions are not conversations
    store = Store(paths.store_path()) if (save or continuing) else None
    conv = _resolve_conversation(ns, store) if continuing else None
    model = model_for(ns.model, conv, getattr(ns, "default_model", None))

    engine = load_engine(model, ns, from_saved)
    settings = sampling_from(ns, recommended_sampling(engine), str(engine.release.params), saved_sampling,
                             str(settings_path()))
    show_stats = ns.stats or err.isatty()
    done = trimmed = None
    with StopOnSignals() as stop:
        cancel = stop.event
        if ns.raw:
            chat, events = None, _raw(engine, text, settings, cancel)
        else:
            chat = Chat(engine, kvstore.SessionPool(engine, paths.kv_dir()), store, conv, ns.system)
            for note in chat.notes:
                _say(err, note)
            if conv and ns.system is not None and ns.system != conv.system:
                store.update_settings(conv.id, ns.system, conv.settings)
            events = chat.send(text, settings, cancel, save=save, when_full=when_full)
        output = _Output(out, cancel)
        for event in events:
            if isinstance(event, ContextTrimmed):
                trimmed = event
            elif isinstance(event, TokenEvent):
                if ns.json:
                    line = {"token": event.id, "text": event.text}
                    if event.experts is not None:
                        line["experts"] = event.experts
                    output.write(json_text(line) + "\n")
                else:
                    output.write(visible(event.text))  # model text is data: no escape sequence acts
            elif isinstance(event, Done):
                done = event
    cid = chat.id if chat and save else None
    if ns.json:
        output.write(json.dumps({
            "done": True, "prompt_tokens": done.prompt_tokens, "cached_tokens": done.cached_tokens,
            "prefilled_tokens": done.prefilled_tokens, "generated_tokens": len(done.generated), "stop": done.stop,
            "prefill_tokens_per_second": round(done.prefill_tokens_per_second, 3),
            "decode_tokens_per_second": round(done.decode_tokens_per_second, 3),
            "time_to_first_token": round(done.time_to_first_token, 3),
            "drafted_tokens": done.drafted, "accepted_tokens": done.accepted, "decode_passes": done.passes,
            "conversation": cid, "context": chat.session.context_limit if chat else engine.context,
            "dropped_messages": trimmed.dropped_messages if trimmed else 0,
            "context_start": chat.context_start if chat else 0,
            "kv_bytes_per_token": engine.kv_bytes_per_token, "world_size": engine.world_size,
            "rank_wait_seconds": round(done.rank_wait, 4),
            **({"experts": engine.experts.stats.as_dict()} if engine.experts is not None else {}),
        }) + "\n")
    elif not done.text.endswith("\n"):
        output.write("\n")
    for note in done.notes:
        _say(err, note)
    if show_stats:
        if engine.context_note:
            _say(err, engine.context_note)
        _say(err, format_stats(done) + (f", saved as {cid}" if cid else ""))
        if engine.experts is not None:
            from mixchat.engine.bench import format_experts

            _say(err, "experts: " + format_experts(engine))
    if stop.exit_code is not None:
        return stop.exit_code  # 130 for Ctrl+C, 143 for SIGTERM, 129 for SIGHUP
    if isinstance(output.failed, BrokenPipeError):
        return 0  # the reader went away (mixchat ... | head): quietly, as Unix tools do
    return 130 if done.stop == "interrupted" else 0
