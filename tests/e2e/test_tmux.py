"""mixchat in a real terminal: tmux runs it, send-keys types, capture-pane reads the screen."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import tiny_args

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is installed by .ci/run")


class Terminal:
    def __init__(self, name: str, command: list[str], env: dict) -> None:
        self.name = name
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        cmd = f"env {exports} " + " ".join(command)
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "110", "-y", "32", cmd], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True).stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def wait_for(self, text: str, timeout: float = 60) -> str:
        end = time.time() + timeout
        while time.time() < end:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared; the screen was:\n{self.screen()}")

    def alive(self) -> bool:
        return subprocess.run(["tmux", "has-session", "-t", self.name], capture_output=True).returncode == 0

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def test_chat_in_a_real_terminal_then_reopen(make_release, tmp_path):
    folder = make_release(tiny_args(moe={"num_experts": 4, "num_experts_per_tok": 2}), "torrent", seed=3, std=0.15)
    env = {"MIXCHAT_HOME": str(tmp_path / "home"), "TERM": "xterm-256color", "PATH": os.environ["PATH"]}
    command = [sys.executable, "-m", "mixchat", "--model", str(folder), "--max-tokens", "40"]
    name = f"mixchat-{os.getpid()}"
    term = Terminal(name, command, env)
    try:
        term.wait_for(f"{folder.name} · bfloat16 on cpu", timeout=180)  # the status bar once the model is loaded
        term.keys("-l", "Hello from tmux")
        term.keys("Enter")
        screen = term.wait_for("tok/s")
        assert "Hello from tmux" in screen
        term.keys("C-q")
        end = time.time() + 20
        while term.alive() and time.time() < end:
            time.sleep(0.2)
        assert not term.alive()

        # Not restored as an open tab (the app reopens last run's tabs): only the sidebar can open it.
        (tmp_path / "home" / "app-state.json").unlink()
        term = Terminal(name, command, env)
        term.wait_for(f"{folder.name} · bfloat16 on cpu")
        term.keys("C-o")
        screen = term.wait_for("Hello from tmux")  # the sidebar lists the saved conversation
        assert "assistant" not in screen and screen.count("Hello from tmux") == 1  # and only the sidebar
        term.keys("Enter")
        screen = term.wait_for("assistant")  # the reopened conversation's reply (on a busy machine, not at once)
        assert screen.count("Hello from tmux") >= 2  # in the sidebar and reopened in the chat
    finally:
        term.close()


def test_piped_notes_then_keep_chatting(make_release, tmp_path):
    folder = make_release(tiny_args(sliding_window=16), seed=4, std=0.15)
    notes = tmp_path / "notes.txt"
    notes.write_text("Meeting notes: ship the demo on Friday.\n")
    env = {"MIXCHAT_HOME": str(tmp_path / "home"), "TERM": "xterm-256color", "PATH": os.environ["PATH"]}
    command = ["cat", str(notes), "|", sys.executable, "-m", "mixchat", "-i", "--model", str(folder),
               "--max-tokens", "8"]
    term = Terminal(f"mixchat-i-{os.getpid()}", ["sh", "-c", "'" + " ".join(command) + "'"], env)
    try:
        term.wait_for("Meeting notes: ship the demo on Friday.")  # sent as the first message
        term.wait_for("first token")  # the reply is done (the status shows its final figures)
        term.keys("-l", "And after that?")
        assert term.screen().count("assistant") == 1
        term.keys("Enter")
        end = time.time() + 60  # sent and answered: a second reply (typed text alone shows in the input box)
        while (screen := term.screen()).count("assistant") < 2 and time.time() < end:
            time.sleep(0.2)
        assert screen.count("assistant") == 2 and "And after that?" in screen and "Meeting notes" in screen, screen
    finally:
        term.close()
