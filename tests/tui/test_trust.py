"""The app and hostile text, keys and signals: markup-like and control-character strings shown
literally everywhere; letters in the conversation list only filter; deleting an open (even busy)
conversation; quitting, SIGTERM, SIGHUP and a crash in the middle of a reply."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import pytest
from conftest import tiny_args
from textual.widgets import Static

from mixchat import paths
from mixchat.conversations.store import Store, make_title
from mixchat.engine.generation import Done, Session, TokenEvent
from mixchat.frontends.tui.app import MixchatApp
from mixchat.frontends.tui.expertpanel import ExpertPanel
from mixchat.frontends.tui.modelpicker import ModelMismatchScreen
from mixchat.frontends.tui.screens import ConfirmScreen, HelpScreen, RenameScreen, SettingsScreen
from mixchat.frontends.tui.status import StatusBar
from mixchat.safetext import one_line, visible
from mixchat.settings import Settings
from tui.pilot import plain, wait_until

MOE = {"num_experts": 4, "num_experts_per_tok": 2}
SIZE = (160, 100)  # tall: everything checked is on screen at once

CORPUS = ["[/INST]", "[INST] hi [/INST]", "[@click=app.quit]quit[/]", "[b]bold", "[/]", "[red]x", "\\[x]",
          "[link=https://x]x[/link]", ":smile:", "\x1b[2J", "\x1b]0;pwned\x07", "\x1b]52;c;ZXZpbA==\x07", "a\rb"]
# Markdown (finished replies) has its own meaning for a backslash; none of the others means anything there.
MARKDOWN = {"\\[x]": "[x]"}
RAW_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def settings(**kw) -> Settings:
    base = dict(dtype="fp32", temperature=1.0, top_p=1.0, repeat_penalty=1.0, max_tokens=100000, seed=1)
    base.update(kw)
    return Settings(**base)


def drawn(app, widget=None) -> str:
    """What the terminal is sent for the screen (or for `widget`'s part of it), as lines of text;
    asserts on the way that not one raw control character is among it."""
    strips = app.screen._compositor.render_strips()
    for strip in strips:
        for segment in strip:
            assert not RAW_CONTROL.search(segment.text), f"raw control character drawn: {segment.text!r}"
    if widget is None:
        return "\n".join(s.text for s in strips)
    r = widget.region
    return "\n".join(s.crop(r.x, r.right).text for s in strips[r.y:r.bottom])


def notices(app) -> list[str]:
    return [n.message for n in app._notifications]


def scripted(pieces: list[str], delay: float = 0.0, fail: Exception | None = None):
    """A Session.generate that writes `pieces` as its tokens (routed to experts like a Mixtral's),
    honouring the cancel flag like the real one."""

    def generate(self, prompt, settings=None, cancel=None):
        if fail is not None:
            raise fail
        done = Done(prompt_tokens=list(prompt), cached_tokens=0, prefilled_tokens=len(prompt))
        for i, piece in enumerate(pieces):
            if cancel is not None and cancel.is_set():
                done.stop = "interrupted"
                break
            done.generated.append(100 + i)
            done.text += piece
            yield TokenEvent(100 + i, piece, [[i % 4, (i + 1) % 4]] * 3, [[0.6, 0.4]] * 3, 0.0)
            time.sleep(delay)
        yield done

    return generate


@pytest.fixture
def mixtral(make_release):
    return make_release(tiny_args(moe=MOE, n_layers=3), "torrent", seed=2, std=0.15)


def saved_conversations(*titles: str, model_path: str = "model") -> list[str]:
    """Conversations in the store before the app starts: title, one message each way (both the
    title again), made by "another model" so that opening one also shows a note."""
    store = Store(paths.store_path())
    ids = []
    for title in titles:
        conv = store.create(model_path, "another-fingerprint", title=title)
        store.add_message(conv.id, "user", title)
        mid = store.add_message(conv.id, "assistant", "")
        store.update_message(mid, title, [], stop="eos")
        ids.append(conv.id)
    store.close()
    return ids


# -- 1. text is never markup, control characters never raw ---------------------------------------


def test_markup_and_controls_in_messages_replies_tabs_sidebar_and_expert_view(mixtral, monkeypatch):
    pieces = [s + "\n\n" for s in CORPUS]
    monkeypatch.setattr(Session, "generate", scripted(pieces, delay=0.02))
    user_text = "\n".join(CORPUS)

    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings())
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await pilot.press("f3")  # the expert view: the reply's tokens are coloured by expert
            app.send(user_text)
            pane = app.pane
            await wait_until(pilot, lambda: pane.stats.get("count", 0) >= 3)
            drawn(app)  # streaming: no raw control character reaches the terminal
            await wait_until(pilot, lambda: not pane.busy)
            await pilot.pause(0.2)
            assert app.is_running
            user, reply = pane.views()
            shown_user, shown_reply = drawn(app, user), drawn(app, reply)
            for s in CORPUS:
                assert visible(s) in shown_user
                assert visible(s) in shown_reply  # expert-coloured body
            # The tab is titled by the first message, literally (this raised MarkupError).
            title = app.store.get(pane.cid).title
            assert title == make_title(user_text)
            tab = app.tabs.get_tab(pane.id)
            assert tab.label.plain == title[:24] and title[:24] in drawn(app, tab)
            # The sidebar row, literally.
            sidebar = drawn(app, app.conversations)
            assert "[/INST] [INST] hi [/INST]" in sidebar and "[@click=app.quit]quit[/]" in sidebar
            # The expert view quotes each token (repr), in Text: a str would be parsed as markup.
            panel = app.query_one(ExpertPanel)
            for i, piece in enumerate(pieces):
                app.action_select_token(1, i)
                await pilot.pause()
                assert f"pinned token: {piece!r}\n" in panel.content.plain
                if len(repr(piece)) < 16:  # else it is cut short on screen
                    assert repr(piece) in drawn(app, panel)
            # Expert view off: the finished reply is Markdown, still literal.
            await pilot.press("f3")
            await pilot.pause(0.2)
            shown_reply = drawn(app, pane.views()[1])
            for s in CORPUS:
                assert MARKDOWN.get(s, visible(s)) in shown_reply
            assert app.is_running
            # Saved as written: making it visible is for the screen only.
            saved = app.store.messages(pane.cid)
            assert saved[0].content == user_text and saved[1].content == "".join(pieces)

    asyncio.run(scenario())


def test_saved_titles_start_up_and_open_literally(mixtral):
    hostile_path = "/models/[/INST] \x1b]0;pwned\x07 [@click=app.quit]x[/]"
    ids = saved_conversations(*CORPUS, model_path=hostile_path)

    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings())
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            sidebar = drawn(app, app.conversations)
            for s in CORPUS:
                assert one_line(s) in sidebar
            for position in range(len(CORPUS)):
                app.conversations.focus()
                app.conversations.index = position
                await pilot.press("enter")
                # Written with another model: the app asks, quoting its folder literally.
                await wait_until(pilot, lambda: isinstance(app.screen, ModelMismatchScreen)
                                 and len(app.screen.query(Static)) > 0)
                drawn(app)
                assert "/models/[/INST] ␛]0;pwned␇ [@click=app.quit]x[/]" in plain(app.screen.query_one(Static))
                await pilot.press("escape")  # go on with the loaded model
                await pilot.pause(0.1)
            assert {p.cid for p in app.tabs.query("ChatPane")} >= set(ids)
            for pane in app.tabs.query("ChatPane"):
                if pane.cid not in ids:
                    continue
                s = CORPUS[ids.index(pane.cid)]
                assert app.tabs.get_tab(pane.id).label.plain == one_line(s)
                app.tabs.active = pane.id
                await pilot.pause(0.1)
                user, reply = pane.views()
                assert visible(s) in drawn(app, user)
                assert MARKDOWN.get(s, visible(s)) in drawn(app, reply)
                tab = app.tabs.get_tab(pane.id)  # the tab bar scrolls to it: wait for that
                await wait_until(pilot, lambda s=s, tab=tab: one_line(s) in drawn(app, tab), timeout=5)
            # Each opened conversation came with a note naming its model folder: literal too.
            assert any(visible(hostile_path) in n for n in notices(app))
            screen = drawn(app)  # in a toast, wrapped
            assert "(/models/[/INST] ␛]0;pwned␇" in screen and "[@click=app.quit]x[/]); continuing" in screen
            assert app.is_running

    asyncio.run(scenario())


def test_renames_confirmations_and_notices_are_literal(tmp_path):
    (cid,) = saved_conversations("first")

    async def scenario():
        app = MixchatApp(model=str(tmp_path / "missing"), settings=settings())
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            for s in CORPUS:
                await pilot.press("ctrl+o")
                await pilot.press("f6")
                assert isinstance(app.screen, RenameScreen)
                box = app.screen.query_one("#title")
                assert RAW_CONTROL.search(box.value) is None  # the old title, made visible
                box.value = s
                await pilot.press("enter")
                await pilot.pause(0.05)
                assert app.store.get(cid).title == make_title(s)
                assert one_line(make_title(s)) in drawn(app, app.conversations)
            # A rename shows in the open tab too.
            app.conversations.focus()
            app.conversations.index = 0
            await pilot.press("enter")
            await pilot.pause(0.1)
            await pilot.press("ctrl+o", "f6")
            app.screen.query_one("#title").value = "[/INST] \x1b[2J"
            await pilot.press("enter")
            await pilot.pause(0.05)
            assert app.tabs.get_tab(app.pane.id).label.plain == "[/INST] ␛[2J"
            # The delete question quotes the title.
            await pilot.press("ctrl+o", "delete")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.pause(0.05)
            assert "Delete “[/INST] ␛[2J”" in drawn(app)
            await pilot.press("escape")
            # Notices never parse markup nor pass control characters on.
            for s in CORPUS:
                app.notify(s, title=s)
            await pilot.pause(0.2)
            screen = drawn(app)
            for s in CORPUS:
                assert visible(s) in notices(app)
                assert one_line(s) in screen
            assert app.is_running

    asyncio.run(scenario())


def test_model_folder_and_errors_in_the_status_bar_and_settings(tmp_path, monkeypatch):
    from mixchat import settings as settings_mod

    folder = str(tmp_path / "[/INST] \x1b]0;pwned\x07 [@click=app.quit]x[/] [link=https://x]x[/link]")

    async def scenario():
        app = MixchatApp(model=folder, settings=settings(model=folder))
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await wait_until(pilot, lambda: app.model_error is not None)
            app.update_status()
            await pilot.pause(0.1)
            status = drawn(app, app.query_one(StatusBar))
            assert one_line(folder).split("/")[-1] in plain(app.query_one(StatusBar))
            assert "[/INST] ␛]0;pwned␇" in status
            assert any(visible(folder) in n for n in notices(app))
            # The settings sheet: the folder in its box and in the loader's verdict.
            await pilot.press("f2")
            assert isinstance(app.screen, SettingsScreen)
            await pilot.pause(0.1)
            sheet = app.screen
            assert sheet.query_one("#set-model").value == visible(folder)
            # The verdict comes from a worker thread, a moment after the sheet opens.
            await wait_until(pilot, lambda: "[/INST] ␛]0;pwned␇ [@click=app.quit]x[/]" in
                             plain(sheet.query_one("#model-check")), timeout=10)
            drawn(app)
            # An error quoting what was typed.
            sheet.query_one("#set-temperature").value = "[/INST] [@click=app.quit]x[/]"
            await pilot.press("ctrl+s")
            await pilot.pause(0.1)
            assert "'[/INST] [@click=app.quit]x[/]' is not a number" in plain(sheet.query_one("#error"))
            assert "'[/INST] [@click=app.quit]x[/]' is not a number" in drawn(app)
            # Saved untouched, the folder is kept as it was, not as shown.
            sheet.query_one("#set-temperature").value = "0.5"
            await pilot.press("ctrl+s")
            await pilot.pause(0.1)
            assert settings_mod.load().model == folder
            assert app.is_running

    asyncio.run(scenario())


def test_a_failing_reply_and_a_markdown_link_are_literal_and_open_nothing(mixtral, monkeypatch):
    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings())
        opened = []
        monkeypatch.setattr(app, "open_url", lambda url, **kw: opened.append(url))
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            monkeypatch.setattr(Session, "generate", scripted([], fail=RuntimeError("[/INST] \x1b[2J [b]x")))
            app.send("hi")
            await wait_until(pilot, lambda: not app.pane.writing)
            await pilot.pause(0.1)
            assert "RuntimeError: [/INST] ␛[2J [b]x" in notices(app)
            assert "RuntimeError: [/INST] ␛[2J [b]x" in drawn(app)
            # A reply's Markdown links: clicking shows where they point, runs and opens nothing.
            monkeypatch.setattr(Session, "generate", scripted(["See [the docs](app.quit) or ",
                                                               "[this](javascript:alert(1)) [x](@click=app.quit)"]))
            app.send("links?")
            pane = app.pane
            await wait_until(pilot, lambda: not pane.busy and not pane.reply.streaming)
            await pilot.pause(0.1)
            paragraph = pane.reply.query_one("MarkdownParagraph")
            await pilot.click(paragraph, offset=(6, 0))
            await pilot.pause(0.1)
            assert app.is_running and not opened
            assert "link (not opened): app.quit" in notices(app)

    asyncio.run(scenario())


# -- 2. the conversation list: letters filter, deleting needs an explicit confirmation ------------


def test_typing_in_the_conversation_list_only_filters(tmp_path):
    ids = saved_conversations("lady of the lake", "today's plan", "other")

    async def scenario():
        app = MixchatApp(model=str(tmp_path / "missing"), settings=settings())
        async with app.run_test(size=(120, 40), notifications=True) as pilot:
            for word, left in (("lady", 1), ("today", 1), ("la", 2), ("xyzzy", 0)):
                app.filter_box.value = ""
                await pilot.pause()
                await pilot.press("ctrl+o")
                assert app.focused is app.conversations
                await pilot.press(*word)
                await pilot.pause(0.1)
                assert not isinstance(app.screen, ConfirmScreen)
                assert app.focused is app.filter_box and app.filter_box.value == word
                assert len(app.conversations.children) == left
                assert sorted(s.id for s in app.store.list()) == sorted(ids)
            # Enter in the box opens the first match.
            app.filter_box.value = ""
            await pilot.pause()
            await pilot.press("ctrl+o", *"lake", "enter")
            await wait_until(pilot, lambda: app.pane is not None and app.pane.cid == ids[0])
            assert app.conversations.index == 0 and app.conversations.highlighted_child.cid == ids[0]
            # Hidden with Ctrl+B, the list comes back with Ctrl+O and takes the typing as well.
            await pilot.press("ctrl+b")
            assert app.sidebar.has_class("hidden")
            await pilot.press("ctrl+o", "t")
            assert app.focused is app.filter_box and app.filter_box.value == "laket"
            assert sorted(s.id for s in app.store.list()) == sorted(ids)

    asyncio.run(scenario())


def test_delete_asks_and_only_an_explicit_choice_confirms(tmp_path):
    ids = saved_conversations("one", "two", "three")

    async def scenario():
        app = MixchatApp(model=str(tmp_path / "missing"), settings=settings())
        async with app.run_test(size=(120, 40), notifications=True) as pilot:
            async def ask() -> None:
                await pilot.press("ctrl+o", "delete")
                await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen.focused)
                assert app.screen.focused.id == "no"  # the safe button

            await ask()
            await pilot.press("y", "Y", "d", "space")  # no letter answers it
            await pilot.pause(0.05)
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("enter")  # Enter on the default: cancel
            await pilot.pause(0.05)
            assert not isinstance(app.screen, ConfirmScreen)
            await ask()
            await pilot.press("escape")
            await pilot.pause(0.05)
            assert not isinstance(app.screen, ConfirmScreen) and len(app.store.list()) == 3
            # Tab to the delete button, then Enter: the highlighted (most recent) one goes.
            await ask()
            await pilot.press("tab", "enter")
            await wait_until(pilot, lambda: len(app.store.list()) == 2)
            assert ids[2] not in {s.id for s in app.store.list()}
            assert "conversation deleted" in notices(app)
            # Or click it.
            await ask()
            await pilot.click("#yes")
            await wait_until(pilot, lambda: len(app.store.list()) == 1)
            assert [s.id for s in app.store.list()] == [ids[0]]
            # F6 renames; the help says how all this works.
            await pilot.press("ctrl+o", "f6")
            assert isinstance(app.screen, RenameScreen)
            await pilot.press("escape", "f1")
            assert isinstance(app.screen, HelpScreen)
            await wait_until(pilot, lambda: "F6 renames" in drawn(app))
            help_text = drawn(app)
            assert "Delete deletes" in help_text and "Tab to Delete" in help_text

    asyncio.run(scenario())


# -- 3. deleting a conversation that is open ------------------------------------------------------


async def delete_open(pilot, app, cid: str) -> None:
    view = app.conversations
    await pilot.press("ctrl+o")
    view.index = [item.cid for item in view.children].index(cid)
    await pilot.press("delete")
    await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen.focused is not None)
    await pilot.press("tab", "enter")
    await wait_until(pilot, lambda: cid not in {s.id for s in app.store.list()})
    await pilot.pause(0.1)


@pytest.mark.parametrize("busy", [False, True])
def test_deleting_an_open_conversation_closes_its_tab(mixtral, busy):
    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings(max_tokens=100000 if busy else 3))
        async with app.run_test(size=(120, 40), notifications=True) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            app.send("remember me")
            pane = app.pane
            await wait_until(pilot, lambda: pane.chat.id is not None and pane.stats.get("count", 0) >= 2)
            if not busy:
                await wait_until(pilot, lambda: not pane.writing)
            assert pane.writing == busy
            cid = pane.chat.id
            kv = paths.kv_dir() / f"{cid}.safetensors"
            await delete_open(pilot, app, cid)
            assert not pane.writing and pane.cancel.is_set()  # a busy reply was stopped first
            assert not any(p.holds(cid) for p in app.tabs.query("ChatPane"))
            assert not kv.exists() and app.store.list() == []
            # The next message goes into a new conversation, saved as usual.
            app.send("a new start")
            await wait_until(pilot, lambda: app.pane.chat is not None and app.pane.chat.id is not None)
            app.pane.cancel.set()
            await wait_until(pilot, lambda: not app.pane.busy and app.pane.cid)
            assert notices(app) == ["conversation deleted"]  # no error of any kind
            assert [m.content for m in app.store.messages(app.pane.cid)][0] == "a new start"

    asyncio.run(scenario())


# -- 4. quitting, signals and crashes mid-reply -------------------------------------------------------


async def streaming(pilot, app):
    await wait_until(pilot, lambda: app.engine is not None)
    app.send("write a lot")
    pane = app.pane
    await wait_until(pilot, lambda: pane.chat.id is not None and pane.stats.get("count", 0) >= 5)
    return pane


def assert_saved_as_interrupted(cid: str) -> None:
    store = Store(paths.store_path())
    try:
        user, reply = store.messages(cid)
    finally:
        store.close()
    assert user.content == "write a lot"
    assert reply.stop == "interrupted" and reply.content and reply.token_ids
    assert (paths.kv_dir() / f"{cid}.safetensors").is_file()


def test_quit_mid_reply_stops_and_saves_it_first(mixtral):
    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings())
        async with app.run_test(size=(120, 40), notifications=True) as pilot:
            pane = await streaming(pilot, app)
            # Posted, not pilot.press: press waits for the app to go idle, and an app that exits
            # meanwhile (the reply saved quickly) may never do so.
            app.simulate_key("ctrl+q")
            await wait_until(pilot, lambda: app.return_code is not None)
            # Exiting came only after the worker had ended, i.e. saved.
            assert not pane.writing
        assert app.return_code == 0
        return pane.chat.id

    assert_saved_as_interrupted(asyncio.run(scenario()))


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_quit_like_ctrl_q(mixtral, name):
    signum = getattr(signal, name)

    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings())
        async with app.run_test(size=(120, 40), notifications=True) as pilot:
            pane = await streaming(pilot, app)
            # Without the app's handler this would end the test run.
            assert signum in app._signals
            os.kill(os.getpid(), signum)
            await wait_until(pilot, lambda: app.return_code is not None)
            assert not pane.writing
        assert app.return_code == 128 + signum
        assert signum not in app._signals and signal.getsignal(signum) is signal.SIG_DFL  # handed back
        return pane.chat.id

    assert_saved_as_interrupted(asyncio.run(scenario()))


def test_a_crash_mid_reply_exits_non_zero_and_still_stops_and_saves_the_reply(mixtral, monkeypatch):
    seen = []

    def crash(self, msg):
        seen.append(self._pane(msg.pane_id).chat.id)
        if msg.batch.count >= 5:
            raise RuntimeError("a bug in the app")

    monkeypatch.setattr(MixchatApp, "on_tokens_streamed", crash)

    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings())
        with pytest.raises(RuntimeError, match="a bug in the app"):
            async with app.run_test(size=(120, 40), notifications=True) as pilot:
                await wait_until(pilot, lambda: app.engine is not None)
                app.send("write a lot")
                await wait_until(pilot, lambda: app.return_code is not None)
        assert app.return_code == 1  # Textual's own, on any unhandled exception: the CLI returns it
        cid = seen[0]
        # The worker saw the app end and stopped: the reply is saved, marked interrupted.
        end = time.monotonic() + 20
        while time.monotonic() < end:
            store = Store(paths.store_path())
            msgs = store.messages(cid)
            store.close()
            if msgs[-1].stop is not None:
                break
            await asyncio.sleep(0.1)
        return cid

    assert_saved_as_interrupted(asyncio.run(scenario()))
