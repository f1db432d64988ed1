"""Issue 17 in the app, at 80×24 and 160×45: the expert view follows the reply unless a token is
pinned and writes every share as a number, collapsing at 80 columns; the sidebar shows dates,
models and short ids and searches inside conversations; the model picker, the per-conversation
model and the settings sheet, whose folder check runs off the UI thread."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time

import pytest
from conftest import tiny_args
from textual.widgets import Select

from mixchat.conversations.store import Store, short_id
from mixchat.frontends.tui import modelpicker
from mixchat.frontends.tui.app import MixchatApp
from mixchat.frontends.tui.expertpanel import share_cell
from mixchat.frontends.tui.modelpicker import DirectorySuggester, ModelMismatchScreen, ModelPicker, folder_verdict
from mixchat.frontends.tui.panes import ChatPane
from mixchat.frontends.tui.screens import SettingsScreen
from mixchat.settings import Settings
from tui.pilot import plain, region_lines, send, wait_until

MOE = {"num_experts": 4, "num_experts_per_tok": 2}
SIZES = [(80, 24), (160, 45)]


def settings(**kw) -> Settings:
    base = dict(dtype="fp32", temperature=1.0, top_p=1.0, repeat_penalty=1.0, max_tokens=8, seed=1)
    base.update(kw)
    return Settings(**base)


def asking(app) -> bool:
    """Whether the question about the conversation's model is up, buttons and all."""
    return isinstance(app.screen, ModelMismatchScreen) and len(app.screen.query("Button")) > 0


def shows(panel, text: str) -> bool:
    """Whether the panel holds `text`, wherever a narrow panel wrapped it."""
    return re.sub(r"\s+", "", text) in re.sub(r"\s+", "", plain(panel))


@pytest.fixture
def mixtral(make_release):
    return make_release(tiny_args(moe=MOE, n_layers=3), "torrent", seed=2, std=0.15)


# -- 4. the expert view ------------------------------------------------------------------------------


def test_every_share_is_a_number():
    assert share_cell(0.0, False).strip() == "0" and share_cell(0.0, True).strip() == "0"
    assert share_cell(1.0, True) == "100" and share_cell(0.456, False) == "█ 46"


@pytest.mark.parametrize("size", SIZES)
def test_expert_view_follows_the_reply_pins_a_token_and_fits_80_columns(mixtral, tmp_path, size):
    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings(), store=Store(tmp_path / "s.sqlite3"))
        async with app.run_test(size=size) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await pilot.press("f3")
            await send(pilot, app, "route me")
            pane, panel = app.pane, app.expert_panel
            text = plain(panel)
            assert shows(panel, f"newest token: {pane.reply.tokens[-1][0]!r}")
            # Every heat-map cell is a number, the zeros too: layer rows of 4 numbers.
            rows = [line for line in text.splitlines() if re.match(r"^\s*\d\s+\S", line)]
            heat = [r for r in rows if len(re.findall(r"\d+%?", r)) == 5]
            assert len(heat) == 3, text
            # The newest token's weights, per layer.
            assert len(re.findall(r"e\d=\d\.\d\d", text)) == 3 * 2
            # Pinned: a click (the token's action) holds it while the next reply streams.
            app.action_select_token(1, 0)
            pinned = pane.reply.tokens[0]
            assert shows(panel, f"pinned token: {pinned[0]!r}")
            await send(pilot, app, "and again")
            assert shows(panel, f"pinned token: {pinned[0]!r}")
            # Esc with nothing to stop lets go: the view follows the newest token again.
            await pilot.press("escape")
            assert shows(panel, f"newest token: {pane.reply.tokens[-1][0]!r}")
            app.action_select_token(1, 0)
            app.action_select_token(1, 0)  # a second click on it unpins too
            assert "newest token" in plain(panel)
            # Shift+F4 goes back a layer, F4 forward.
            await pilot.press("shift+f4")
            assert app.settings.expert_layer == 2
            await pilot.press("f4")
            assert app.settings.expert_layer == 0
            # At 80 columns: a compact panel, and the sidebar makes way so the chat stays readable.
            center = app.query_one("#center")
            if size[0] == 80:
                assert panel.has_class("narrow") and app.sidebar.has_class("hidden")
                assert panel.region.width <= 32 and center.region.width >= 44
                shown = "\n".join(region_lines(app, panel))
                cells = shown.split("e0 e1 e2 e3")[1].splitlines()[1:4]  # numbers only, no shades or %
                assert all(re.fullmatch(r"│ \d( +\d{1,3}){4} *", line) for line in cells), shown
                await pilot.press("f3")  # the panel closed, the sidebar is back
                assert not app.sidebar.has_class("hidden")
            else:
                assert not panel.has_class("narrow") and not app.sidebar.has_class("hidden")
                assert center.region.width >= 70

    asyncio.run(scenario())


# -- 5. the sidebar ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_sidebar_rows_and_search_inside_conversations(mixtral, tmp_path, size):
    long_title = "What would Elizabeth Bennet say about a long walk to Netherfield in the rain"

    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings(), store=Store(tmp_path / "s.sqlite3"))
        async with app.run_test(size=size) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            hours = {time.strftime("%H")}  # the row's hour, whichever side of an hour's turn the test runs
            await send(pilot, app, long_title)
            first = app.pane.cid
            await pilot.press("ctrl+n")
            await send(pilot, app, "Tell me about pemberley gardens")
            await send(pilot, app, "and the lake behind the house")
            second = app.pane.cid
            rows = {item.cid: plain(item.query_one("Static")) for item in app.conversations.children}
            title = app.store.get(first).title
            assert title in rows[first].replace("\n", "")  # whole, not cut at a fixed length
            hours.add(time.strftime("%H"))
            assert any(f"today {h}" in rows[first] for h in hours) and short_id(first) in rows[first]
            assert "2 turns" in rows[second] and mixtral.name in rows[second]
            # The short id is what `mixchat show` takes.
            assert app.store.get(short_id(second)).id == second
            # Search: "lake" is in the second conversation's messages, not its title.
            await pilot.press("ctrl+o", *"lake")
            await wait_until(pilot, lambda: len(app.conversations.children) == 1)
            row = plain(app.conversations.children[0].query_one("Static"))
            assert "you: and the lake behind the house" in row
            await pilot.press("ctrl+n")  # another tab is active; Enter opens (here: goes to) the match
            await pilot.press("ctrl+o", "enter")
            await wait_until(pilot, lambda: app.pane is not None and app.pane.cid == second)
            # A word in no conversation: nothing listed, and Enter opens nothing.
            app.filter_box.value = ""
            await pilot.press("ctrl+o", *"xyzzy", "enter")
            await pilot.pause(0.1)
            assert len(app.conversations.children) == 0 and app.pane.cid == second

    asyncio.run(scenario())


# -- 6. models and settings ----------------------------------------------------------------------


def test_folder_verdicts_and_directory_completion(mixtral, tmp_path):
    ok, line = folder_verdict(str(mixtral))
    assert ok and "Mixtral-style MoE (4 experts): 3 layers, dim 64" in line and "weights in memory" in line
    ok, line = folder_verdict(str(tmp_path / "nowhere"))
    assert not ok and "nowhere" in line
    (tmp_path / "models" / "mistral-7b").mkdir(parents=True)
    (tmp_path / "models" / "mixtral-8x7b").mkdir()
    (tmp_path / "models" / "mixtral.txt").write_text("not a folder")
    (tmp_path / "models" / ".hidden").mkdir()
    suggest = DirectorySuggester()

    async def ask(value):
        return await suggest.get_suggestion(value)

    base = str(tmp_path / "models")
    assert asyncio.run(ask(base + "/mix")) == base + "/mixtral-8x7b/"
    assert asyncio.run(ask(base + "/mis")) == base + "/mistral-7b/"
    assert asyncio.run(ask(base + "/m")) == base + "/mistral-7b/"
    assert asyncio.run(ask(base + "/")) == base + "/mistral-7b/"  # not the hidden one
    assert asyncio.run(ask(base + "/.h")) == base + "/.hidden/"
    assert asyncio.run(ask(base + "/zz")) is None and asyncio.run(ask("")) is None


@pytest.mark.parametrize("size", SIZES)
def test_model_picker_lists_recent_folders_and_loads_the_chosen_one(make_release, tmp_path, size, monkeypatch):
    a = make_release(tiny_args(moe=MOE, n_layers=3), "torrent", seed=2, std=0.15)
    b = make_release(tiny_args(n_layers=2), seed=3, std=0.15)

    async def scenario():
        app = MixchatApp(model=str(a), settings=settings(), store=Store(tmp_path / "s.sqlite3"))
        app.state.remember_model(str(tmp_path / "gone"))  # a folder since deleted: listed, with why
        async with app.run_test(size=size) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await pilot.press("ctrl+l")
            await wait_until(pilot, lambda: isinstance(app.screen, ModelPicker))
            picker = app.screen
            assert picker.recent == [str(a), str(tmp_path / "gone")]
            await wait_until(pilot, lambda: len(picker.verdicts) == 2)
            items = list(picker.query("ListItem"))
            first, second = (plain(item.query_one(".row")) for item in items)
            assert "(loaded now)" in first and "ok: Mixtral" in first
            assert "gone" in second and not picker.verdicts[str(tmp_path / "gone")][0]
            # Typing a path: checked a moment later, in a worker. A relative one is remembered absolute (saved,
            # it would name another folder when the app starts elsewhere).
            assert app.screen.focused.id == "picker-path"
            monkeypatch.chdir(b.parent)
            await pilot.press(*b.name)
            check = picker.query_one("#picker-path-check")
            await wait_until(pilot, lambda: "ok: Mistral-style dense model" in plain(check))
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.engine is not None and app.engine.release.folder == b)
            assert app.settings.model == str(b) and app.state.recent_models[:2] == [str(b), str(a)]
            assert app.pane.chat is not None and app.engine.args.moe is None

    asyncio.run(scenario())


@pytest.fixture
def two_models(make_release):
    """Two release folders: a (a Mixtral) and b (dense)."""
    return (make_release(tiny_args(moe=MOE, n_layers=3), "torrent", seed=2, std=0.15),
            make_release(tiny_args(n_layers=2), seed=3, std=0.15))


async def written_with(folder, store_path) -> str:
    """A conversation of one exchange written with `folder`, its tab left open; its id."""
    app = MixchatApp(model=str(folder), settings=settings(), store=Store(store_path))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.engine is not None)
        await send(pilot, app, f"written with {folder.name}")
        return app.pane.cid


@contextlib.asynccontextmanager
async def asking_about(a, b, store_path, size, in_background: bool = False):
    """A conversation written with `a`, then the app started on `b` until its question is up and focused; yields
    (app, pilot). `in_background`: as the terminal reports a window without the focus."""
    await written_with(a, store_path)
    app = MixchatApp(model=str(b), settings=settings(), store=Store(store_path))
    async with app.run_test(size=size) as pilot:
        app.app_focus = not in_background
        await wait_until(pilot, lambda: asking(app) and app.screen.focused is not None)
        yield app, pilot


def test_a_conversation_reopens_with_its_own_model(two_models, tmp_path):
    a, b = two_models
    store_path = tmp_path / "s.sqlite3"

    async def scenario():
        cid = await written_with(a, store_path)
        from mixchat import paths

        kv_file = paths.kv_dir() / f"{cid}.safetensors"
        assert kv_file.is_file()
        # Started on b, the restored tab (written with a) asks before going on.
        app = MixchatApp(model=str(b), settings=settings(), store=Store(store_path))
        async with app.run_test(size=(80, 24), notifications=True) as pilot:
            # its default answer takes the focus as it composes
            await wait_until(pilot, lambda: asking(app) and app.screen.focused is not None)
            assert app.pane.cid == cid
            # Nothing is decided while it asks: no "continuing it with b" toast, and a's KV cache is still there.
            assert not [n.message for n in app._notifications]
            assert app.pane.chat is None and kv_file.is_file()
            shown = plain(app.screen.query_one("Static"))
            assert f"Last written with: {a}" in shown and f"Loaded now:        {b}" in shown
            assert app.screen.focused.id == "switch"
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.engine is not None and app.engine.release.folder == a)
            assert app.pane.chat is not None and app.pane.chat.id == cid
            assert app.pane.chat.context_used() > 0  # its own model re-uses its KV cache: no history recomputed
            assert not isinstance(app.screen, ModelMismatchScreen)  # asked once
            from mixchat import settings as settings_mod

            assert settings_mod.load().model == ""  # loaded for this conversation, not made the app's default
            assert not [n.message for n in app._notifications if "another model" in n.message]
        # The folder is gone: it says which model the conversation needs; Esc goes on with this one.
        app = MixchatApp(model=str(b), settings=settings(), store=Store(store_path))
        a.rename(tmp_path / "moved")
        async with app.run_test(size=(160, 45), notifications=True) as pilot:
            await wait_until(pilot, lambda: asking(app))
            assert "not there any more" in plain(app.screen.query_one("Static"))
            assert not app.screen.query("#switch")
            await pilot.press("escape")
            await pilot.pause(0.1)
            assert app.pane.chat is not None and app.engine.release.folder == b
            # going on with b: now it says so (and that a's cache cannot serve b)
            notes = [n.message for n in app._notifications]
            assert any("held with another model" in n for n in notes), notes
            # b again in another quantization: the question was answered for b, and is not asked again
            first = app.engine
            await pilot.press("f2")
            app.screen.query_one("#set-quant").value = "int8"
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: app.engine is not None and app.engine is not first)
            await pilot.pause(0.2)
            assert not asking(app) and app.pane.chat is not None

    asyncio.run(scenario())


@pytest.mark.parametrize("size", SIZES)
def test_settings_sheet_has_choices_and_checks_the_folder_off_the_ui_thread(mixtral, tmp_path, size, monkeypatch):
    checks: list[tuple[str, bool]] = []
    real = modelpicker.folder_verdict

    def recording(folder, *more):
        checks.append((folder, threading.current_thread() is threading.main_thread()))
        return real(folder, *more)

    monkeypatch.setattr(modelpicker, "folder_verdict", recording)

    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings(model=str(mixtral)), store=Store(tmp_path / "s.sqlite3"))
        async with app.run_test(size=size) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await pilot.press("f2")
            await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
            sheet = app.screen
            assert sheet.focused.id == "set-model"
            await wait_until(pilot, lambda: "ok: Mixtral" in plain(sheet.query_one("#model-check")))
            for name, wanted in (("dtype", ["auto", "bf16", "fp16", "fp32"]), ("when_full", ["drop", "stop"]),
                                 ("quant", ["none", "int8", "int4", "int4-32", "int4-64", "int4-128"])):
                select = sheet.query_one(f"#set-{name}", Select)
                assert [v for _, v in select._options] == wanted
            threads = sheet.query_one("#set-threads", Select)
            assert [v for _, v in threads._options] == [str(i) for i in range((os.cpu_count() or 1) + 1)]
            assert "release folder" in plain(sheet.query_one(".help"))
            # Typing a path: one check after the typing stops, never on the UI thread.
            checks.clear()
            box = sheet.query_one("#set-model")
            box.value = ""
            # A pause between two keys longer than the check's delay (a GC pass, a busy machine) checks a
            # prefix: typing is given a second per key, so the count measures the debounce, not the machine.
            monkeypatch.setattr(modelpicker, "CHECK_DELAY", 1.0)
            await pilot.press(*str(tmp_path / "nope"))
            await wait_until(pilot, lambda: "nope" in plain(sheet.query_one("#model-check")), timeout=10)
            await pilot.pause(0.5)
            assert checks and len(checks) < 5 and not any(on_main for _, on_main in checks)
            monkeypatch.chdir(mixtral.parent)
            box.value = f"{mixtral.name}/../{mixtral.name}"  # relative: saved absolute and tidied
            sheet.query_one("#set-dtype", Select).value = "bf16"
            sheet.query_one("#set-when_full", Select).value = "stop"
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: not isinstance(app.screen, SettingsScreen))
            assert app.settings.dtype == "bf16" and app.settings.when_full == "stop"
            assert app.settings.model == str(mixtral)
            await wait_until(pilot, lambda: app.engine is not None)
            assert "bfloat16" in str(app.engine.dtype)
            assert isinstance(app.pane, ChatPane)

    asyncio.run(scenario())


def test_a_message_typed_while_loading_waits_for_the_other_model_question(two_models, tmp_path):
    """Typed (or piped) while the model loaded, for a restored tab written with another model: it is sent once
    the question is answered, not pushed back with "the model is still loading"."""
    a, b = two_models
    store_path = tmp_path / "s.sqlite3"

    async def scenario():
        cid = await written_with(a, store_path)
        app = MixchatApp(model=str(b), settings=settings(), store=Store(store_path))
        async with app.run_test(size=(80, 24), notifications=True) as pilot:
            app._queued.append("typed while it loaded")
            await wait_until(pilot, lambda: asking(app))
            await pilot.pause(0.2)
            assert app._queued == ["typed while it loaded"] and app.prompt.text == ""  # waiting, not rotated
            assert not [n.message for n in app._notifications if "still loading" in n.message]
            await pilot.press("escape")  # continue with b
            await wait_until(pilot, lambda: app.pane.chat is not None and not app.pane.busy
                             and len(Store(store_path).messages(cid)) == 4)
            assert Store(store_path).messages(cid)[2].content == "typed while it loaded" and not app._queued
            assert Store(store_path).get(cid).model_path == str(b.resolve())  # its latest turn is b's
        # Started on b again, the tab goes on without asking, re-using the cache b wrote.
        app = MixchatApp(model=str(b), settings=settings(), store=Store(store_path))
        async with app.run_test(size=(80, 24), notifications=True) as pilot:
            await wait_until(pilot, lambda: app.engine is not None and app.pane.chat is not None)
            await pilot.pause(0.2)
            assert not asking(app) and app.pane.cid == cid and app.pane.chat.context_used() > 0

    asyncio.run(scenario())


def app_from_command_line(monkeypatch, args: list[str], saved: dict):
    """The app as `mixchat ARGS` in a terminal builds it, with settings.json holding `saved` (not run)."""
    import json

    from mixchat.frontends import cli
    from mixchat.frontends.tui import app as app_mod
    from mixchat.settings import settings_path

    settings_path().parent.mkdir(parents=True, exist_ok=True)
    settings_path().write_text(json.dumps(saved))
    built = {}
    monkeypatch.setattr(app_mod.MixchatApp, "run", lambda self: built.setdefault("app", self))
    monkeypatch.setattr("mixchat.frontends.repl.wants_plain", lambda: False)
    assert cli._interactive(cli.parse_args(args), None) == 0
    return built["app"]


async def save_in_sheet(pilot, app, field: str, value: str) -> None:
    """F2, one field changed, Ctrl+S."""
    await pilot.press("f2")
    await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
    app.screen.query_one(f"#set-{field}").value = value
    await pilot.press("ctrl+s")
    await wait_until(pilot, lambda: not isinstance(app.screen, SettingsScreen))
    await pilot.pause(0.2)


@pytest.mark.parametrize("by_flag", [False, True])
def test_a_quant_the_folder_refuses_names_who_chose_it(make_release, tmp_path, monkeypatch, by_flag):
    """int4 (groups of 128) saved for a wider model, then a folder of dim 64 loaded: the app says who chose it
    (the settings file, or --quant on the command line) and that the sheet fixes it; it said
    "--quant, or quant in the settings" either way."""
    from mixchat.settings import settings_path

    model = make_release(tiny_args(), seed=5, std=0.15)  # dim 64: groups of 128 do not divide it
    flags = ["--quant", "int4"] if by_flag else []
    app = app_from_command_line(monkeypatch, ["-m", str(model), "--dtype", "fp32", *flags],
                                {"quant": "none"} if by_flag else {"quant": "int4"})
    assert app.settings.quant == "int4" and app.flag_keys == ({"quant", "dtype"} if by_flag else {"dtype"})
    app.store = Store(tmp_path / "s.sqlite3")

    async def scenario():
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: app.model_error is not None)
            err = app.model_error
            assert "groups of 128 do not divide" in err and "choose int4-32 in the settings (F2)" in err, err
            assert ("--quant int4 was given on the command line" in err) == by_flag, err
            assert (f"the settings ({settings_path()}) chose quant int4" in err) == (not by_flag), err
            await save_in_sheet(pilot, app, "quant", "int4-32")
            await wait_until(pilot, lambda: app.engine is not None)
            assert app.engine.quant.label == "int4-32" and "quant" not in app.flag_keys  # the sheet chose it now

    asyncio.run(scenario())


def test_the_question_focuses_its_answer_with_the_window_in_the_background(two_models, tmp_path):
    """Textual's AUTO_FOCUS does nothing while the terminal window has not the focus (a long load, the user in
    another window): the question still focuses its default answer, so Enter answers it."""
    a, b = two_models

    async def scenario():
        async with asking_about(a, b, tmp_path / "s.sqlite3", (80, 24), in_background=True) as (app, _):
            assert app.screen.focused.id == "switch"

    asyncio.run(scenario())


def test_flags_given_for_a_run_are_not_saved_as_the_users_choice(make_release, tmp_path, monkeypatch):
    """`mixchat --quant int4-32 --temperature 0.9` for one run, then a change in the sheet: settings.json keeps
    the quant and temperature it held (the app wrote the flags' values over them), and takes the change."""
    import json

    from mixchat.settings import settings_path

    model = make_release(tiny_args(), seed=5, std=0.15)
    args = ["-m", str(model), "--dtype", "fp32", "--quant", "int4-32", "--temperature", "0.9"]
    app = app_from_command_line(monkeypatch, args, {"quant": "int8", "temperature": 0.5, "max_tokens": 8})
    app.store = Store(tmp_path / "s.sqlite3")

    async def scenario():
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            assert app.engine.quant.label == "int4-32" and app.settings.temperature == 0.9
            await save_in_sheet(pilot, app, "max_tokens", "12")
            saved = json.loads(settings_path().read_text())
            assert saved == {"quant": "int8", "temperature": 0.5, "max_tokens": 12}, saved
            assert app.settings.temperature == 0.9 and app.engine.quant.label == "int4-32"  # this run keeps them
            # Chosen in the sheet, a flag's setting is the user's, and saved.
            await save_in_sheet(pilot, app, "temperature", "0.7")
            assert json.loads(settings_path().read_text())["temperature"] == 0.7

    asyncio.run(scenario())


def test_the_apps_keys_wait_while_the_question_is_up(two_models, tmp_path):
    """Ctrl+O (a priority key) moved the focus to the conversation list behind the question, and what was typed
    next filtered it; Ctrl+N opened a tab behind it. While it asks, those keys do nothing and Enter answers."""
    a, b = two_models

    async def scenario():
        async with asking_about(a, b, tmp_path / "s.sqlite3", (100, 30)) as (app, pilot):
            question, tabs = app.screen, len(app.tabs.query(ChatPane))
            await pilot.press("ctrl+o", *"Bath", "ctrl+n")
            await pilot.pause(0.2)
            assert app.screen is question and question.focused.id == "switch"
            assert len(app.tabs.query(ChatPane)) == tabs and "Bath" not in app.query_one("#filter").value
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.engine is not None and app.engine.release.folder == a)

    asyncio.run(scenario())


@pytest.mark.parametrize("size", [(40, 12), (80, 24), (100, 30)])
def test_every_answer_to_the_question_can_be_seen_when_focused(size):
    """Side by side at 40 columns the third answer was cut off unseen, and Tab, Tab, Enter closed the tab. Each
    answer, once focused, is whole on screen (stacked on a narrow terminal, scrolled to)."""
    from textual.app import App

    class Host(App):
        def on_mount(self) -> None:
            self.push_screen(ModelMismatchScreen("/models/mistral-7b-instruct-v0.3", "/models/demo", True))

    async def scenario():
        app = Host()
        async with app.run_test(size=size) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, ModelMismatchScreen))
            await pilot.pause(0.1)
            for answer in ("switch", "continue", "close"):
                assert app.screen.focused.id == answer
                await pilot.pause(0.1)
                r = app.screen.focused.region
                assert r.width > 0 and r.right <= size[0] and r.bottom <= size[1], (answer, r)
                label = str(app.screen.focused.label)
                assert label in "".join(region_lines(app, app.screen.focused)).replace("  ", " ") or \
                    all(word in "".join(region_lines(app, app.screen.focused)) for word in label.split()), label
                await pilot.press("tab")

    asyncio.run(scenario())
