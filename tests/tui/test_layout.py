"""Issue 17 in the app, at 80×24 and 160×45: the status bar keeps its gauge in view, the footer shows
the keys that matter, the input keeps its editing keys, every action is in the command palette,
tabs switch by key and come back at the next start, the first screen says where to type."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from conftest import tiny_args

from mixchat.conversations.store import Store
from mixchat.frontends.tui import state as app_state
from mixchat.frontends.tui.app import COMMANDS, MixchatApp
from mixchat.frontends.tui.panes import ChatPane
from mixchat.frontends.tui.status import fit, shortened, status_text
from mixchat.frontends.tui.widgets import PromptInput
from mixchat.settings import Settings
from tui.pilot import region_lines, send, wait_until

MOE = {"num_experts": 4, "num_experts_per_tok": 2}
SIZES = [(80, 24), (160, 45)]


def settings(**kw) -> Settings:
    base = dict(dtype="fp32", temperature=0.0, repeat_penalty=1.0, max_tokens=6, seed=1)
    base.update(kw)
    return Settings(**base)


def screen_text(app) -> str:
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


@pytest.fixture
def long_named(tmp_path):
    """A Mixtral-shaped release in a folder whose name alone is wider than an 80-column bar."""
    from mixchat.dev.synthetic import mistral_common_tokenizer, write_release

    name = "a-very-long-release-folder-name-" * 3 + "mixtral"
    return write_release(tmp_path / name, tiny_args(moe=MOE, n_layers=3), "torrent", seed=2, std=0.15,
                         tokenizer=mistral_common_tokenizer("v1"))


# -- 1. the status bar -----------------------------------------------------------------------------


def test_fit_drops_the_least_important_pieces_and_shortens_names():
    from rich.text import Text

    pieces = [(0, Text("context ██░░ 10/512")), (3, Text(" · KV 768 B/token")), (0, Text(" · cache re-used 5 tokens"))]
    assert fit(pieces, 200).plain == "context ██░░ 10/512 · KV 768 B/token · cache re-used 5 tokens"
    assert fit(pieces, 50).plain == "context ██░░ 10/512 · cache re-used 5 tokens"
    assert shortened("x" * 40, 12) == "x" * 11 + "…" and shortened("short", 12) == "short"
    assert len(shortened("x" * 40, 2)) == 8  # never shorter than MIN_NAME


@pytest.mark.parametrize("size", SIZES)
def test_the_gauge_and_cache_reuse_stay_in_view(long_named, tmp_path, size):
    async def scenario():
        app = MixchatApp(model=str(long_named), settings=settings(), store=Store(tmp_path / "s.sqlite3"),
                         demo_note="This is the demo model.")
        app._demo_folder = str(long_named)  # the status treats it as the demo: its note competes for room
        async with app.run_test(size=size) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await send(pilot, app, "first words")
            await send(pilot, app, "second words")
            pane = app.pane
            # The oldest turn is out of the model's view: the gauge says how much was dropped.
            pane.chat.context_start = 2
            app.update_status()
            await pilot.pause(0.1)
            lines = [line.strip() for line in region_lines(app, app.status_bar)]
            assert len(lines) == 2
            gauge = lines[1]
            used, limit = pane.chat.context_used(), pane.chat.session.context_limit
            assert re.search(rf"^context [█░]{{12}} {used}/{limit}", gauge), gauge
            assert f"dropped {pane.chat.dropped_tokens()}" in gauge and pane.chat.dropped_tokens() > 0
            assert f"cache re-used {pane.stats['cached']} tokens" in gauge
            assert "tok/s" in lines[0] and "float32 on cpu" in lines[0]
            if size[0] == 80:
                assert "…" in lines[0] and "demo" not in lines[0]  # the name is cut, the note left out
            else:
                # Room for every figure, and as much of the name as is left.
                assert lines[0].startswith(long_named.name[:60]) and "prefill" in lines[0]
                assert len(lines[0]) == 156 and "KV 768 B/token" in gauge
                assert "(of 32768" not in gauge  # the whole max_seq_len fits: no "(of N)"

    asyncio.run(scenario())


def test_status_keeps_kv_and_the_smaller_context_note(long_named, tmp_path):
    async def scenario():
        app = MixchatApp(model=str(long_named), settings=settings(context=512), store=Store(tmp_path / "s.sqlite3"))
        async with app.run_test(size=(160, 45)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            text = status_text(app.engine, app.pane, None, None, width=156).plain.split("\n")[1]
            assert text.startswith(f"context {'░' * 12} 0/512") and "KV 768 B/token (of 32768)" in text
            # Unfitted (width None), nothing is left out either.
            assert "when full: the oldest turns drop out" in status_text(app.engine, app.pane, None, None).plain

    asyncio.run(scenario())


# -- 2. the footer and the first screen ------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_first_screen_says_where_to_type_and_the_footer_shows_the_main_keys(long_named, tmp_path, size):
    async def scenario():
        app = MixchatApp(model=str(long_named), settings=settings(), store=Store(tmp_path / "s.sqlite3"),
                         demo_note="This is the demo model.")
        async with app.run_test(size=size, notifications=True) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await pilot.pause(0.2)
            screen = screen_text(app)
            footer = screen.split("\n")[-1]
            for key in ("Send", "Stop", "Help", "Settings", "Experts", "palette"):
                assert key in footer, footer
            assert "Regenerate" not in footer and "Quit" not in footer  # in the palette and the help
            assert "Type your message in the box below" in screen and "F1 help" in screen
            assert "demo model" in screen  # in the empty chat's hint ...
            assert not app._notifications  # ... not in a toast over the input
            assert app.prompt.placeholder
            # The hint goes once there is a message.
            await send(pilot, app, "hello")
            await pilot.pause(0.1)
            assert "Type your message in the box below" not in screen_text(app)

    asyncio.run(scenario())


# -- 3. keys -------------------------------------------------------------------------------------


def test_the_inputs_editing_keys_stay_the_inputs(long_named, tmp_path, monkeypatch):
    from mixchat.frontends.tui import clipboard

    copied = []
    monkeypatch.setattr(clipboard, "copy", lambda app, text: copied.append(text) or ["OSC 52"])

    async def scenario():
        app = MixchatApp(model=str(long_named), settings=settings(), store=Store(tmp_path / "s.sqlite3"))
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await send(pilot, app, "a message to edit")
            tabs = len(app.tabs.query(ChatPane))
            prompt = app.query_one(PromptInput)
            prompt.focus()
            await pilot.press(*"hello big world")
            await pilot.press("ctrl+w")  # delete a word, not close the tab
            assert prompt.text == "hello big " and len(app.tabs.query(ChatPane)) == tabs
            await pilot.press("ctrl+a", "ctrl+k")  # start of line, delete to its end: not copy code
            assert prompt.text == ""
            await pilot.press("ctrl+z")  # undo
            assert prompt.text == "hello big "
            await pilot.press("ctrl+y")  # redo, not copy the reply
            assert prompt.text == "" and not copied
            await pilot.press("ctrl+z", "ctrl+a", "ctrl+e")  # end of line, not "edit the last message"
            assert prompt.text == "hello big " and app.pane.editing is None
            assert prompt.cursor_location == (0, len("hello big "))
            await pilot.press("ctrl+left", "ctrl+left")  # word by word
            assert prompt.cursor_location == (0, 0)
            await pilot.press("f12")  # the app's "edit last message"
            assert prompt.text == "a message to edit" and app.pane.editing == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("size", SIZES)
def test_tabs_switch_by_key_and_come_back_at_the_next_start(long_named, tmp_path, size):
    store_path = tmp_path / "s.sqlite3"

    async def first_run() -> list[str]:
        app = MixchatApp(model=str(long_named), settings=settings(), store=Store(store_path))
        async with app.run_test(size=size) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            ids = []
            for i, word in enumerate(("one", "two", "three")):
                if i:
                    await pilot.press("ctrl+n")
                await send(pilot, app, word)
                ids.append(app.pane.cid)
            panes = list(app.tabs.query(ChatPane))
            assert app.pane is panes[2]
            await pilot.press("ctrl+pageup")
            assert app.pane is panes[1]
            await pilot.press("ctrl+pagedown", "ctrl+pagedown")
            assert app.pane is panes[0]  # wraps round
            await pilot.press("alt+3")
            assert app.pane is panes[2]
            await pilot.press("alt+9")  # no ninth tab: nothing happens
            assert app.pane is panes[2]
            await pilot.press("alt+2")
            await pilot.press("ctrl+n")  # an empty tab is not remembered (nothing to reopen)
            await pilot.press("ctrl+f4")  # and closing it works from the input
            assert len(app.tabs.query(ChatPane)) == 3 and app.pane is panes[2]
            await pilot.press("alt+2")
            await pilot.pause(0.3)
        saved = json.loads(app_state.state_path().read_text())
        assert saved["tabs"] == ids and saved["active"] == ids[1]
        return ids

    async def second_run(ids: list[str]) -> None:
        store = Store(store_path)
        store.delete(ids[0])  # deleted meanwhile (`mixchat rm`): skipped, quietly
        app = MixchatApp(model=str(long_named), settings=settings(), store=store)
        async with app.run_test(size=size, notifications=True) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            assert [p.cid for p in app.tabs.query(ChatPane)] == ids[1:]
            assert app.pane.cid == ids[1]
            assert [v.text for v in app.pane.views()][0] == "two"
            assert not app._notifications

    ids = asyncio.run(first_run())
    asyncio.run(second_run(ids))


def test_a_damaged_state_file_is_ignored(tmp_path):
    path = tmp_path / "state.json"
    for text in ("not json", "[1, 2]", '{"tabs": "x", "active": 3, "recent_models": [1, "/m", ""]}',
                 '{"tabs": ["../../etc", "abc123"], "active": "../../etc"}'):
        path.write_text(text)
        state = app_state.load(path)
        assert all(t.isalnum() for t in state.tabs) and state.active in (None, *state.tabs)
        assert all(isinstance(m, str) and m for m in state.recent_models)
    assert app_state.load(path).tabs == ["abc123"]
    state = app_state.AppState()
    for n in range(15):
        state.remember_model(f"/m{n}")
    state.remember_model("/m3")
    assert state.recent_models[0] == "/m3" and len(state.recent_models) == app_state.RECENT_MODELS
    app_state.save(state, path)
    assert app_state.load(path).recent_models == state.recent_models
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_every_action_is_in_the_palette_and_export_writes_a_file(long_named, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    async def scenario():
        app = MixchatApp(model=str(long_named), settings=settings(), store=Store(tmp_path / "s.sqlite3"))
        async with app.run_test(size=(80, 24), notifications=True) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            titles = {c.title for c in app.get_system_commands(app.screen)}
            for wanted in ("New chat", "Close tab", "Next tab", "Previous tab", "Rename this conversation",
                           "Delete this conversation", "Export this conversation as Markdown",
                           "Export this conversation as JSON", "Settings", "Expert view", "Switch model",
                           "Copy reply", "Copy code block"):
                assert wanted in titles
            for _, _, action in COMMANDS:  # each names an action the app has
                assert hasattr(app, "action_" + action.split("(")[0]), action
            await send(pilot, app, "export me")
            cid = app.pane.cid
            # Through the palette, as a user would: Ctrl+P, type, Enter.
            await pilot.press("ctrl+p")
            await pilot.pause(0.2)
            await pilot.press(*"Export this conversation as Markdown")
            await pilot.pause(0.5)
            await pilot.press("enter")
            await wait_until(pilot, lambda: list(tmp_path.glob("*.md")), timeout=10)
            (md,) = tmp_path.glob("*.md")
            assert md.name.startswith("export-me-") and "export me" in md.read_text()
            assert any(str(md.name) in n.message for n in app._notifications)
            app.action_export("json")
            (js,) = tmp_path.glob("*.json")
            assert json.loads(js.read_text())["id"] == cid
            app.action_export("markdown")  # never over an earlier export
            assert len(list(tmp_path.glob("*.md"))) == 2
            # A new chat has nothing to export yet, and says so.
            await pilot.press("ctrl+n")
            app.action_export("markdown")
            await pilot.pause(0.1)
            assert len(list(tmp_path.glob("*.md"))) == 2
            assert any("not saved yet" in n.message for n in app._notifications)

    asyncio.run(scenario())


def test_the_status_bar_shows_what_drafting_kept():
    from types import SimpleNamespace

    from mixchat.frontends.tui.status import _speed

    stats = {"decode_tps": 9.5, "ttft": 0.2, "prefill_tps": 100.0, "drafted": 40, "accepted": 31}
    pane = SimpleNamespace(busy=False, stats=stats, phase="done")
    text = "".join(t.plain for _, t in _speed(pane))
    assert "drafts 31/40 kept" in text and "9.50 tok/s" in text
    pane.stats = {**stats, "drafted": 0, "accepted": 0}
    assert "drafts" not in "".join(t.plain for _, t in _speed(pane))  # nothing drafted: nothing said


def test_settings_sheet_at_80x24_shows_a_refused_value_and_the_demos_memory(monkeypatch):
    """On the demo (empty model field) the sheet still says what each quant choice keeps in memory, and a
    value Ctrl+S refuses is said on screen, its field focused, however far down the form it is."""
    from mixchat import paths
    from mixchat.frontends.tui.screens import SettingsScreen

    demo = str(paths.demo_model())

    async def scenario():
        app = MixchatApp(model=demo, settings=settings(), demo_note="demo")
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await pilot.press("f2")
            sheet = app.screen
            assert isinstance(sheet, SettingsScreen) and sheet.value("model") == ""
            check = sheet.query_one("#model-check")
            await wait_until(pilot, lambda: "weights in memory" in str(check.content), timeout=20)
            assert "empty: the app keeps" in str(check.content) and "int4-128" in str(check.content)
            budget = sheet.query_one("#set-memory_budget_gb")
            budget.value = "lots"
            sheet.query_one("#set-model").focus()  # at the top of the form; the bad field is below the fold
            await pilot.press("ctrl+s")
            await pilot.pause(0.2)
            assert app.screen is sheet  # not saved
            error = sheet.query_one("#error")
            assert "memory budget gb: 'lots' is not a number" in screen_text(app), screen_text(app)
            assert 0 <= error.region.y < 24 and error.region.height >= 1
            assert sheet.focused is budget
            assert 0 <= budget.region.y < 24  # scrolled into view

    asyncio.run(scenario())


def test_a_tiny_terminal_gives_the_conversation_the_width(long_named, tmp_path):
    """At 40 columns the 32-column sidebar left 8 for the chat: it makes way below 64 and comes back when
    the terminal is wide again; Ctrl+B still shows it on demand."""
    async def scenario():
        app = MixchatApp(model=str(long_named), settings=settings(), store=Store(tmp_path / "s.sqlite3"))
        async with app.run_test(size=(40, 10)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await pilot.pause(0.1)
            assert app.sidebar.has_class("hidden") and app.prompt.region.width >= 36
            await pilot.resize_terminal(100, 30)
            await pilot.pause(0.2)
            assert not app.sidebar.has_class("hidden") and app.sidebar.region.width == 32
            await pilot.resize_terminal(40, 10)
            await pilot.pause(0.2)
            assert app.sidebar.has_class("hidden")
            await pilot.press("ctrl+b")
            await pilot.pause(0.1)
            assert not app.sidebar.has_class("hidden")  # asked for: shown
            await pilot.resize_terminal(41, 10)
            await pilot.pause(0.2)
            assert not app.sidebar.has_class("hidden")  # and a resize does not take it away again

    asyncio.run(scenario())


def test_settings_sheet_refuses_a_quant_the_model_cannot_take(make_release, tmp_path):
    """dim 64 (hidden 96 here): groups of 128 and 64 cannot divide it. The sheet says so at Ctrl+S, naming what
    fits, instead of saving a choice whose reload then fails."""
    model = make_release(tiny_args(), seed=5, std=0.15)

    async def scenario():
        app = MixchatApp(model=str(model), settings=settings(), store=Store(tmp_path / "s.sqlite3"))
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await pilot.press("f2")
            sheet = app.screen
            await wait_until(pilot, lambda: "weights in memory" in str(sheet.query_one("#model-check").content))
            sheet.query_one("#set-quant").value = "int4"
            await pilot.press("ctrl+s")
            await pilot.pause(0.2)
            assert app.screen is sheet and app.settings.quant == "none"
            shown = " ".join(screen_text(app).split())
            assert "quant int4: groups of 128 do not divide" in shown and "choose int4-32 or int8" in shown, shown
            sheet.query_one("#set-quant").value = "int4-32"
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: app.screen is not sheet)
            assert app.settings.quant == "int4-32"

    asyncio.run(scenario())
