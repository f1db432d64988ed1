"""Where mixchat keeps its files. MIXCHAT_HOME (or --home) puts everything under one folder, which
tests use; otherwise platformdirs' per-user data and config folders."""

from __future__ import annotations

import os
from pathlib import Path


def env_flag(name: str, default: bool) -> bool:
    """An on/off switch from the environment: 0, off, false or no (any case) turn it off; any other
    value turns it on; unset gives `default`."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "off", "false", "no")


def env_choice(name: str, choices: tuple[str, ...]) -> str | None:
    """One of `choices` from the environment (any case, spaces trimmed); None when unset or any other value,
    which is ignored like an unset variable."""
    value = os.environ.get(name, "").strip().lower()
    return value if value in choices else None


def home_override() -> Path | None:
    value = os.environ.get("MIXCHAT_HOME")
    return Path(value).expanduser() if value else None


def data_dir() -> Path:
    if (home := home_override()) is not None:
        return home
    from platformdirs import user_data_dir

    return Path(user_data_dir("mixchat", appauthor=False))


def config_dir() -> Path:
    if (home := home_override()) is not None:
        return home / "config"
    from platformdirs import user_config_dir

    return Path(user_config_dir("mixchat", appauthor=False))


def make_private_dir(folder: Path) -> None:
    """Create `folder` and whichever of its parents are missing, each 0700: it holds conversations, their
    caches or quantized weights, and a parent made here may be the folder the store goes in later (a first
    `--quant --no-save` run makes $MIXCHAT_HOME as the parent of its cache). A folder that already exists
    keeps the mode its owner gave it. OSError (a file in the way, no permission) is the caller's to explain."""
    missing = []
    at = folder
    while not at.is_dir():
        missing.append(at)
        if at.parent == at:
            break
        at = at.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            if not d.is_dir():  # a file, not another process that just made the folder
                raise
            continue
        os.chmod(d, 0o700)  # mkdir's mode passes through the umask, which could take u+w away


def private_file(path: Path) -> Path:
    """`path`, created empty if missing, readable by its owner only (0600; 0600 again if an older mixchat made it
    0644), in a private folder: it holds what the user typed or their system prompt. OSError is the caller's."""
    make_private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            try:
                os.fchmod(fd, 0o600)
            except PermissionError:  # not ours to change (a shared home): written to as before
                pass
    finally:
        os.close(fd)
    return path


def store_path() -> Path:
    return data_dir() / "conversations.sqlite3"


def kv_dir() -> Path:
    """Saved KV caches, one file per conversation, beside the store."""
    return data_dir() / "kv"


def input_history_path() -> Path:
    """What the user typed at the prompt (line mode and TUI), for Up-arrow recall."""
    return data_dir() / "input-history"


def demo_model() -> Path | None:
    """The small demo Mixtral: inside the installed package (a wheel, `pip install .`, pipx), or in
    the checkout's assets/ (an editable install, where assets/ is its home)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "demo", here.parent / "assets" / "demo"):
        if (folder / "params.json").is_file():
            return folder
    return None


def same_folder(a: str, b: str) -> bool:
    """Whether two paths name one release folder (one may be relative, or through a link)."""
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return a == b
