"""Line mode (`mixchat --plain`, and wherever a full-screen TUI cannot run, e.g. TERM=dumb): a
prompt_toolkit REPL on the same engine, Chat and store as the one-shot command and the TUI.

Replies stream to `out` token by token. Ctrl+C while the model writes stops it after the current
token (the partial reply is kept and saved with stop "interrupted"); at the prompt it clears the
line, and a second one on an empty line (or Ctrl+D, or /bye) leaves. Slash commands follow
ollama's: /help lists them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from argparse import Namespace
from typing import TextIO

from mixchat.errors import MixchatError
from mixchat.progress import human_bytes
from mixchat.safetext import visible
from mixchat.signals import StopOnSignals, Terminated, TerminateOnSignals

PROMPT = ">>> "
CONTINUATION = "... "
SHOWN_ON_OPEN = 4  # messages printed when a conversation is reopened
SHOWN_CHARS = 1000  # ... each cut to this many characters

# /set KEY VALUE: the SamplingSettings fields a user may change, and how to read the value.
SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "repeat_penalty": float, "max_tokens": int,
            "seed": int, "draft": int}

HELP = f"""\
Type a message and press Enter to send it.
  Multi-line: end a line with a backslash \\ (or press Esc then Enter, i.e. Meta+Enter) to start
  another line; Enter on a line without a trailing backslash sends the whole message.
  Up/Down recall earlier input (kept across sessions). A message that starts with / is a command;
  start it with // to send a single / instead.
  Ctrl+C while the model writes stops it (the partial reply is kept); at the prompt it clears the
  line, and a second Ctrl+C on an empty line exits, as do Ctrl+D and /bye.
Commands:
  /help                 this text
  /new                  start a new conversation (keeps the settings and system prompt)
  /list                 saved conversations, newest first
  /open ID              reopen a saved conversation (id or a unique prefix of it)
  /set                  show the sampling settings
  /set KEY VALUE        change one: {", ".join(SETTABLE)} (seed none = random)
  /system [TEXT]        show or set the system prompt of this conversation
  /experts on|off       after each reply, how many of its tokens each expert got, layer by layer (MoE)
  /save                 say where this conversation is saved (it is saved as it goes)
  /bye                  leave (also /exit, /quit)"""


def wants_plain(stdin: TextIO | None = None, stdout: TextIO | None = None) -> bool:
    """True when a full-screen TUI cannot run here: a dumb or unset TERM, or stdin/stdout not a terminal."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if sys.platform != "win32" and os.environ.get("TERM", "") in ("", "dumb", "unknown"):
        return True
    return not (stdin.isatty() and stdout.isatty())


def format_experts(per_token: list[list[list[int]]], num_experts: int, per_tok: int) -> str:
    """Counts per layer per expert of the experts a reply's tokens were routed to."""
    n_layers = len(per_token[0])
    counts = [[0] * num_experts for _ in range(n_layers)]
    for token in per_token:
        for layer, chosen in enumerate(token):
            for e in chosen:
                counts[layer][e] += 1
    width = max(3, len(str(len(per_token))) + 1)
    lines = [f"experts: how many of the reply's {len(per_token)} tokens each expert got "
             f"(top-{per_tok} of {num_experts}), layer by layer",
             "layer " + "".join(f"{'e' + str(e):>{width}}" for e in range(num_experts))]
    for layer, row in enumerate(counts):
        lines.append(f"{layer:>5} " + "".join(f"{c:>{width}}" for c in row))
    return "\n".join(lines)


class _Stop(Exception):
    """/bye."""


class Repl:
    def __init__(self, ns: Namespace, engine, pool, store, conv, settings, out: TextIO, *,
                 when_full: str = "drop", system: str | None = None) -> None:
        """`system`: the saved system prompt a new conversation starts with (--system wins; a reopened
        conversation keeps its own). `when_full`: what a full context does (Chat.send)."""
        from mixchat.conversations.chat import Chat

        self.ns, self.engine, self.pool, self.store, self.settings, self.out = ns, engine, pool, store, settings, out
        self.when_full = when_full
        self.save = not ns.no_save
        self.show_experts = False
        self.session = None  # the PromptSession, set by run()
        self.armed = False  # the last key at the prompt was Ctrl+C on an empty line: another one leaves
        if ns.system is not None or conv is not None:
            system = ns.system  # None for a reopened conversation: it keeps its own
        self.chat = Chat(engine, pool, store, conv, system or None)
        self.styled = out.isatty() and os.environ.get("TERM", "") != "dumb"

    # -- output ----------------------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        self.out.write(visible(text) + "\n")  # titles, messages and file names are data: no escape acts
        self.out.flush()

    def dim(self, text: str) -> None:
        if self.styled:  # the only escape sequences written are mixchat's own
            self.out.write(f"\x1b[2m{visible(text)}\x1b[0m\n")
            self.out.flush()
        else:
            self.say(text)

    def error(self, message: str) -> None:
        self.say(f"error: {' '.join(str(message).split())}")

    def notes(self) -> None:
        for note in self.chat.notes:
            self.dim(note)
        self.chat.notes.clear()

    def banner(self) -> None:
        from mixchat import __version__

        e = self.engine
        kind = f"MoE, {e.args.moe.num_experts} experts" if e.args.is_moe else "dense"
        self.dim(f"mixchat {__version__}: {e.release.folder} ({kind}, {str(e.dtype).removeprefix('torch.')}, "
                 f"{e.device}); /help for commands, /bye or Ctrl+D to leave")
        self.dim(e.context_note or f"context {self.chat.session.context_limit} tokens, KV cache "
                 f"{human_bytes(e.kv_bytes_per_token)}/token")
        if not self.save:
            self.dim("--no-save: nothing from this session is written to the conversation store")
        self.notes()
        if self.chat.conversation is not None:
            self.show_recent()

    def show_recent(self) -> None:
        conv = self.chat.conversation
        messages = self.store.messages(conv.id)
        self.dim(f"conversation {conv.id}: {conv.title or '(untitled)'} ({len(messages)} messages"
                 + (f", system prompt: {conv.system}" if conv.system else "") + ")")
        if len(messages) > SHOWN_ON_OPEN:
            self.dim(f"... {len(messages) - SHOWN_ON_OPEN} earlier messages (`mixchat show {conv.id}` prints all)")
        for m in messages[-SHOWN_ON_OPEN:]:
            text = m.content if len(m.content) <= SHOWN_CHARS else m.content[:SHOWN_CHARS] + " …"
            if m.role == "user":
                self.say(PROMPT + text.replace("\n", "\n" + CONTINUATION))
            else:
                stop = {None: " [unfinished]", "interrupted": " [stopped]", "length": " [cut at the token limit]",
                        "context": " [cut: the context is full]"}
                self.say(text + stop.get(m.stop, ""))

    # -- turns -----------------------------------------------------------------------------------

    def send(self, text: str) -> None:
        from mixchat.engine.generation import Done, PrefillProgress, TokenEvent
        from mixchat.frontends.oneshot import format_stats

        done, experts, progress = None, [], False
        try:
            with StopOnSignals() as stop:
                for event in self.chat.send(text, self.settings, stop.event, save=self.save,
                                            when_full=self.when_full):
                    if isinstance(event, PrefillProgress):
                        if self.styled:
                            self.out.write(f"\rreading the prompt: {event.done}/{event.total} tokens")
                            self.out.flush()
                            progress = True
                    elif isinstance(event, TokenEvent):
                        if progress:
                            self.out.write("\r\x1b[K")
                            progress = False
                        self.out.write(visible(event.text))  # model text is data: no escape sequence acts
                        self.out.flush()
                        if event.id >= 0 and event.experts is not None:
                            experts.append(event.experts)
                    elif isinstance(event, Done):
                        done = event
        except MixchatError as exc:
            if progress:
                self.out.write("\n")
            self.error(exc)
            return
        if progress:
            self.out.write("\r\x1b[K")
        if done.text and not done.text.endswith("\n"):
            self.out.write("\n")
        self.out.flush()
        if self.show_experts and experts:
            moe = self.engine.args.moe
            self.dim(format_experts(experts, moe.num_experts, moe.num_experts_per_tok))
        for note in done.notes:
            self.dim(note)
        self.dim(format_stats(done))
        if stop.terminated:  # SIGTERM/SIGHUP: the reply is saved; now leave
            raise Terminated(stop.signum)

    # -- commands --------------------------------------------------------------------------------

    def command(self, line: str) -> None:
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        handler = {
            "/help": self.cmd_help, "/?": self.cmd_help, "/new": self.cmd_new, "/list": self.cmd_list,
            "/open": self.cmd_open, "/set": self.cmd_set, "/system": self.cmd_system,
            "/experts": self.cmd_experts, "/save": self.cmd_save, "/bye": self.cmd_bye, "/exit": self.cmd_bye,
            "/quit": self.cmd_bye,
        }.get(name.lower())
        if handler is None:
            self.error(f"unknown command {name}; /help lists them (start a message with // to send a /)")
            return
        handler(arg)

    def cmd_help(self, arg: str) -> None:
        self.say(HELP)

    def cmd_bye(self, arg: str) -> None:
        raise _Stop

    def cmd_new(self, arg: str) -> None:
        from mixchat.conversations.chat import Chat

        self.chat = Chat(self.engine, self.pool, self.store, None, self.chat.system)
        self.dim("new conversation" + (" (saved from its first message)" if self.save else " (not saved)"))

    def _open_store(self):
        """The store, opened on demand (with --no-save and no -c it is only read, and only if it exists)."""
        if self.store is None:
            from mixchat import paths
            from mixchat.conversations.store import Store

            self.store = Store(paths.store_path(), readonly=True)
        return self.store

    def cmd_list(self, arg: str) -> None:
        from mixchat.conversations.exporting import format_list

        store = self._open_store()
        self.say(format_list(store.list() if store else []))

    def cmd_open(self, arg: str) -> None:
        from mixchat.conversations.chat import Chat

        if not arg:
            self.error("/open needs a conversation id (or a unique prefix of one); /list shows them")
            return
        store = self._open_store()
        if store is None:
            self.error("no conversations yet")
            return
        conv = store.get(arg)
        self.chat = Chat(self.engine, self.pool, store, conv)
        self.notes()
        self.show_recent()

    def cmd_set(self, arg: str) -> None:
        if not arg:
            s = self.settings
            self.say(" ".join(f"{k}={getattr(s, k)}" for k in SETTABLE) + f" repeat_last_n={s.repeat_last_n}")
            return
        key, _, value = arg.partition(" ")
        key, value = key.lower().replace("-", "_"), value.strip()
        if key not in SETTABLE:
            self.error(f"/set {key}: unknown setting; use one of {', '.join(SETTABLE)}")
            return
        if not value:
            self.error(f"/set {key} needs a value, e.g. /set {key} {getattr(self.settings, key)}")
            return
        if key == "seed" and value.lower() in ("none", "off", "random"):
            parsed = None
        else:
            try:
                parsed = SETTABLE[key](value)
            except ValueError:
                kind = "a whole number" if SETTABLE[key] is int else "a number"
                self.error(f"/set {key} {value}: not {kind}")
                return
        candidate = dataclasses.replace(self.settings, **{key: parsed})
        try:
            candidate.check()
        except MixchatError as exc:
            reason = str(exc).split(": ", 1)[-1]
            self.error(f"/set {key} {value}: {reason}")
            return
        self.settings = candidate
        self._save_settings()
        self.dim(f"{key} = {parsed}")

    def _save_settings(self) -> None:
        conv = self.chat.conversation
        if conv is not None and self.save:
            conv.settings = dataclasses.asdict(self.settings)
            conv.system = self.chat.system
            self.store.update_settings(conv.id, conv.system, conv.settings)

    def cmd_system(self, arg: str) -> None:
        if not arg:
            self.say(f"system prompt: {self.chat.system}" if self.chat.system else "no system prompt")
            return
        self.chat.system = arg
        conv = self.chat.conversation
        if conv is not None and self.save:
            conv.system = arg
            self.store.update_settings(conv.id, arg, conv.settings)
        self.dim("system prompt set")

    def cmd_experts(self, arg: str) -> None:
        if arg.lower() not in ("on", "off", ""):
            self.error("/experts takes on or off")
            return
        if not self.engine.args.is_moe:
            self.say(f"{self.engine.release.folder} is a dense model (no mixture of experts): "
                     "the expert view does not apply")
            return
        if arg:
            self.show_experts = arg.lower() == "on"
        self.dim(f"expert summary after each reply: {'on' if self.show_experts else 'off'}")

    def cmd_save(self, arg: str) -> None:
        if not self.save:
            self.say("not saved: --no-save was given, so this session writes nothing to the conversation store")
        elif self.chat.id is None:
            self.say("nothing to save yet: the conversation is saved from its first message on")
        else:
            self.say(f"saved as {self.chat.id} (every message is saved as it is written); "
                     f"`mixchat --plain --cid {self.chat.id}` continues it")

    # -- the loop --------------------------------------------------------------------------------

    def loop(self, session, first: str | None = None) -> int:
        """Read and answer lines until /bye, Ctrl+D or two Ctrl+C; `first` (`cat notes | mixchat --plain -i`)
        is sent before the first prompt, shown as if typed."""
        with TerminateOnSignals():
            return self._loop(session, first)

    def _loop(self, session, first: str | None = None) -> int:
        while True:
            try:
                if first is not None:
                    line, first = first, None
                    self.say(PROMPT + line.rstrip("\n").replace("\n", "\n" + CONTINUATION))
                    line = "/" + line if line.startswith("/") else line  # "//…" is a message, never a command
                else:
                    line = session.prompt()
            except KeyboardInterrupt:  # Ctrl+C on an empty line
                if self.armed:
                    return 0
                self.armed = True
                self.dim("(Ctrl+C again, Ctrl+D or /bye to leave)")
                continue
            except EOFError:
                return 0
            self.armed = False
            try:
                if line.startswith("/") and not line.startswith("//"):
                    self.command(line)
                elif line.strip():
                    self.send(line[1:] if line.startswith("//") else line)
            except _Stop:
                return 0
            except MixchatError as exc:
                self.error(exc)
            except KeyboardInterrupt:  # Ctrl+C while a command ran (not while the model wrote)
                self.say("")


def _key_bindings(repl: Repl, dumb: bool):
    """Enter sends unless the line ends in a backslash; Meta+Enter adds a line; Ctrl+C clears a
    typed line or, on an empty one, leaves the prompt with KeyboardInterrupt. Eager, so they win over
    PromptSession's own bindings, which come last (and so would win) in its dumb-terminal prompt.
    On a dumb terminal (where nothing on screen can be erased) the changes are echoed as text."""
    from prompt_toolkit.document import Document
    from prompt_toolkit.enums import DEFAULT_BUFFER
    from prompt_toolkit.filters import has_focus
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()
    typing = has_focus(DEFAULT_BUFFER)

    def echo(text: str) -> None:
        if dumb:
            repl.session.output.write(text)
            repl.session.output.flush()

    def newline(buf, text: str) -> None:
        buf.document = Document(text + "\n", len(text) + 1)  # one change: the dumb prompt echoes "\n"
        echo(CONTINUATION)

    @kb.add("enter", filter=typing, eager=True)
    def _enter(event) -> None:
        buf = event.current_buffer
        if buf.document.is_cursor_at_the_end and buf.text.endswith("\\"):
            newline(buf, buf.text[:-1])
        else:
            buf.validate_and_handle()

    @kb.add("escape", "enter", filter=typing, eager=True)
    def _newline(event) -> None:
        buf = event.current_buffer
        if buf.document.is_cursor_at_the_end:
            newline(buf, buf.text)
        else:
            buf.insert_text("\n")

    @kb.add("c-c", filter=typing, eager=True)
    def _interrupt(event) -> None:
        buf = event.current_buffer
        if buf.text:
            buf.reset()
            repl.armed = False
            echo("^C\r\n" + PROMPT)
        else:
            event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

    return kb


def _history(no_save: bool):
    from prompt_toolkit.history import FileHistory

    from mixchat import paths

    path = paths.input_history_path()
    if not no_save:
        paths.private_file(path)  # every prompt typed: the owner's only (--no-save only reads it, if it is there)

    class ReadOnlyHistory(FileHistory):
        """--no-save: earlier input can be recalled, but nothing typed now is written."""

        def store_string(self, string: str) -> None:
            pass

    return (ReadOnlyHistory if no_save else FileHistory)(str(path))


def run(ns: Namespace, input=None, output=None, *, out: TextIO | None = None, first: str | None = None) -> int:
    """The line-mode REPL. `input`/`output` are prompt_toolkit Input/Output (None: the terminal);
    replies, command output and errors go to `out` (default: stdout). `first` is sent as the first message."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.utils import is_dumb_terminal

    from mixchat import paths
    from mixchat.conversations import kvstore
    from mixchat.conversations.store import Store
    from mixchat.frontends.oneshot import (
        _resolve_conversation,
        apply_saved_load_options,
        load_engine,
        model_for,
        model_given,
        recommended_sampling,
        sampling_from,
        saved_settings,
        when_full_from,
    )
    from mixchat.settings import settings_path

    out = out or sys.stdout
    sampling_from(ns)  # fail on a bad flag before the model loads; the real settings come after
    saved, saved_sampling, saved_keys = saved_settings()
    from_saved = apply_saved_load_options(ns, saved)
    when_full = when_full_from(ns, saved, saved_keys)
    continuing = bool(ns.cont or ns.cid)
    store = Store(paths.store_path()) if (not ns.no_save or continuing) else None
    conv = _resolve_conversation(ns, store) if continuing else None
    model = model_for(model_given(ns), conv, getattr(ns, "default_model", None))
    engine = load_engine(model, ns, from_saved)
    settings = sampling_from(ns, recommended_sampling(engine), str(engine.release.params), saved_sampling,
                             str(settings_path()))
    pool = kvstore.SessionPool(engine, paths.kv_dir())
    if conv is not None and ns.system is not None and ns.system != conv.system and not ns.no_save:
        store.update_settings(conv.id, ns.system, conv.settings)
        conv.system = ns.system

    repl = Repl(ns, engine, pool, store, conv, settings, out, when_full=when_full, system=saved.system)
    dumb = output is None and is_dumb_terminal()  # PromptSession's own test for its plain-text prompt
    repl.session = PromptSession(PROMPT, history=_history(ns.no_save), key_bindings=_key_bindings(repl, dumb),
                                 prompt_continuation=CONTINUATION, input=input, output=output)
    repl.banner()
    return repl.loop(repl.session, first)
