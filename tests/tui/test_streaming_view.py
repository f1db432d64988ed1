"""A reply as it streams: batched and appended (same text and routing as the model wrote), as
Markdown before it ends, tokens clickable without taking the focus from the prompt, readable on
every expert colour, and the line where the model's view of the conversation starts."""

from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import tiny_args
from rich.text import Text
from textual.widgets import Markdown
from textual.widgets._markdown import MarkdownFence

from mixchat.engine.generation import Done, Session, TokenEvent
from mixchat.frontends.tui import colors
from mixchat.frontends.tui.app import MixchatApp
from mixchat.frontends.tui.expertpanel import ExpertPanel
from mixchat.frontends.tui.widgets import ContextDivider, MessageView, PromptInput, context_cut_text
from mixchat.safetext import visible
from mixchat.settings import Settings
from tui.pilot import wait_until as _wait_until

MOE = {"num_experts": 4, "num_experts_per_tok": 2}
SIZE = (140, 50)


def settings(**kw) -> Settings:
    base = dict(dtype="fp32", temperature=1.0, top_p=1.0, repeat_penalty=1.0, max_tokens=100000, seed=1)
    base.update(kw)
    return Settings(**base)


async def wait_until(pilot, condition, timeout: float = 60.0) -> None:
    await _wait_until(pilot, condition, timeout, step=0.02)  # a finer step: streamed batches come quickly


def routing(i: int) -> tuple[list, list]:
    """Token i's experts and weights at each of 3 layers, different per token and per layer."""
    experts = [[(i + layer) % 4, (i + layer + 1) % 4] for layer in range(3)]
    return experts, [[0.7, 0.3]] * 3


def scripted(pieces: list[str], gate: threading.Event | None = None, hold_before: int | None = None):
    """A Session.generate writing `pieces` as tokens with routing(i); before piece `hold_before` it
    waits for `gate`, so a test can look at the reply while it is still being written."""

    def generate(self, prompt, settings=None, cancel=None):
        done = Done(prompt_tokens=list(prompt), cached_tokens=0, prefilled_tokens=len(prompt))
        for i, piece in enumerate(pieces):
            if i == hold_before:
                assert gate.wait(60)
            if cancel is not None and cancel.is_set():
                done.stop = "interrupted"
                break
            done.generated.append(100 + i)
            done.text += piece
            experts, weights = routing(i)
            yield TokenEvent(100 + i, piece, experts, weights, 0.0)
        yield done

    return generate


@pytest.fixture
def mixtral(make_release):
    return make_release(tiny_args(moe=MOE, n_layers=3), "torrent", seed=2, std=0.15)


def finished(pane) -> bool:
    return not pane.busy and pane.reply is not None and not pane.reply.streaming


# -- batching and appending ------------------------------------------------------------------------


@pytest.mark.parametrize("experts", [False, True], ids=["markdown", "expert-view"])
def test_a_batched_appended_reply_has_every_token_and_its_routing(mixtral, monkeypatch, experts):
    # Words, line ends, a CR LF split over two tokens, markup-like text and control characters.
    pieces = [f"word{i} " for i in range(300)] + ["line\r", "\nnext [b]x[/b] \x1b[2J", " end"]
    monkeypatch.setattr(Session, "generate", scripted(pieces))
    batches: list[int] = []
    extend = MessageView.extend

    def counting(self, tokens):
        batches.append(len(tokens))
        extend(self, tokens)

    monkeypatch.setattr(MessageView, "extend", counting)

    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings())
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            if experts:
                await pilot.press("f3")
            app.send("hello")
            pane = app.pane
            await wait_until(pilot, lambda: finished(pane))
            await pilot.pause(0.2)
            reply = pane.reply
            text = "".join(pieces)
            # Tokens arrive in batches, not one message and one redraw each...
            assert sum(batches) == len(pieces) and len(batches) < len(pieces) // 4
            # ...and nothing is lost or reordered on the way.
            assert reply.text == text
            assert reply.tokens == [(p, *routing(i)) for i, p in enumerate(pieces)]
            assert pane.stats["count"] == len(pieces) and pane.last_token == reply.tokens[-1]
            assert sum(sum(c.values()) for c in pane.usage) == 3 * 2 * len(pieces)
            if experts:
                # The appended Text is the one a full rebuild makes: one span per token, on its
                # expert's colour at the chosen layer, clickable.
                assert reply._shown == reply._body()
                # Token by token: a CR ending one token is shown (␍), whatever the next one holds.
                assert reply._shown.plain == "".join(visible(p) for p in pieces)
                spans = reply._shown.spans
                assert len(spans) == len(pieces)
                for i, span in enumerate(spans):
                    e = routing(i)[0][app.settings.expert_layer][0]
                    assert str(span.style.bgcolor.name) == colors.expert_color(e)
                    assert span.style.meta["@click"] == f"app.select_token(1,{i})"
            else:
                # The streamed Markdown holds exactly the reply, as one parse of it would.
                assert reply.query_one(Markdown).source == visible(text)
                assert "␛[2J" in reply.query_one(Markdown).source and "\x1b" not in reply.query_one(Markdown).source
                assert "␍" not in reply.query_one(Markdown).source  # the split CR LF is a line end

    asyncio.run(scenario())


# -- Markdown while streaming ----------------------------------------------------------------------


def test_a_code_fence_is_a_highlighted_code_block_before_the_reply_ends(mixtral, monkeypatch):
    pieces = ["Here", " is", " the", " code", ":\n\n", "```", "python", "\n", "def", " f", "():\n",
              "    return", " 1", "\n", "```", "\n\n", "See [the docs](app.quit)", " for", " more", ".", " Done"]
    gate = threading.Event()
    hold = pieces.index(" for")
    monkeypatch.setattr(Session, "generate", scripted(pieces, gate, hold_before=hold))
    updates: list[str] = []
    update = Markdown.update

    def watched(self, markdown):
        updates.append(markdown)
        return update(self, markdown)

    monkeypatch.setattr(Markdown, "update", watched)

    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings())
        opened: list[str] = []
        monkeypatch.setattr(app, "open_url", lambda url, **kw: opened.append(url))
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            app.send("show me code")
            pane = app.pane
            # The fence is mounted first and filled by the Markdown's own update a moment later (later still
            # on a busy machine): wait for its code, not only for the widget.
            await wait_until(pilot, lambda: pane.reply is not None and pane.reply.text.endswith("docs](app.quit)")
                             and any(f.code.strip() for f in pane.reply.query(MarkdownFence)))
            reply = pane.reply
            assert pane.busy and reply.streaming  # still being written
            fence = reply.query_one(MarkdownFence)
            assert fence.lexer == "python" and fence.code.rstrip("\n") == "def f():\n    return 1"
            # Highlighted: the code is drawn in more than one colour.
            await pilot.pause(0.1)
            r = fence.region
            drawn = [s.crop(r.x, r.right) for s in app.screen._compositor.render_strips()[r.y:r.bottom]]
            assert any("def f():" in s.text for s in drawn)
            code_colours = {seg.style.color for s in drawn for seg in s if seg.text.strip() and seg.style}
            assert len(code_colours) > 1
            # A link in a reply being written is shown, not opened.
            paragraph = reply.query("MarkdownParagraph").last()
            await pilot.click(paragraph, offset=(6, 0))
            await pilot.pause(0.1)
            assert not opened and app.is_running
            assert any("link (not opened): app.quit" in n.message for n in app._notifications)
            gate.set()
            await wait_until(pilot, lambda: finished(pane))
            await pilot.pause(0.2)
            md = reply.query_one(Markdown)
            assert md.source == "".join(pieces) and reply.query_one(MarkdownFence) is fence
            # Appended, never re-parsed whole: the only full update was the empty document it began as.
            assert [u for u in updates if u] == []

    asyncio.run(scenario())


# -- clicking a token ------------------------------------------------------------------------------


def test_clicking_a_token_shows_its_routing_and_keeps_the_prompt_focused(mixtral, monkeypatch):
    monkeypatch.setattr(Session, "generate", scripted(["alpha ", "beta ", "gamma ", "delta"]))

    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings())
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await pilot.press("f3")
            prompt = app.query_one(PromptInput)
            prompt.focus()
            await pilot.press("h", "i")
            app.send("route me")
            pane = app.pane
            await wait_until(pilot, lambda: finished(pane))
            await pilot.pause(0.2)
            body = pane.reply.query_one(".body")
            await pilot.click(body, offset=(7, 0))  # on "beta"
            await pilot.pause(0.1)
            assert app.focused is prompt
            panel = app.query_one(ExpertPanel)
            shown = panel.render_lines(panel.region.reset_offset)
            assert "'beta '" in "\n".join(s.text for s in shown)
            await pilot.press("!")
            assert prompt.text == "hi!"  # typing goes on where it was
            # Elsewhere on the message (its label) a click still picks the message to copy.
            await pilot.click(pane.reply.query_one(".role"), offset=(1, 0))
            await pilot.pause(0.05)
            assert app.focused is pane.reply

    asyncio.run(scenario())


# -- contrast --------------------------------------------------------------------------------------


def test_contrast_ratio_matches_wcag():
    assert colors.contrast_ratio("#000000", "#ffffff") == pytest.approx(21.0)
    assert colors.contrast_ratio("#ffffff", "#ffffff") == pytest.approx(1.0)
    assert colors.contrast_ratio("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)  # WCAG's near miss
    assert colors.contrast_ratio("#0000ff", "#ffffff") == pytest.approx(8.59, abs=0.01)
    assert colors.text_color("#000080") == colors.WHITE and colors.text_color("#ffff00") == colors.BLACK


@pytest.mark.parametrize("background", colors.EXPERT_COLORS)
def test_every_expert_colour_gets_text_with_aa_contrast(background):
    fg = colors.text_color(background)
    assert colors.contrast_ratio(background, fg) >= colors.AA_CONTRAST


def test_coloured_tokens_are_drawn_in_their_readable_text_colour():
    view = MessageView("assistant", "", 1, tokens=[(f"t{e} ", [[e, 0]], None) for e in range(16)])
    view.expert_layer = 0
    body = view._body()
    assert isinstance(body, Text) and len(body.spans) == 16
    for span in body.spans:
        bg, fg = span.style.bgcolor.name, span.style.color.name
        assert fg == colors.text_color(bg) and colors.contrast_ratio(bg, fg) >= colors.AA_CONTRAST


# -- the context cut -------------------------------------------------------------------------------


def question(i: int) -> str:
    return f"Question {i}: what did the captain say about the weather on the {i}th morning at sea?"


def test_the_cut_is_drawn_when_it_happens_and_when_the_conversation_is_reopened(make_release):
    folder = str(make_release(tiny_args(max_seq_len=128), seed=11, std=0.15))
    greedy = settings(temperature=0, max_tokens=8)

    def divider_of(pane) -> tuple[int, str]:
        """Where the divider is (the index of the message after it) and what it says."""
        log = pane.log_view.children
        dividers = [w for w in log if isinstance(w, ContextDivider)]
        assert len(dividers) == 1
        i = list(log).index(dividers[0])
        after = next(w for w in list(log)[i:] if isinstance(w, MessageView))
        return after.index, str(dividers[0].content)

    async def first():
        app = MixchatApp(model=folder, settings=greedy)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            pane = app.pane
            for i in range(40):
                app.send(question(i))
                views = 2 * (i + 1)
                await wait_until(pilot, lambda views=views: finished(pane) and len(pane.views()) == views)
                if pane.chat.context_start:
                    break
            await pilot.pause(0.2)
            chat = pane.chat
            assert chat.context_start > 0
            start, text = divider_of(pane)
            assert start == chat.context_start
            assert text == context_cut_text(chat.dropped_tokens(), 128)
            assert f"({chat.dropped_tokens()} tokens dropped to fit the 128-token context)" in text
            return pane.cid, chat.context_start, text

    cid, start, text = asyncio.run(first())

    async def reopened():
        app = MixchatApp(model=folder, settings=greedy)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await app.open_conversation(cid)
            await pilot.pause(0.3)
            pane = app.pane
            assert pane.cid == cid and pane.chat.context_start == start
            assert divider_of(pane) == (start, text)

    asyncio.run(reopened())


def test_the_expert_view_switched_while_a_reply_streams_applies_once_it_ends(mixtral, monkeypatch):
    pieces = ["one ", "two ", "`code` ", "three ", "four"]
    gate = threading.Event()
    monkeypatch.setattr(Session, "generate", scripted(pieces, gate, hold_before=3))

    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings())
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await pilot.press("f3")
            app.send("go")
            pane = app.pane
            await wait_until(pilot, lambda: pane.reply is not None and len(pane.reply.tokens) == 3)
            reply = pane.reply
            assert reply.query_one(".body") and not reply.query(Markdown)  # coloured tokens
            await pilot.press("f3")  # off, mid-reply: the stream goes on as it began
            gate.set()
            await wait_until(pilot, lambda: finished(pane))
            await pilot.pause(0.2)
            # Ended: now Markdown, holding the whole reply.
            assert not reply.query(".body") and reply.query_one(Markdown).source == "".join(pieces)
            assert reply.tokens == [(p, *routing(i)) for i, p in enumerate(pieces)]

    asyncio.run(scenario())


# -- the garbage collector -------------------------------------------------------------------------


def test_the_heap_is_frozen_only_while_a_reply_streams(mixtral, monkeypatch):
    # A full collection walks every object of the process holding the GIL, which the decoding
    # thread needs: while a reply streams, what existed before it is out of the collector's sight;
    # afterwards it is not (garbage made meanwhile is still collected).
    import gc

    gate = threading.Event()
    monkeypatch.setattr(Session, "generate", scripted(["a", "b", "c", "d"], gate, hold_before=2))

    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings())
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            assert gc.get_freeze_count() == 0
            app.send("hello")
            pane = app.pane
            await wait_until(pilot, lambda: pane.reply is not None and len(pane.reply.tokens) == 2)
            assert gc.get_freeze_count() > 10000 and gc.isenabled()
            gate.set()
            await wait_until(pilot, lambda: finished(pane))
            assert gc.get_freeze_count() == 0
            assert pane.reply.text == "abcd"

    try:
        asyncio.run(scenario())
    finally:
        gc.unfreeze()
