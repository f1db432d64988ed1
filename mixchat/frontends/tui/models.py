"""Which model the app runs: loading one in a worker thread (with its progress and notes), attaching it to
the open tabs, choosing another (the model picker, Ctrl+L), the question a conversation written with
another model asks, and the settings sheet (F2), whose model settings reload it.

Settings given as flags are for the run: `_write_settings` keeps settings.json's value for them unless the
sheet changed them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from textual import work

from mixchat import settings as settings_mod
from mixchat.errors import MixchatError
from mixchat.frontends.tui.messages import ModelFailed, ModelLoaded, ModelNote, ModelProgress
from mixchat.frontends.tui.modelpicker import ModelMismatchScreen, ModelPicker
from mixchat.frontends.tui.panes import ChatPane
from mixchat.frontends.tui.screens import SettingsScreen
from mixchat.paths import same_folder
from mixchat.progress import human_bytes
from mixchat.settings import Settings


class ModelsMixin:
    """MixchatApp's model loading and choosing (the App's state: engine, model_folder, model_error, settings,
    saved_keys, flag_keys, pool, tabs)."""

    @work(thread=True, exclusive=True, group="load")
    def load_model(self, folder: str) -> None:
        from mixchat.engine.engine import Engine, QuantDoesNotFit

        try:
            engine = Engine.load(folder, dtype=self.settings.dtype, threads=self.settings.threads or None,
                                 quant=self.settings.quant, show_progress=False,
                                 memory_budget=self.settings.memory_budget_gb * 1e9 or None,
                                 context=self.settings.context or None,
                                 on_progress=lambda label, d, t: self.post_message(ModelProgress(label, d, t)),
                                 on_note=lambda text: self.post_message(ModelNote(text)))
        except QuantDoesNotFit as exc:
            self.post_message(ModelFailed(self._quant_refused(exc)))
            return
        except MixchatError as exc:
            self.post_message(ModelFailed(str(exc)))
            return
        self.post_message(ModelLoaded(engine))

    def _quant_refused(self, exc) -> str:
        """A quantization the folder's shapes refuse: who chose it (a flag, or the settings: a choice that fit
        the model it was saved with), and the fix, which here is the sheet whoever chose it."""
        from mixchat.settings import settings_path

        quant = self.settings.quant
        chosen = (f"--quant {quant} was given on the command line" if "quant" in self.flag_keys else
                  f"the settings ({settings_path()}) chose quant {quant}")
        return f"{exc.problem}: {chosen}; choose {exc.best} in the settings (F2)"

    def on_model_progress(self, msg: ModelProgress) -> None:
        bar = self.load_bar
        bar.add_class("active")
        bar.update(total=msg.total, progress=msg.done)
        # the status bar says what the bar measures ("quantizing to int4-128 1.2 GB/7.2 GB")
        self.load_step = f"{msg.label} {human_bytes(msg.done)}/{human_bytes(msg.total)}"
        self.update_status()

    def on_model_note(self, msg: ModelNote) -> None:
        self.notify(msg.text, title="loading the model", severity="warning", timeout=15)

    async def on_model_loaded(self, msg: ModelLoaded) -> None:
        from mixchat import paths
        from mixchat.conversations import kvstore

        self.load_bar.remove_class("active")
        self.load_step = None
        self.engine, self.model_error = msg.engine, None
        self.state.remember_model(str(self.engine.release.folder))
        self._write_state()
        self.pool = kvstore.SessionPool(self.engine, paths.kv_dir(), int(self.settings.kv_memory_gb * 1e9))
        for pane in self.tabs.query(ChatPane):
            self.attach_chat(pane)
            pane.last_token = pane.last_token or self._last_token(pane)
        self.update_status()
        self.refresh_experts()
        if self.pane is not None:
            self.check_model(self.pane)
        if self.first_message:
            self._queued.insert(0, self.first_message)
            self.first_message = None
        self._send_queued()

    def _send_queued(self) -> None:
        """What was typed while the model loaded, once the active tab can take it (not while it asks which
        model a conversation goes on with: then after the answer)."""
        pane = self.pane
        if not self._queued or pane is None or pane.chat is None:
            return
        self.send(self._queued.pop(0))  # one at a time: the rest were typed while it loaded
        if self._queued:
            self.prompt.load_text("\n\n".join(self._queued))
            self._queued.clear()

    def on_model_failed(self, msg: ModelFailed) -> None:
        self.load_bar.remove_class("active")
        self.load_step = None
        self.model_error = msg.error
        self.notify(msg.error, title="the model could not be loaded", severity="error", timeout=15)
        self.update_status()

    def attach_chat(self, pane: ChatPane) -> None:
        from mixchat.conversations.chat import Chat

        conv = self.store.get(pane.cid) if pane.cid else None
        if conv is not None and pane.id not in self._model_asked and self._other_model(conv.model_path):
            # Written with another model: nothing is attached until the user has answered (check_model). Going on
            # with this one discards the conversation's KV cache, which switching to its model would re-use.
            pane.chat = None
            return
        pane.chat = Chat(self.engine, self.pool, self.store, conv, self.settings.system or None)
        for note in pane.chat.notes:
            self.notify(note, timeout=10)

    def _other_model(self, wanted: str) -> bool:
        """Whether a conversation written with `wanted` would go on with another model than the loaded one."""
        return bool(wanted) and self.engine is not None and not same_folder(wanted, str(self.engine.release.folder))

    def action_pick_model(self) -> None:
        current = str(self.engine.release.folder) if self.engine else self.model_folder
        self.push_screen(ModelPicker(self.state.recent_models, current), self._model_chosen)

    def _model_chosen(self, folder: str | None) -> None:
        if folder:
            self.switch_model(folder)

    def switch_model(self, folder: str, remember: bool = True) -> bool:
        """Load another release folder for every tab; `remember`: saved as the model the app starts with (the
        model picker), not when a conversation's own model is loaded for it (the other-model question)."""
        if any(p.busy for p in self.tabs.query(ChatPane)):
            self.notify("a reply is being written: stop it (Esc) before switching the model", severity="warning")
            return False
        if remember:
            self.settings.model = folder
            self.saved_keys.add("model")
            try:
                self._saved_note(self._write_settings(self.settings))
            except (MixchatError, OSError) as exc:
                self.notify(f"the model is loaded but not remembered: {exc}", severity="warning")
        self.model_folder, self.engine, self.model_error = folder, None, None
        self.load_step = None
        self._model_asked.clear()
        for p in self.tabs.query(ChatPane):
            p.chat = None
            p.stats = {}  # the last reply's speed was the old model's (no reply is being written: checked above)
        self.load_model(folder)
        self.update_status()
        return True

    def check_model(self, pane: ChatPane) -> None:
        """A conversation written with another model asks (once) before it goes on with this one."""
        if self.engine is None or not pane.cid or pane.id in self._model_asked or pane.busy:
            return
        try:
            wanted = self.store.get(pane.cid).model_path
        except MixchatError:
            return
        loaded = str(self.engine.release.folder)
        if not self._other_model(wanted):
            return
        self._model_asked.add(pane.id)

        def answered(choice: str | None) -> None:
            if choice == "switch":
                if not self.switch_model(wanted, remember=False):  # refused (a reply is being written): ask again
                    self._model_asked.discard(pane.id)
            elif choice == "close":
                if self._queued:  # typed while it loaded, for the tab now closing: back in the input, not lost
                    self.prompt.load_text("\n\n".join(self._queued))
                    self._queued.clear()
                self.run_worker(self._close_pane(pane), group="close")
            elif self.engine is not None and pane.chat is None and pane.is_attached:
                self.attach_chat(pane)  # continuing with the loaded model: its notes are said now
                self.update_status()
                self._send_queued()

        self.push_screen(ModelMismatchScreen(wanted, loaded, Path(wanted).is_dir()), answered)

    def _write_settings(self, new: Settings) -> str | None:
        """settings.json gets the values the user chose; a flag given now is for this run, so a key the file
        holds keeps the file's value (`--quant int4` for a run, then a new temperature, wrote int4)."""
        kept = self.flag_keys & self.saved_keys
        if kept:
            on_disk = settings_mod.read()[0]
            new = replace(new, **{k: getattr(on_disk, k) for k in kept})
        return settings_mod.save(new, self.saved_keys)

    def _saved_note(self, note: str | None) -> None:
        if note:  # an unreadable settings file was kept aside rather than overwritten
            self.notify(note, title="settings", severity="warning", timeout=20)

    def action_settings(self) -> None:
        self.push_screen(SettingsScreen(self.settings, self.model_folder), self._settings_saved)

    def _settings_saved(self, new: Settings | None) -> None:
        if new is None:
            return
        if new.context != self.settings.context and self.engine is not None:
            try:  # new conversations take it; the open ones keep the cache they have
                self.engine.set_context(new.context or None, "context")
            except MixchatError as exc:
                self.notify(str(exc), title="context not changed", severity="error", timeout=12)
                new.context = self.settings.context
        reload = ("model", "dtype", "threads", "quant", "memory_budget_gb")
        # An empty model field keeps the folder running now (the demo, or --model): a new dtype or quant reloads it,
        # emptying the field alone does not.
        folder = new.model or self.model_folder
        changed = bool(folder) and (any(getattr(new, k) != getattr(self.settings, k) for k in reload[1:])
                                    or not same_folder(folder, self.model_folder or ""))
        if changed and \
                getattr(self.engine, "pipeline", None) is not None and any(p.busy for p in self.tabs.query(ChatPane)):
            # Under torchrun the other ranks are in the middle of this reply: a new model now would put them out
            # of step. (One process keeps the old model for the reply being written.)
            for k in reload:
                setattr(new, k, getattr(self.settings, k))
            changed = False
            self.notify("a reply is being written across the ranks: stop it (Esc), then change the model settings",
                        severity="warning")
        chosen = {k for k in settings_mod.KEYS if getattr(new, k) != getattr(self.settings, k)}
        self.saved_keys |= chosen
        self.flag_keys -= chosen
        self.settings = new
        saved = True
        try:
            self._saved_note(self._write_settings(new))
        except MixchatError as exc:  # an unwritable folder: they apply until the app closes, and it says so
            saved = False
            self.notify(str(exc), title="settings not saved", severity="error", timeout=15)
        pane = self.pane
        if pane and pane.chat:
            pane.chat.system = new.system or None  # the open conversation takes the new system prompt
            if pane.chat.id:
                self.store.update_settings(pane.chat.id, pane.chat.system, vars(new.sampling()))
        if changed:
            if not same_folder(folder, self.model_folder or ""):
                self._model_asked.clear()  # another folder: each conversation's question is a new one
            self.model_folder, self.engine = folder, None
            for p in self.tabs.query(ChatPane):
                p.chat = None
                if not p.busy:
                    p.stats = {}  # the last reply's speed was the old model's
            self.load_model(folder)
        if self.pool:
            self.pool.memory_budget = int(new.kv_memory_gb * 1e9)
        self.refresh_experts()
        if saved:
            self.notify("settings saved")
