"""What the app remembers between runs besides settings: the open tabs (conversation ids and the
active one) and the release folders loaded lately. One small JSON file in the per-user data folder,
written to a temporary name and renamed, so a crash mid-write leaves the old file whole.

The file is the app's own but still a file: anything in it that is not what is expected (not JSON,
wrong types, ids that are not ids) is ignored, never trusted."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mixchat import paths

RECENT_MODELS = 10
MAX_TABS = 50  # more would be a file someone else wrote; the app opens them one by one at start


@dataclass
class AppState:
    tabs: list[str] = field(default_factory=list)  # conversation ids of the open tabs, in order
    active: str | None = None
    recent_models: list[str] = field(default_factory=list)  # newest first

    def remember_model(self, folder: str) -> None:
        """Put `folder` first among the recent models (once), keeping RECENT_MODELS of them."""
        self.recent_models = [folder] + [f for f in self.recent_models if f != folder]
        del self.recent_models[RECENT_MODELS:]


def state_path() -> Path:
    return paths.data_dir() / "app-state.json"


def _ids(value: object) -> list[str]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, str) and v and len(v) <= 64 and v.isascii() and v.isalnum()][:MAX_TABS]


def load(path: Path | None = None) -> AppState:
    path = path or state_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable or not JSON: start as on a first run
        return AppState()
    if not isinstance(data, dict):
        return AppState()
    tabs = _ids(data.get("tabs"))
    active = data.get("active")
    recent = data.get("recent_models")
    models = [m for m in recent if isinstance(m, str) and m and "\0" not in m] if isinstance(recent, list) else []
    return AppState(tabs, active if active in tabs else None, models[:RECENT_MODELS])


def save(state: AppState, path: Path | None = None) -> None:
    """Write the state atomically. OSError (a full disk, a read-only folder) is the caller's to report."""
    path = path or state_path()
    paths.make_private_dir(path.parent)
    text = json.dumps({"tabs": state.tabs, "active": state.active, "recent_models": state.recent_models}, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=".app-state-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
