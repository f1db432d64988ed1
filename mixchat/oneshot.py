"""`echo question | mixchat --model DIR` and `mixchat -p TEXT`: one answer streamed to stdout."""

from __future__ import annotations

import json
import signal
import sys
import threading
from argparse import Namespace
from typing import TextIO

from mixchat.errors import ContextError, MixchatError


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


def sampling_from(ns: Namespace):
    from mixchat.sampling import SamplingSettings

    s = SamplingSettings(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                         repeat_penalty=ns.repeat_penalty, max_tokens=ns.max_tokens, seed=ns.seed)
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


def run(ns: Namespace, text: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    from mixchat.chat_format import Message, encode_chat
    from mixchat.engine import Engine
    from mixchat.generation import Done, Session, TokenEvent

    settings = sampling_from(ns)
    engine = Engine.load(ns.model, dtype=ns.dtype, device=ns.device, threads=ns.threads)
    tok = engine.tokenizer
    prompt = tok.encode(text, bos=True) if ns.raw else encode_chat(tok, [Message("user", text)], ns.system)
    session = Session(engine)
    if len(prompt) >= session.context_limit:
        raise ContextError(f"the prompt is {len(prompt)} tokens but {ns.model} holds {session.context_limit} "
                           "tokens of context; shorten it")
    show_stats = ns.stats or err.isatty()
    done = None
    with _StopOnSigint() as cancel:
        for event in session.generate(prompt, settings, cancel):
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
    if ns.json:
        out.write(json.dumps({
            "done": True, "prompt_tokens": done.prompt_tokens, "cached_tokens": done.cached_tokens,
            "prefilled_tokens": done.prefilled_tokens, "generated_tokens": len(done.generated), "stop": done.stop,
            "prefill_tokens_per_second": round(done.prefill_tokens_per_second, 3),
            "decode_tokens_per_second": round(done.decode_tokens_per_second, 3),
            "time_to_first_token": round(done.time_to_first_token, 3),
        }) + "\n")
    elif not done.text.endswith("\n"):
        out.write("\n")
    out.flush()
    if show_stats:
        err.write(format_stats(done) + "\n")
    return 130 if done.stop == "interrupted" else 0
