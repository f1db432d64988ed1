"""Tabs and the footer in a real 80×24 terminal: tmux runs mixchat, send-keys types the keys a
terminal really sends (Ctrl+PgUp, Ctrl+PgDn, Ctrl+F4, Ctrl+W), capture-pane reads the screen."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import tiny_args

from e2e.test_tmux import Terminal

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is installed by .ci/run")


class SmallTerminal(Terminal):
    """An 80×24 terminal: the smallest the app is laid out for."""

    def __init__(self, name: str, command: list[str], env: dict) -> None:
        self.name = name
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "80", "-y", "24",
                        f"env {exports} " + " ".join(command)], check=True)


def shown_message(screen: str) -> set[str]:
    """The user messages in the chat area (a message's text follows its coloured left border)."""
    return {word for word in ("first tab", "second tab") if f"█ {word}" in screen or f"▌ {word}" in screen}


def wait_for_message(term: Terminal, word: str, timeout: float = 30) -> str:
    end = time.time() + timeout
    while time.time() < end:
        screen = term.screen()
        if shown_message(screen) == {word}:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{word!r} was not the message shown; the screen was:\n{term.screen()}")


def quit_app(term: Terminal) -> None:
    term.keys("C-q")
    end = time.time() + 20
    while term.alive() and time.time() < end:
        time.sleep(0.2)
    assert not term.alive()


def test_footer_tabs_by_key_and_restored_at_the_next_start(make_release, tmp_path):
    folder = make_release(tiny_args(moe={"num_experts": 4, "num_experts_per_tok": 2}), "torrent", seed=3, std=0.15)
    env = {"MIXCHAT_HOME": str(tmp_path / "home"), "TERM": "xterm-256color", "PATH": os.environ["PATH"]}
    command = [sys.executable, "-m", "mixchat", "--model", str(folder), "--max-tokens", "4"]
    name = f"mixchat-tabs-{os.getpid()}"
    term = SmallTerminal(name, command, env)
    try:
        screen = term.wait_for("bfloat16 on cpu")
        footer = screen.rstrip("\n").split("\n")[-1]
        for key in ("Send", "Stop", "Help", "Settings", "Experts"):
            assert key in footer, screen
        assert "Type your message" in screen  # where to type, on the first screen
        term.keys("-l", "first tab")
        term.keys("Enter")
        term.wait_for("first token")  # the reply is done: the status shows its final figures
        term.keys("C-n")
        term.keys("-l", "second tab")
        term.keys("Enter")
        wait_for_message(term, "second tab")
        term.wait_for("first token")
        term.keys("C-PPage")  # Ctrl+PgUp: the previous tab
        wait_for_message(term, "first tab")
        term.keys("C-NPage")
        wait_for_message(term, "second tab")
        # (No Alt+digit here: tmux sends it as ESC and the digit, which Textual reads as the
        # character a Mac's Option+digit types. The Pilot tests check Alt+1…9 as Textual names them.)
        term.keys("C-NPage")  # round to the first
        wait_for_message(term, "first tab")
        term.keys("C-n")  # a third, empty tab, closed again with Ctrl+F4
        term.wait_for("Type your message")
        term.keys("C-F4")
        wait_for_message(term, "second tab")  # its neighbour
        term.keys("C-PPage")
        wait_for_message(term, "first tab")
        # Ctrl+W in the input deletes a word; the tab stays open.
        term.keys("-l", "keep this word")
        term.wait_for("keep this word")
        term.keys("C-w")
        end = time.time() + 30  # "keep this" is on the screen before Ctrl+W is read too: wait for the word to go
        while "keep this word" in term.screen() and time.time() < end:
            time.sleep(0.2)
        assert "keep this word" not in term.screen() and "keep this" in term.screen()
        assert shown_message(term.screen()) == {"first tab"}
        quit_app(term)

        # The next start opens both tabs again, the first one active.
        term = SmallTerminal(name, command, env)
        term.wait_for("bfloat16 on cpu")
        screen = wait_for_message(term, "first tab")
        assert "second tab" in screen  # its tab label
        term.keys("C-PPage")  # round to the last
        wait_for_message(term, "second tab")
        quit_app(term)
    finally:
        term.close()
