"""Faults that need a real process: signals mid-reply, files another user may not read, a killed
writer's temporary files. (The table of hostile inputs is tests/test_hostile.py.)"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import tiny_args

from mixchat import paths
from mixchat.conversations.store import Store

LONG = ["--dtype", "fp32", "--json", "--temperature", "1", "--seed", "3", "--max-tokens", "100000"]


@pytest.fixture
def model(make_release):
    return make_release(tiny_args(), seed=8, std=0.15)


def _started(args: list[str], tokens: int = 5) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-m", "mixchat", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = [json.loads(proc.stdout.readline())["token"] for _ in range(tokens)]
    return proc, seen


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_mid_reply_keeps_it_marked_and_saves_its_cache(model, sig):
    proc, seen = _started(["-m", str(model), *LONG, "-p", "talk to me"])
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err.decode()
    assert b"Traceback" not in err
    done = json.loads(out.decode().splitlines()[-1])
    assert done["stop"] == "interrupted"
    reply = Store(paths.store_path()).messages(done["conversation"])[-1]
    assert reply.stop == "interrupted" and reply.token_ids[: len(seen)] == seen
    assert len(reply.token_ids) == done["generated_tokens"]
    assert (paths.kv_dir() / f"{done['conversation']}.safetensors").is_file()


def test_a_closed_stdout_stops_the_reply_and_saves_it(model):
    """`mixchat ... | head -c 1`: the reader goes away; the reply stops, is kept, exit 0, no noise."""
    proc = subprocess.Popen([sys.executable, "-m", "mixchat", "-m", str(model), "--dtype", "fp32", "--temperature",
                             "1", "--max-tokens", "100000", "-p", "talk"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"Traceback" not in err and b"Exception ignored" not in err, err
    store = Store(paths.store_path())
    (conv,) = store.list()
    reply = store.messages(conv.id)[-1]
    assert reply.role == "assistant" and reply.stop == "interrupted" and reply.token_ids


def _as_nobody() -> list[str] | None:
    """A command prefix that runs as an unprivileged user: root ignores file permissions, and CI runs
    as root, so 'permission denied' can only be seen from another user."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--"] if setpriv else None


@pytest.fixture
def shared_release(make_release):
    """A release folder that an unprivileged user can reach (pytest's tmp_path is root-only)."""
    root = Path(tempfile.mkdtemp(prefix="mixchat-perm-"))
    root.chmod(0o755)
    folder = root / "release"
    shutil.copytree(make_release(tiny_args(), seed=9), folder)
    for p in [folder, *folder.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    home = root / "home"
    home.mkdir()
    home.chmod(0o777)  # mkdir applies the umask
    yield folder, home
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("target, words", [
    ("params.json", "params.json: permission denied"),
    ("consolidated.00.pth", "consolidated.00.pth: permission denied"),
    ("tokenizer.model", "tokenizer.model: permission denied"),
    (".", "permission denied; make the folder readable"),
])
@pytest.mark.parametrize("command", ["chat", "inspect"])
def test_unreadable_files_are_called_so(shared_release, target, words, command):
    prefix = _as_nobody()
    if prefix is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    folder, home = shared_release
    (folder / target).chmod(0o000 if target != "." else 0o311)
    args = ["-m", str(folder), "--dtype", "fp32", "-p", "hi"] if command == "chat" else ["inspect", str(folder)]
    env = {**os.environ, "MIXCHAT_HOME": str(home), "MIXCHAT_KERNEL_CACHE": str(home / "kernels"),
           "HOME": str(home)}
    proc = subprocess.run([*prefix, sys.executable, "-m", "mixchat", *args], capture_output=True, env=env, timeout=120)
    err = proc.stderr.decode()
    if command == "inspect" and target == "tokenizer.model":
        # inspect reports on what it can read; the verdict names the problem and the exit status is 1
        assert proc.returncode == 1 and words in proc.stdout.decode(), proc.stdout.decode() + err
        return
    assert proc.returncode == 2 and words in err and "Traceback" not in err, err
    assert "download" not in err  # not blamed on a damaged download


def test_line_mode_leaves_cleanly_on_sigterm_mid_reply(model):
    """Line mode: SIGTERM while the model writes stops the reply (kept, marked, cache saved) and
    leaves with 143; prompt_toolkit restores the terminal on the way out."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: mixchat's line mode on a real terminal
        os.execvpe(sys.executable, [sys.executable, "-m", "mixchat", "--plain", "-m", str(model), "--dtype", "fp32",
                                    "--temperature", "1", "--max-tokens", "100000"],
                   {**os.environ, "TERM": "xterm"})
    out = b""

    def read_until(marker: bytes, after: int = 0, timeout: float = 60) -> None:
        """Read the terminal until `marker` shows up past offset `after` (never blocking forever)."""
        nonlocal out
        deadline = time.time() + timeout
        while marker not in out[after:]:
            assert time.time() < deadline, out.decode(errors="replace")[-2000:]
            if select.select([fd], [], [], 0.2)[0]:
                chunk = os.read(fd, 4096)
                if b"\x1b[6n" in chunk:  # prompt_toolkit asks where the cursor is: answer as a terminal does
                    os.write(fd, b"\x1b[1;1R")
                out += chunk

    read_until(b">>>")
    os.write(fd, b"tell me a story\r")
    read_until(b"tell me a story")
    mark = len(out)
    read_until(b" ", after=mark + 200)  # a good part of the reply has streamed
    os.kill(pid, signal.SIGTERM)
    try:
        read_until(b"stop: interrupted", after=mark)
        while select.select([fd], [], [], 5)[0] and (chunk := os.read(fd, 4096)):
            out += chunk
    except OSError:  # EIO: the child closed the terminal
        pass
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 143, out.decode(errors="replace")[-2000:]
    assert b"Traceback" not in out and b"stop: interrupted" in out
    store = Store(paths.store_path())
    (conv,) = store.list()
    reply = store.messages(conv.id)[-1]
    assert reply.stop == "interrupted" and reply.token_ids
    assert (paths.kv_dir() / f"{conv.id}.safetensors").is_file()
