"""mixchat in a real terminal against hostile input: markup-like and escape-sequence text, filter
words that are also key commands, SIGTERM in the middle of a reply, a crash. tmux runs it;
capture-pane reads the screen, and the shell that ran it must still work afterwards."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_args

from mixchat.conversations.store import Store

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is installed by .ci/run")

MOE = {"num_experts": 4, "num_experts_per_tok": 2}


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

    def wait_for_count(self, text: str, count: int, timeout: float = 10) -> str:
        """Until `text` shows at least `count` times (the app draws its parts one after another)."""
        end = time.time() + timeout
        while (screen := self.screen()).count(text) < count and time.time() < end:
            time.sleep(0.2)
        assert screen.count(text) >= count, f"{text!r} not {count} times on:\n{screen}"
        return screen

    def display(self, fmt: str) -> str:
        return subprocess.run(["tmux", "display-message", "-p", "-t", self.name, fmt], capture_output=True,
                              text=True).stdout.strip()

    def app_pid(self) -> int:
        """The process the pane's shell is running (the app): the shell's one child."""
        shell = self.display("#{pane_pid}")
        children = Path(f"/proc/{shell}/task/{shell}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def run_then_shell(*args: str) -> list[str]:
    """`mixchat ARGS`, then its exit status on screen, then an interactive shell in the same
    terminal: what a user is left with after the app ends."""
    line = shlex.join([sys.executable, "-m", "mixchat", *args])
    return ["sh", "-c", shlex.quote(f"{line}; echo EXITED $?; exec sh")]


def environment(home: Path) -> dict:
    return {"MIXCHAT_HOME": str(home), "TERM": "xterm-256color", "PATH": os.environ["PATH"]}


def assert_shell_works(term: Terminal) -> None:
    """The app gave the terminal back: echo on, lines end with Enter, not in the alternate screen."""
    term.keys("-l", "echo ALIVE-$((40+2))")
    term.keys("Enter")
    term.wait_for("ALIVE-42", timeout=10)
    assert term.display("#{alternate_on}") == "0"


def conversations(home: Path, *titles: str) -> list[str]:
    store = Store(home / "conversations.sqlite3")
    ids = []
    for title in titles:
        conv = store.create("model", "fingerprint", title=title)
        store.add_message(conv.id, "user", title)
        ids.append(conv.id)
    store.close()
    return ids


def test_a_markup_title_and_escape_sequences_survive_a_restart(make_release, tmp_path):
    folder = make_release(tiny_args(moe=MOE), "torrent", seed=3, std=0.15)
    home = tmp_path / "home"
    loaded = f"{folder.name} · bfloat16 on cpu"
    command = run_then_shell("--model", str(folder), "--max-tokens", "8")
    name = f"mixchat-markup-{os.getpid()}"
    term = Terminal(name, command, environment(home))
    try:
        term.wait_for(loaded)
        term.keys("-l", "What does [/INST] mean?")  # the first message titles the conversation
        term.keys("Enter")
        term.wait_for("first token")  # the reply is done and the tab has its title
        term.wait_for_count("What does [/INST] mean?", 3)  # tab, sidebar row, message
        term.keys("C-q")
        term.wait_for("EXITED 0")
        term.close()

        # Titles that are escape sequences: drawn raw, they would retitle the window and clear
        # the screen.
        conversations(home, "\x1b]0;pwned\x07", "\x1b[2J wiped", "[@click=app.quit]quit[/]")
        (home / "app-state.json").unlink()  # not reopened as a tab: only the sidebar can open it (below)
        term = Terminal(name, command, environment(home))
        screen = term.wait_for(loaded)
        assert screen.count("What does [/INST] mean?") == 1 and "EXITED" not in screen  # started; in the sidebar
        assert "␛]0;pwned␇" in screen and "␛[2J wiped" in screen and "[@click=app.quit]quit[/]" in screen
        assert "pwned" not in term.display("#{pane_title}")
        term.keys("C-o", "Down", "Down", "Down", "Enter")  # the oldest: the one from the first run
        term.wait_for("assistant")  # the reopened conversation's messages
        term.wait_for_count("What does [/INST] mean?", 3)
        term.keys("C-q")
        term.wait_for("EXITED 0")
        assert_shell_works(term)
    finally:
        term.close()


def test_typing_filter_words_in_the_conversation_list_deletes_nothing(tmp_path):
    home = tmp_path / "home"
    ids = conversations(home, "lady of the lake", "today's plan", "other")
    term = Terminal(f"mixchat-filter-{os.getpid()}", run_then_shell("--model", str(tmp_path / "none")),
                    environment(home))
    try:
        term.wait_for("such folder")  # started: the model could not load, the rest works
        term.keys("C-o")
        term.keys("-l", "today")  # was: d(elete) + y(es) on the most recent conversation
        term.wait_for("▊  today ")  # in the filter box
        end = time.time() + 20  # the list filters after the box has drawn: wait for it, not a fixed time
        while "lady of the lake" in (screen := term.screen()) and time.time() < end:
            time.sleep(0.2)
        time.sleep(0.5)  # and a moment for a delete question that should not come
        screen = term.screen()
        assert "Delete “" not in screen  # not asked
        assert "today's plan" in screen and "lady of the lake" not in screen  # filtered
        term.keys("C-o")
        term.keys("-l", "lady")
        screen = term.wait_for("▊  todaylady ")
        assert "Delete “" not in screen
        term.keys("C-q")
        term.wait_for("EXITED 0")
        store = Store(home / "conversations.sqlite3")
        assert sorted(s.id for s in store.list()) == sorted(ids)
        store.close()
    finally:
        term.close()


@pytest.fixture(scope="module")
def sigterm_mid_reply(tmp_path_factory, v1_tokenizer):
    """One run: a long reply streams, SIGTERM arrives; what the store, the cache folder and the
    terminal hold afterwards."""
    from mixchat.dev.synthetic import write_release

    root = tmp_path_factory.mktemp("sigterm")
    folder = write_release(root / "release", tiny_args(moe=MOE), "torrent", seed=3, std=0.15,
                           tokenizer=v1_tokenizer)
    home = root / "home"
    term = Terminal(f"mixchat-sigterm-{os.getpid()}",
                    run_then_shell("--model", str(folder), "--max-tokens", "100000"), environment(home))
    try:
        term.wait_for(f"{folder.name} · bfloat16 on cpu")
        term.keys("-l", "Tell me everything")
        term.keys("Enter")
        term.wait_for("tok/s")  # streaming
        time.sleep(0.5)
        os.kill(term.app_pid(), signal.SIGTERM)
        screen = term.wait_for("EXITED", timeout=20)
        exit_line = next(line for line in screen.splitlines() if line.startswith("EXITED"))
        assert_shell_works(term)
    finally:
        term.close()
    return {"home": home, "exit_line": exit_line}


def test_sigterm_mid_reply_keeps_it_and_gives_the_terminal_back(sigterm_mid_reply):
    home = sigterm_mid_reply["home"]
    store = Store(home / "conversations.sqlite3")
    (summary,) = store.list()
    user, reply = store.messages(summary.id)
    store.close()
    assert user.content == "Tell me everything"
    assert reply.stop == "interrupted" and reply.content and reply.token_ids  # the partial reply, marked
    assert (home / "kv" / f"{summary.id}.safetensors").is_file()  # and its KV cache


def test_sigterm_exits_with_128_plus_the_signal(sigterm_mid_reply):
    assert sigterm_mid_reply["exit_line"] == f"EXITED {128 + signal.SIGTERM}"


def test_closing_the_terminal_mid_reply_keeps_it_and_ends_the_process(make_release, tmp_path):
    """The window is closed (SIGHUP, and the terminal is gone): the reply is kept and marked, and
    the process ends although it can no longer say goodbye to the terminal."""
    folder = make_release(tiny_args(moe=MOE), "torrent", seed=3, std=0.15)
    home = tmp_path / "home"
    term = Terminal(f"mixchat-hangup-{os.getpid()}", run_then_shell("--model", str(folder), "--max-tokens", "100000"),
                    environment(home))
    try:
        term.wait_for(f"{folder.name} · bfloat16 on cpu")
        term.keys("-l", "Tell me everything")
        term.keys("Enter")
        term.wait_for("tok/s")
        pid = term.app_pid()
    finally:
        term.close()  # the terminal hangs up
    end = time.time() + 20
    while Path(f"/proc/{pid}").exists() and time.time() < end:
        time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists(), "the app outlived its terminal"
    store = Store(home / "conversations.sqlite3")
    (summary,) = store.list()
    user, reply = store.messages(summary.id)
    store.close()
    assert reply.stop == "interrupted" and reply.content
    assert (home / "kv" / f"{summary.id}.safetensors").is_file()


def test_a_crash_mid_reply_exits_non_zero_and_gives_the_terminal_back(make_release, tmp_path):
    """An unexpected exception in the app, while a reply streams: the process ends (the worker
    stops instead of decoding on), with status 1, and the terminal works."""
    folder = make_release(tiny_args(moe=MOE), "torrent", seed=3, std=0.15)
    script = tmp_path / "crash.py"
    script.write_text(f"""
import sys
from mixchat.settings import Settings
from mixchat.frontends.tui.app import MixchatApp

class Crashing(MixchatApp):
    def on_tokens_streamed(self, msg):
        super().on_tokens_streamed(msg)
        if msg.batch.count >= 20:
            raise RuntimeError("a bug")

app = Crashing(model={str(folder)!r}, settings=Settings(max_tokens=100000), first_message="go on and on")
app.run()
sys.exit(app.return_code or 0)  # what the CLI is to do with it
""")
    line = shlex.join([sys.executable, str(script)])
    term = Terminal(f"mixchat-crash-{os.getpid()}", ["sh", "-c", shlex.quote(f"{line}; echo EXITED $?; exec sh")],
                    environment(tmp_path / "home"))
    try:
        screen = term.wait_for("EXITED", timeout=30)
        assert "EXITED 1" in screen and "a bug" in screen  # Textual prints the traceback after leaving
        assert_shell_works(term)
        store = Store(tmp_path / "home" / "conversations.sqlite3")
        (summary,) = store.list()
        assert store.messages(summary.id)[-1].stop == "interrupted"
        store.close()
    finally:
        term.close()
