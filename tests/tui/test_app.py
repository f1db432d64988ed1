"""The Textual app driven by Pilot on small random checkpoints."""

from __future__ import annotations

import asyncio

import pytest
from conftest import tiny_args

from mixchat.frontends.tui.app import ChatPane, MixchatApp
from mixchat.frontends.tui.expertpanel import ExpertPanel
from mixchat.frontends.tui.status import StatusBar
from mixchat.frontends.tui.widgets import MessageView, PromptInput
from mixchat.settings import Settings
from tui.pilot import plain as _plain
from tui.pilot import wait_until

MOE = {"num_experts": 4, "num_experts_per_tok": 2}


def settings(**kw) -> Settings:
    base = dict(dtype="fp32", temperature=1.0, top_p=1.0, repeat_penalty=1.0, max_tokens=100000, seed=1)
    base.update(kw)
    return Settings(**base)


async def send(pilot, app, text: str) -> None:
    prompt = app.query_one(PromptInput)
    prompt.focus()
    prompt.load_text(text)
    await pilot.press("enter")


def plain(widget) -> str:
    return _plain(widget, width=200)


def status(app) -> str:
    return plain(app.query_one(StatusBar))


@pytest.fixture
def mixtral(make_release):
    return make_release(tiny_args(moe=MOE, n_layers=3), "torrent", seed=2, std=0.15)


def test_send_stream_stop_and_the_sidebar(mixtral):
    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings())
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await send(pilot, app, "Hello there")
            pane = app.pane
            await wait_until(pilot, lambda: pane.stats.get("count", 0) >= 20)
            app.update_status()
            assert "tok/s" in status(app)
            reply = pane.reply
            assert reply.text and reply.streaming
            await pilot.press("escape")
            await wait_until(pilot, lambda: not pane.busy)
            await pilot.pause()  # the reply settles (its label) in a callback queued as it finished
            assert reply.stop == "interrupted" and "stopped" in plain(reply.query_one(".role"))
            saved = app.store.messages(pane.cid)
            assert [m.role for m in saved] == ["user", "assistant"]
            assert saved[1].stop == "interrupted" and saved[1].content == reply.text
            items = app.query_one("#conversations").children
            assert len(items) == 1 and items[0].cid == pane.cid
            assert "Hello there" in plain(items[0].query_one("Static"))
            # the status keeps the final figures and the cache state
            assert "context" in status(app) and "cache re-used 0 tokens" in status(app)

    asyncio.run(scenario())


def test_second_turn_reuses_the_cache_and_regenerate_rewinds(mixtral):
    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings(max_tokens=6, temperature=0))
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await send(pilot, app, "first")
            pane = app.pane
            await wait_until(pilot, lambda: not pane.busy and pane.phase in ("eos", "length"))
            await send(pilot, app, "second")
            await wait_until(pilot, lambda: not pane.busy and len(pane.views()) == 4)
            assert pane.stats["cached"] > 0
            last = pane.views()[-1]
            before = last.text
            await pilot.press("ctrl+r")
            await wait_until(pilot, lambda: not pane.busy and len(pane.views()) == 4 and pane.stats.get("cached")
                             and pane.views()[-1] is not last)  # a new reply, not the one it replaces
            assert pane.views()[-1].text == before  # greedy: same reply, from the rewound cache
            assert [m.role for m in app.store.messages(pane.cid)] == ["user", "assistant"] * 2

    asyncio.run(scenario())


def test_expert_view_colours_tokens_and_shows_routing(mixtral):
    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings(max_tokens=8))
        async with app.run_test(size=(140, 40)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await pilot.press("f3")
            await send(pilot, app, "route me")
            pane = app.pane
            await wait_until(pilot, lambda: not pane.busy and pane.reply is not None and not pane.reply.streaming)
            panel = plain(app.query_one(ExpertPanel))
            assert "Expert view" in panel and "usage this conversation" in panel
            assert sum(sum(c.values()) for c in pane.usage) == 3 * 2 * len(pane.reply.tokens)
            app.action_select_token(1, 0)
            assert "pinned token" in plain(app.query_one(ExpertPanel))
            await pilot.press("f4")
            assert app.settings.expert_layer == 1

    asyncio.run(scenario())


def test_dense_model_says_the_expert_view_does_not_apply(make_release):
    folder = make_release(tiny_args(sliding_window=8))

    async def scenario():
        app = MixchatApp(model=str(folder), settings=settings(max_tokens=2))
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await pilot.press("f3")
            assert "dense model" in plain(app.query_one(ExpertPanel))

    asyncio.run(scenario())


def test_bad_model_folder_shows_the_error_and_the_app_stays_up(tmp_path):
    async def scenario():
        app = MixchatApp(model=str(tmp_path / "missing"), settings=settings())
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: app.model_error is not None)
            assert "no such folder" in status(app)
            await send(pilot, app, "anyone?")
            await pilot.pause(0.1)
            assert app.is_running and len(app.pane.views()) == 0
            await pilot.press("f1")
            assert app.screen.__class__.__name__ == "HelpScreen"

    asyncio.run(scenario())


def test_a_saved_model_folder_that_has_gone_names_the_settings(tmp_path):
    """settings.json names a folder that is not there (moved, or a relative path written by hand): the app says it
    came from the settings and where to choose another, as one-shot does (it said only "no such folder")."""
    from mixchat.settings import settings_path

    async def scenario():
        app = MixchatApp(settings=settings(model="models/gone"))
        async with app.run_test(size=(100, 24)) as pilot:
            await wait_until(pilot, lambda: app.model_error is not None)
            assert f"saved in the settings ({settings_path()}), models/gone" in app.model_error
            assert "Ctrl+L or F2" in app.model_error and app.is_running

    asyncio.run(scenario())


def test_settings_change_takes_effect_and_is_saved(mixtral):
    from mixchat import settings as settings_mod

    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings())
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await pilot.press("f2")
            screen = app.screen
            screen.query_one("#set-temperature").value = "0"
            screen.query_one("#set-max_tokens").value = "3"
            screen.query_one("#set-system").value = "Be terse."
            await pilot.press("ctrl+s")
            await pilot.pause(0.1)
            assert app.settings.temperature == 0 and app.settings.max_tokens == 3
            assert settings_mod.load().max_tokens == 3
            await send(pilot, app, "hi")
            pane = app.pane
            await wait_until(pilot, lambda: not pane.busy and len(pane.views()) == 2)
            assert len(pane.reply.tokens) <= 3
            assert pane.chat.system == "Be terse."

    asyncio.run(scenario())


def test_reopen_a_saved_conversation_from_the_sidebar(mixtral):
    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings(max_tokens=4))
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await send(pilot, app, "remember me")
            await wait_until(pilot, lambda: not app.pane.busy and app.pane.cid)
            cid = app.pane.cid
        # Not restored as an open tab (the app reopens last run's tabs): only the sidebar can open it.
        from mixchat.frontends.tui import state as state_mod

        state_mod.save(state_mod.AppState())
        app2 = MixchatApp(model=str(mixtral), settings=settings(max_tokens=4))
        async with app2.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app2.engine is not None)
            assert app2.pane.cid is None and not app2.pane.query(MessageView)
            view = app2.query_one("#conversations")
            view.focus()
            view.index = 0
            await pilot.press("enter")
            await wait_until(pilot, lambda: isinstance(app2.pane, ChatPane) and app2.pane.cid == cid)
            texts = [v.text for v in app2.pane.query(MessageView)]
            assert texts[0] == "remember me" and len(texts) == 2

    asyncio.run(scenario())


def test_the_demo_model_says_so_in_the_status_bar(mixtral):
    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings(), demo_note="This is the demo model.")
        async with app.run_test(size=(160, 30)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            app.update_status()
            assert "small demo model: F2 to use a real Mistral/Mixtral release folder" in status(app)

    asyncio.run(scenario())


def test_copy_a_chosen_message_or_its_code_block_never_crashes(mixtral, monkeypatch):
    from mixchat.frontends.tui import clipboard

    copied = []
    monkeypatch.setattr(clipboard, "copy", lambda app, text: copied.append(text) or ["OSC 52"])

    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings(max_tokens=3))
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await send(pilot, app, "Here is code:\n```python\nprint('hi')\n```\nexplain it")
            await wait_until(pilot, lambda: not app.pane.busy and len(app.pane.views()) == 2)
            await pilot.press("f8")  # nothing chosen: the last reply
            assert copied[-1] == app.pane.views()[1].text
            app.pane.views()[0].focus()
            await pilot.press("f8")
            assert copied[-1].startswith("Here is code:")
            await pilot.press("f9")
            assert copied[-1] == "print('hi')\n"
            monkeypatch.setattr(clipboard, "copy", lambda app, text: [])  # neither OSC 52 nor a tool
            await pilot.press("f8")
            assert app.is_running

    asyncio.run(scenario())


def test_edit_the_last_message_from_the_keyboard(mixtral):
    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings(max_tokens=3, temperature=0))
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await send(pilot, app, "first version")
            pane = app.pane
            await wait_until(pilot, lambda: not pane.busy and len(pane.views()) == 2)
            await pilot.press("f12")  # the input has focus: the binding must still reach the app
            assert app.prompt.text == "first version"
            app.prompt.load_text("second version")
            first = pane.reply
            await pilot.press("enter")
            await wait_until(pilot, lambda: not pane.busy and pane.reply is not None and pane.reply is not first
                             and not pane.reply.streaming)
            assert [v.text for v in pane.views()][0] == "second version" and len(pane.views()) == 2
            assert [m.content for m in app.store.messages(pane.cid) if m.role == "user"] == ["second version"]
            assert pane.stats["cached"] > 0  # BOS and "[INST]" came from the cache

    asyncio.run(scenario())


def test_loading_says_what_it_does_and_its_notes_reach_the_screen(mixtral):
    """A quantized cache that fails its checksum: the app's user sees why it is quantized again (a
    toast; stderr is not theirs while the app draws) and what each bar measures, not a bare %."""
    from mixchat.engine.engine import Engine
    from mixchat.frontends.tui.messages import ModelProgress
    from mixchat.speed import quant

    Engine.load(mixtral, dtype="fp32", quant="int8", show_progress=False)
    (path,) = quant.cache_dir().glob("*.safetensors")
    data = bytearray(path.read_bytes())
    data[-4096:-4096 + 64] = b"\x7f" * 64
    path.write_bytes(bytes(data))

    async def scenario():
        steps: list[tuple[str, int, int]] = []
        shown: list[str] = []

        class Watched(MixchatApp):
            def on_model_progress(self, msg: ModelProgress) -> None:
                super().on_model_progress(msg)
                steps.append((msg.label, msg.done, msg.total))
                shown.append(status(self))

        app = Watched(model=str(mixtral), settings=settings(quant="int8"))
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            notes = [n.message for n in app._notifications]
            assert any("does not match its checksum" in n and "quantizing again" in n for n in notes), notes
            labels = {label for label, *_ in steps}
            assert "quantizing to int8" in labels and "reading the int8 weights" in labels, labels
            assert all(0 <= done <= total for _, done, total in steps)
            for label in labels:  # each step ends at its total: the bytes it counts are the bytes it said
                last = [(done, total) for name, done, total in steps if name == label][-1]
                assert last[0] == last[1], (label, last)
            assert any("quantizing to int8" in s and "loading" in s for s in shown), shown
            assert "quantizing" not in status(app)  # loaded: the step is gone from the status bar

    asyncio.run(scenario())


def test_a_new_quant_with_the_model_field_empty_reloads_the_running_model(mixtral):
    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings(max_tokens=4))  # from --model: the field is empty
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await send(pilot, app, "hi")
            await wait_until(pilot, lambda: not app.pane.busy and app.pane.stats.get("decode_tps") is not None)
            first = app.engine
            await pilot.press("f2")
            sheet = app.screen
            assert sheet.value("model") == ""
            sheet.query_one("#set-quant").value = "int8"
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: app.engine is not None and app.engine is not first)
            assert app.engine.quant.label == "int8" and str(app.engine.release.folder) == str(mixtral)
            assert app.settings.model == "" and app.pane.stats.get("decode_tps") is None  # not the old model's
            app.update_status()
            assert "int8 on cpu" in status(app) and "tok/s" not in status(app)

    asyncio.run(scenario())


def test_emptying_the_model_field_keeps_the_running_model_loaded(mixtral):
    from mixchat import settings as settings_mod

    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings(model=str(mixtral), max_tokens=4))
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            first = app.engine
            await pilot.press("f2")
            sheet = app.screen
            sheet.query_one("#set-model").value = ""
            await pilot.press("ctrl+s")
            await pilot.pause(0.3)
            assert app.engine is first and app.pane.chat is not None  # "empty: the app keeps" it: no reload
            assert settings_mod.load().model == ""

    asyncio.run(scenario())


def test_continue_flag_opens_the_app_on_that_conversation(mixtral, tmp_path, monkeypatch):
    """`mixchat -c` (or --cid) in a terminal: the app opens with that conversation as the active tab (-c was
    ignored: the app showed its saved tabs)."""
    from mixchat import paths
    from mixchat.conversations.store import Store
    from mixchat.frontends import cli
    from mixchat.frontends.tui import app as app_mod

    store = Store(paths.store_path())
    older = store.create(str(mixtral), "fp", title="older")
    newer = store.create(str(mixtral), "fp", title="newer")
    opened = {}
    monkeypatch.setattr(app_mod.MixchatApp, "run", lambda self: opened.setdefault("cid", self.open_cid))
    monkeypatch.setattr("mixchat.frontends.repl.wants_plain", lambda: False)
    for args, want in ((["-c"], newer.id), (["--cid", older.id[-8:]], older.id), ([], None)):
        opened.clear()
        assert cli._interactive(cli.parse_args(["-m", str(mixtral), *args]), None) == 0
        assert opened["cid"] == want

    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings(max_tokens=3), store=Store(paths.store_path()),
                         open_cid=older.id)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            assert app.pane.cid == older.id and app.pane.chat is not None

    asyncio.run(scenario())


def test_saving_the_sheet_writes_only_what_the_user_chose(mixtral):
    """The app starts from a release's recommended sampling (the demo's repeat penalty); saving the sheet for
    another reason must not make those the user's choice for every folder."""
    import json

    from mixchat import settings as settings_mod

    async def scenario():
        recommended = settings(temperature=0.8, repeat_penalty=1.15, max_tokens=4)
        app = MixchatApp(model=str(mixtral), settings=recommended, saved_keys=frozenset())
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await pilot.press("f2")
            app.screen.query_one("#set-system").value = "Be brief."
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: settings_mod.settings_path().is_file())
            saved = json.loads(settings_mod.settings_path().read_text())
            assert saved == {"system": "Be brief."}
            await pilot.press("f2")
            app.screen.query_one("#set-temperature").value = "0.3"
            await pilot.press("ctrl+s")
            await pilot.pause(0.2)
            saved = json.loads(settings_mod.settings_path().read_text())
            assert saved == {"system": "Be brief.", "temperature": 0.3}
            assert app.settings.repeat_penalty == 1.15  # still in use, as the folder's recommendation

    asyncio.run(scenario())


def test_a_reopened_conversation_shows_its_latest_exchange(mixtral):
    from mixchat import paths
    from mixchat.conversations.store import Store

    store = Store(paths.store_path())
    conv = store.create(str(mixtral), "fp", title="long")
    for i in range(20):
        store.add_message(conv.id, "user", f"question {i}\n" * 3)
        store.add_message(conv.id, "assistant", f"answer {i}\n" * 3)

    async def scenario():
        app = MixchatApp(model=str(mixtral), settings=settings(max_tokens=3), store=Store(paths.store_path()),
                         open_cid=conv.id)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_until(pilot, lambda: app.engine is not None)
            await pilot.pause(0.3)
            log = app.pane.log_view
            assert log.max_scroll_y > 0 and log.scroll_y == log.max_scroll_y  # at the end, not the first exchange

    asyncio.run(scenario())


def test_continue_flag_opens_the_app_with_the_conversations_own_model(mixtral, make_release, monkeypatch):
    """`mixchat -c` in a terminal loads the model the conversation was last written with, as one-shot and line
    mode do (the app loaded the saved or demo model, then asked: a 7B's load for nothing); a model given as a flag
    wins, and a folder that has gone leaves the usual choice (the app then says so)."""
    from mixchat import paths
    from mixchat.conversations.store import Store
    from mixchat.frontends import cli
    from mixchat.frontends.tui import app as app_mod

    other = make_release(tiny_args(n_layers=2), seed=3, std=0.15)
    store = Store(paths.store_path())
    conv = store.create(str(other), "fp", title="written with the other")
    gone = store.create(str(other / "gone"), "fp", title="its folder has gone")
    built = {}
    monkeypatch.setattr(app_mod.MixchatApp, "run", lambda self: built.update(model=self.model_folder,
                                                                             cid=self.open_cid))
    monkeypatch.setattr("mixchat.frontends.repl.wants_plain", lambda: False)
    monkeypatch.delenv("MIXCHAT_MODEL", raising=False)
    for args, want in ((["--cid", conv.id], str(other)), (["--cid", conv.id, "-m", str(mixtral)], str(mixtral)),
                       (["--cid", gone.id], str(paths.demo_model()))):
        built.clear()
        assert cli._interactive(cli.parse_args(args), None) == 0
        assert built["model"] == want and built["cid"] == args[1], args
