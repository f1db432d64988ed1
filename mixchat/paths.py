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


def store_path() -> Path:
    return data_dir() / "conversations.sqlite3"


def kv_dir() -> Path:
    """Saved KV caches, one file per conversation, beside the store."""
    return data_dir() / "kv"


def input_history_path() -> Path:
    """What the user typed at the prompt (line mode and TUI), for Up-arrow recall."""
    return data_dir() / "input-history"


def demo_model() -> Path | None:
    """The small demo Mixtral shipped in the repository's assets/ (present in a checkout or an
    editable install)."""
    folder = Path(__file__).resolve().parent.parent / "assets" / "demo"
    return folder if (folder / "params.json").is_file() else None
