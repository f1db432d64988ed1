"""Quitting: Ctrl+Q, SIGTERM and SIGHUP stop every reply and wait for it to be saved before the app
exits; after a signal, a watchdog ends the process if the app cannot leave the terminal."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

from textual.message_pump import MessagePump

from mixchat.frontends.tui.panes import ChatPane

# How long quitting (or deleting an open conversation) waits for a stopped reply to be saved. A
# reply stops within one token (or one prefill chunk), so this is only hit by a stuck worker.
STOP_WAIT_SECONDS = 5.0
# Ended by these, the app quits as on Ctrl+Q (replies stopped and saved) with exit status 128+signum.
QUIT_SIGNALS = ("SIGTERM", "SIGHUP")
# After a signal, how long past STOP_WAIT_SECONDS the app may take to leave before the process
# ends without it (a hung-up terminal makes Textual's goodbye to it block for ever).
EXIT_GRACE_SECONDS = 3.0


class QuittingMixin(MessagePump):
    """MixchatApp's way out. Mixed into the app, it uses the app's tabs and the state its __init__
    sets (_quitting, _signals, _watchdog, _finished); the app catches the signals on mount and
    releases them on unmount.

    MessagePump as the base, like the app's other mixins (see ConversationsMixin). The app lists its
    mixins before App, so action_quit and run here override App's."""

    async def action_quit(self) -> None:
        self.quit_gracefully(0)

    def quit_gracefully(self, code: int = 0) -> None:
        """Stop every reply, wait (at most STOP_WAIT_SECONDS) until the workers have saved them,
        marked interrupted, with their KV caches, then exit with `code` (it becomes
        `self.return_code`, which the CLI returns). Asked again meanwhile, it exits at once."""
        panes = list(self.tabs.query(ChatPane))
        for pane in panes:
            pane.cancel.set()
        writing = [p for p in panes if p.writing]
        if not writing or self._quitting:
            self.exit(return_code=code)
            return
        self._quitting = True
        self.notify("stopping the reply and saving it …")
        self.run_worker(self._exit_when_saved(writing, code), group="quit")

    async def _exit_when_saved(self, panes: list[ChatPane], code: int) -> None:
        await self._wait_for(panes, STOP_WAIT_SECONDS)
        self.exit(return_code=code)

    async def _wait_for(self, panes: list[ChatPane], timeout: float) -> bool:
        """Wait until the panes' workers have ended (their replies saved); False on timeout."""
        end = time.monotonic() + timeout
        while any(p.writing for p in panes):
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.05)
        return True

    def _catch_signals(self) -> None:
        """SIGTERM (kill, shutdown) and SIGHUP (the terminal closed) quit like Ctrl+Q; by default
        they would end the process mid-reply with the terminal left in raw mode."""
        try:
            loop = asyncio.get_running_loop()
            for name in QUIT_SIGNALS:
                signum = getattr(signal, name, None)
                if signum is not None:
                    loop.add_signal_handler(signum, self._on_signal, signum)
                    self._signals.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # no signal handlers on this loop (Windows) or thread (not the main one)

    def _release_signals(self) -> None:
        """Hand SIGTERM and SIGHUP back (the app calls this on unmount)."""
        loop = asyncio.get_running_loop()
        for signum in self._signals:
            loop.remove_signal_handler(signum)
        self._signals.clear()

    def _on_signal(self, signum: int) -> None:
        code = 128 + signum
        if self._watchdog is None and not self.is_headless:
            # SIGHUP: the terminal is gone, and restoring its modes on the way out then blocks for
            # ever on a write to it (Textual's writer thread died of EIO). The replies are saved
            # first, within STOP_WAIT_SECONDS; past the grace the process ends without the app.
            self._watchdog = threading.Timer(STOP_WAIT_SECONDS + EXIT_GRACE_SECONDS, self._end_process, (code,))
            self._watchdog.daemon = True
            self._watchdog.start()
        # Called by the event loop, outside any message handler: hand over to the app's queue.
        self.call_later(self.quit_gracefully, code)

    def _end_process(self, code: int) -> None:
        if not self._finished:
            os._exit(code)

    def run(self, **kwargs) -> object:
        """App.run; once it has returned, a signal's watchdog (see _on_signal) stands down."""
        try:
            return super().run(**kwargs)
        finally:
            self._finished = True
