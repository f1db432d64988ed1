"""The status bar's text: model, dtype and device, live speed, context gauge, cache re-use."""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual.widgets import Static

from mixchat.progress import human_bytes
from mixchat.safetext import one_line


def status_text(engine, pane, model_error: str | None, model_folder: str | None, demo: bool = False) -> Text:
    """The two lines of the status bar, from the engine's facts and the pane's live figures. Built
    as Text, not markup: the folder name and the error come from the user's files."""
    out = Text()
    if engine is None:
        if model_error:
            out.append("model", style="bold")
            out.append(" " + one_line(model_error))
        else:
            out.append(f"loading {one_line(str(model_folder))} …")
        return out
    e = engine
    name = Path(str(e.release.folder)).name
    weights = e.quant.name if e.quant else str(e.dtype).removeprefix("torch.")
    out.append(one_line(name), style="bold")
    out.append(f" · {weights} on {e.device}")
    if e.experts is not None:  # plain counters, safe to read while the worker updates them
        st = e.experts.stats
        out.append(f" · experts {e.experts.capacity} resident, {st.hit_rate:.0%} hits")
    if demo:
        out.append(" · ")
        out.append("small demo model: F2 to use a real Mistral/Mixtral release folder", style="italic")
    if pane is not None and pane.chat is not None:
        s = pane.stats
        if pane.busy and s.get("count"):
            # Live: tokens so far over the time since the first, refreshed four times a second.
            elapsed = time.monotonic() - s.get("started", 0) - s.get("ttft", 0)
            tps = (s["count"] - 1) / elapsed if elapsed > 0 and s["count"] > 1 else s.get("tps", 0)
            out.append(" · ")
            out.append(f"{tps:.2f} tok/s", style="bold")
            out.append(f" · {s['count']} tokens")
        elif pane.busy:
            out.append(f" · {pane.phase} …")
        elif s.get("decode_tps") is not None:
            out.append(f" · {s['decode_tps']:.2f} tok/s · first token {s['ttft']:.2f} s · prefill "
                       f"{s['prefill_tps']:.1f} tok/s · {pane.phase}")
        used, limit = pane.chat.context_used(), pane.chat.session.context_limit
        out.append(f"\ncontext {gauge(used, limit)} {used}/{limit} · KV {human_bytes(e.kv_bytes_per_token)}/token")
        if limit < e.args.max_seq_len:  # memory or --context chose less than params.json allows
            out.append(f" (of {e.args.max_seq_len}{', as memory allows' if e.context_note else ''})")
        if used > 0.9 * limit:
            out.append(" ")
            out.append("nearly full: the reply will stop when it is; start a new conversation", style="bold red")
        else:
            out.append(" (when full, replies stop; start a new chat)")
        if "cached" in s:
            out.append(f" · cache re-used {s['cached']} tokens")
    else:
        out.append("\n")
    return out


class StatusBar(Static):
    DEFAULT_CSS = "StatusBar { height: 2; background: $panel; color: $text; padding: 0 1; }"


def gauge(used: int, limit: int, width: int = 12) -> str:
    frac = min(used / limit, 1.0) if limit else 0.0
    return "█" * round(frac * width) + "░" * (width - round(frac * width))
