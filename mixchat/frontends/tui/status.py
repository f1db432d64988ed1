"""The status bar's text: model, dtype and device, live speed, context gauge, cache re-use.

Two lines, each fitted to the bar's width: the first names the model and the speed, the second is
the context gauge. Fitting drops the least useful pieces first (and shortens the model name), so the
gauge, the tokens used and the cache re-use stay in view at any width from 80 columns."""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual.widgets import Static

from mixchat.progress import human_bytes
from mixchat.safetext import one_line

# Pieces of a line, most important first: (priority, text). Lower numbers are kept longer.
Piece = tuple[int, Text]
MIN_NAME = 8  # a model name is shortened to this many characters before anything else is dropped
DEMO_NOTES = ("small demo model: F2 to use a real Mistral/Mixtral release folder", "demo model: F2 for a real one")


def fit(pieces: list[Piece], width: int | None) -> Text:
    """The pieces in order, leaving out the lowest-priority ones (largest number) until they fit."""
    kept = list(pieces)
    if width is not None:
        while len(kept) > 1 and sum(len(t) for _, t in kept) > width:
            worst = max(range(len(kept)), key=lambda i: (kept[i][0], i))
            kept.pop(worst)
    out = Text()
    for _, t in kept:
        out.append_text(t)
    if width is not None:
        out.truncate(width, overflow="ellipsis")
    return out


def shortened(name: str, room: int) -> str:
    """A model folder's name in at most `room` characters (never fewer than MIN_NAME), its start kept."""
    room = max(room, MIN_NAME)
    return name if len(name) <= room else name[: room - 1] + "…"


def _speed(pane) -> list[Piece]:
    s = pane.stats
    if pane.busy and s.get("count"):
        # Live: tokens so far over the time since the first, refreshed four times a second.
        elapsed = time.monotonic() - s.get("started", 0) - s.get("ttft", 0)
        tps = (s["count"] - 1) / elapsed if elapsed > 0 and s["count"] > 1 else s.get("tps", 0)
        return [(1, Text(" · ") + Text(f"{tps:.2f} tok/s", style="bold")), (2, Text(f" · {s['count']} tokens"))]
    if pane.busy:
        return [(1, Text(f" · {one_line(pane.phase)} …"))]
    if s.get("decode_tps") is not None:
        drafts = [(3, Text(f" · drafts {s['accepted']}/{s['drafted']} kept"))] if s.get("drafted") else []
        if s.get("rank_wait_ms"):  # torchrun: the part of each token spent on the other ranks' layers
            drafts.append((3, Text(f" · ranks {s['rank_wait_ms']:.1f} ms/token")))
        return [(1, Text(f" · {s['decode_tps']:.2f} tok/s")), *drafts, (3, Text(f" · first token {s['ttft']:.2f} s")),
                (4, Text(f" · prefill {s['prefill_tps']:.1f} tok/s")), (2, Text(f" · {one_line(pane.phase)}"))]
    return []


def first_line(engine, pane, demo: bool, width: int | None) -> Text:
    e = engine
    name = one_line(Path(str(e.release.folder)).name)
    weights = e.quant.label if e.quant else str(e.dtype).removeprefix("torch.")
    ranks = f" × {e.world_size} ranks" if getattr(e, "world_size", 1) > 1 else ""
    rest: list[Piece] = [(0, Text(f" · {weights} on {e.device}{ranks}"))]
    if e.experts is not None:  # plain counters, safe to read while the worker updates them
        st = e.experts.stats
        rest.append((5, Text(f" · experts {e.experts.capacity} resident, {st.hit_rate:.0%} hits")))
    if pane is not None and pane.chat is not None:
        rest += _speed(pane)
    room = None if width is None else max(width - MIN_NAME, 1)
    body = fit(rest, room)
    if demo:  # the longest note that still fits after the speed; the hint in the chat says more
        for note in DEMO_NOTES:
            if width is None or len(name) + len(body) + len(note) + 3 <= width:
                body.append(" · ")
                body.append(note, style="italic")
                break
    head = Text(name if width is None else shortened(name, width - len(body)), style="bold")
    return fit([(0, head), (0, body)], width)


def context_line(engine, pane, when_full: str, width: int | None) -> Text:
    """The gauge: tokens in the cache out of the context, what the cut dropped, KV bytes per token."""
    e, chat = engine, pane.chat
    used, limit = chat.context_used(), chat.session.context_limit
    pieces: list[Piece] = [(0, Text(f"context {gauge(used, limit)} {used}/{limit}"))]
    dropped = chat.dropped_tokens() if chat.context_start else 0
    if dropped:
        pieces.append((0, Text(f" · dropped {dropped}", style="yellow")))
    if used > 0.9 * limit:
        full = ("the oldest turns drop out next" if when_full == "drop"
                else "the reply stops when it is full; start a new chat")
        pieces.append((1, Text(" nearly full", style="bold red")))
        pieces.append((4, Text(f": {full}", style="bold red")))
    else:
        pieces.append((5, Text(" · when full: " + ("the oldest turns drop out" if when_full == "drop"
                                                     else "replies stop; start a new chat"))))
    pieces.append((2, Text(f" · KV {human_bytes(e.kv_bytes_per_token)}/token")))
    if limit < e.args.max_seq_len:  # memory or --context chose less than params.json allows
        pieces.append((3, Text(f" (of {e.args.max_seq_len}{', as memory allows' if e.context_note else ''})")))
    if "cached" in pane.stats:
        pieces.append((0, Text(f" · cache re-used {pane.stats['cached']} tokens")))
    return fit(pieces, width)


def status_text(engine, pane, model_error: str | None, model_folder: str | None, demo: bool = False,
                width: int | None = None, when_full: str = "drop", load_step: str | None = None) -> Text:
    """The two lines of the status bar, from the engine's facts and the pane's live figures, fitted
    to `width` columns (None: not fitted). Built as Text, not markup: the folder name and the error
    come from the user's files."""
    if engine is None:
        if model_error:
            head = Text("model", style="bold") + Text(" " + one_line(model_error))
        else:
            head = Text(f"loading {one_line(str(model_folder))} …")
            if load_step:  # on the second line: the folder's path may take the whole first one
                head.append("\n" + one_line(load_step))
        # An error may be long: it gets both lines, wrapped, rather than being cut.
        return head
    out = first_line(engine, pane, demo, width)
    out.append("\n")
    if pane is not None and pane.chat is not None:
        out.append_text(context_line(engine, pane, when_full, width))
    return out


class StatusBar(Static):
    DEFAULT_CSS = "StatusBar { height: 2; background: $panel; color: $text; padding: 0 1; }"


def gauge(used: int, limit: int, width: int = 12) -> str:
    frac = min(used / limit, 1.0) if limit else 0.0
    return "█" * round(frac * width) + "░" * (width - round(frac * width))
