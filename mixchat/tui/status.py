"""The status bar's text: model, dtype and device, live speed, context gauge, cache re-use."""

from __future__ import annotations

import time
from pathlib import Path

from mixchat.tui.widgets import gauge


def status_text(engine, pane, model_error: str | None, model_folder: str | None, demo: bool = False) -> str:
    """The two lines of the status bar, from the engine's facts and the pane's live figures."""
    if engine is None:
        return f"[b]model[/b] {model_error}" if model_error else f"loading {model_folder} …"
    e = engine
    name = Path(str(e.release.folder)).name
    weights = e.quant.name if e.quant else str(e.dtype).removeprefix("torch.")
    line1 = f"[b]{name}[/b] · {weights} on {e.device}"
    if e.experts is not None:  # plain counters, safe to read while the worker updates them
        st = e.experts.stats
        line1 += f" · experts {e.experts.capacity} resident, {st.hit_rate:.0%} hits"
    if demo:
        line1 += " · [i]small demo model: F2 to use a real Mistral/Mixtral release folder[/i]"
    line2 = ""
    if pane is not None and pane.chat is not None:
        s = pane.stats
        if pane.busy and s.get("count"):
            # Live: tokens so far over the time since the first, refreshed four times a second.
            elapsed = time.monotonic() - s.get("started", 0) - s.get("ttft", 0)
            tps = (s["count"] - 1) / elapsed if elapsed > 0 and s["count"] > 1 else s.get("tps", 0)
            line1 += f" · [b]{tps:.2f} tok/s[/b] · {s['count']} tokens"
        elif pane.busy:
            line1 += f" · {pane.phase} …"
        elif s.get("decode_tps") is not None:
            line1 += (f" · {s['decode_tps']:.2f} tok/s · first token {s['ttft']:.2f} s · prefill "
                      f"{s['prefill_tps']:.1f} tok/s · {pane.phase}")
        used, limit = pane.chat.context_used(), pane.chat.session.context_limit
        warn = " [b red]nearly full: the reply will stop when it is; start a new conversation[/]" \
            if used > 0.9 * limit else " (when full, replies stop; start a new chat)"
        cache = f" · cache re-used {s['cached']} tokens" if "cached" in s else ""
        line2 = f"context {gauge(used, limit)} {used}/{limit}{warn}{cache}"
    return line1 + "\n" + line2
