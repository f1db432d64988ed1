"""How the main screen, the settings sheet and the expert view look (pytest-textual-snapshot).
Update with `pytest tests/tui/test_snapshots.py --snapshot-update` after a deliberate change."""

from __future__ import annotations

import time

import pytest
from conftest import tiny_args

from mixchat.conversations.store import Store
from mixchat.settings import Settings

MOE = {"num_experts": 4, "num_experts_per_tok": 2}
SIZE = (110, 32)


@pytest.fixture
def folder(tmp_path):
    """A fixed path, so the model name in the status bar is the same on every machine."""
    from mixchat.dev.synthetic import mistral_common_tokenizer, write_release

    return write_release(tmp_path / "tiny-mixtral", tiny_args(moe=MOE, n_layers=3), "torrent", seed=2, std=0.15,
                         tokenizer=mistral_common_tokenizer("v1"))


@pytest.fixture(autouse=True)
def _fixed_dates(monkeypatch):
    """The sidebar shows when each conversation changed: the same time on every run."""
    monkeypatch.setattr("mixchat.frontends.tui.sidebar.when", lambda ts: "today 12:00")


def make_app(folder, tmp_path, **kw):
    from mixchat.frontends.tui.app import MixchatApp

    settings = Settings(dtype="fp32", temperature=0, repeat_penalty=1.0, max_tokens=12, **kw)
    return MixchatApp(model=str(folder), settings=settings, store=Store(tmp_path / "store.sqlite3"))


async def loaded(pilot) -> None:
    app = pilot.app
    end = time.monotonic() + 60
    while app.engine is None and time.monotonic() < end:
        await pilot.pause(0.05)
    app.set_focus(None)  # no blinking cursor in the picture: it would depend on timing
    await pilot.pause(0.05)


async def answered(pilot) -> None:
    app = pilot.app
    await loaded(pilot)
    app.prompt.load_text("Tell me about rivers")
    await pilot.press("enter")
    end = time.monotonic() + 60
    while (app.pane.busy or app.pane.reply is None or app.pane.reply.streaming) and time.monotonic() < end:
        await pilot.pause(0.05)
    # Speeds differ from run to run; pin them so the picture is stable.
    app.pane.stats.update(decode_tps=12.5, prefill_tps=250.0, ttft=0.04, tps=12.5)
    app.update_status()
    app.set_focus(None)
    await pilot.pause(0.1)


def test_main_screen(snap_compare, folder, tmp_path):
    assert snap_compare(make_app(folder, tmp_path), terminal_size=SIZE, run_before=loaded)


def test_settings_sheet(snap_compare, folder, tmp_path, monkeypatch):
    # The model field is empty (no saved model): the sheet shows the running folder's verdict, by the relative
    # path it was given (tmp_path differs from run to run).
    monkeypatch.chdir(folder.parent)

    async def open_settings(pilot):
        await loaded(pilot)
        await pilot.press("f2")
        end = time.monotonic() + 30
        while time.monotonic() < end and "ok:" not in str(pilot.app.screen.query_one("#model-check").content):
            await pilot.pause(0.05)
        pilot.app.screen.set_focus(None)  # the first field has the focus: a blinking cursor depends on timing
        await pilot.pause(0.1)

    assert snap_compare(make_app("tiny-mixtral", tmp_path), terminal_size=SIZE, run_before=open_settings)


def test_expert_view(snap_compare, folder, tmp_path, monkeypatch):
    monkeypatch.setattr("mixchat.conversations.store.new_id", lambda: "19abcdef0123456789")  # shown in the sidebar
    async def experts(pilot):
        await pilot.press("f3")
        await answered(pilot)

    assert snap_compare(make_app(folder, tmp_path), terminal_size=(130, 36), run_before=experts)


def test_main_screen_at_80_columns(snap_compare, folder, tmp_path):
    assert snap_compare(make_app(folder, tmp_path), terminal_size=(80, 24), run_before=loaded)


def test_narrow_expert_view(snap_compare, folder, tmp_path, monkeypatch):
    monkeypatch.setattr("mixchat.conversations.store.new_id", lambda: "19abcdef0123456789")

    async def experts(pilot):
        await pilot.press("f3")
        await answered(pilot)

    assert snap_compare(make_app(folder, tmp_path), terminal_size=(80, 24), run_before=experts)


def test_model_picker(snap_compare, folder, tmp_path, monkeypatch):
    # Relative paths: the picker shows each folder's path, and tmp_path differs from run to run.
    monkeypatch.chdir(folder.parent)
    app = make_app("tiny-mixtral", tmp_path)
    app.state.remember_model("missing-release")
    app.state.remember_model("tiny-mixtral")

    async def pick(pilot):
        await loaded(pilot)
        await pilot.press("ctrl+l")
        end = time.monotonic() + 30
        while time.monotonic() < end and len(getattr(pilot.app.screen, "verdicts", {})) < 2:
            await pilot.pause(0.05)
        pilot.app.screen.set_focus(None)
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=SIZE, run_before=pick)


def test_settings_sheet_at_80_columns(snap_compare, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(folder.parent)

    async def open_settings(pilot):
        await loaded(pilot)
        await pilot.press("f2")
        end = time.monotonic() + 30
        while time.monotonic() < end and "ok:" not in str(pilot.app.screen.query_one("#model-check").content):
            await pilot.pause(0.05)
        pilot.app.screen.set_focus(None)
        await pilot.pause(0.1)

    assert snap_compare(make_app("tiny-mixtral", tmp_path, model="tiny-mixtral"), terminal_size=(80, 24),
                        run_before=open_settings)
