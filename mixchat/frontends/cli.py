"""Command line. `mixchat "question"`, -p or a question on stdin answers once on stdout; without one,
in a terminal, the app opens. Commands: inspect, verify and bench work on a release folder; list,
show, search, export, import, rm and rename on the saved conversations. A first positional argument
that is a command's name is that command, any other is the question (parse_args).

Expected failures are MixchatError: one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

from mixchat import __version__
from mixchat.errors import MixchatError
from mixchat.frontends.oneshot import model_given
from mixchat.speed.qformat import CHOICES


def _inspect(ns: argparse.Namespace) -> int:
    from mixchat.release.inspection import format_report, inspect_release

    report = inspect_release(ns.folder)
    print(json.dumps(report, indent=2) if ns.json else format_report(report))
    # The report is printed either way; the exit status lets scripts tell a usable folder, and the
    # verdict goes to stderr too, as every other command's failures do.
    if report["problem"] is None:
        return 0
    from mixchat.safetext import one_line

    print(f"mixchat: error: {one_line(report['problem'])}", file=sys.stderr)
    return 1


def _verify(ns: argparse.Namespace) -> int:
    from mixchat.release.inspection import verify_release

    verify_release(ns.folder, out=lambda line: print(line, flush=True))
    return 0


def _bench(ns: argparse.Namespace) -> int:
    from mixchat.engine import bench

    ns.model = _model_folder(ns)
    return bench.run(ns)


def _store(readonly: bool = False):
    from mixchat import paths
    from mixchat.conversations.store import Store

    # Commands that only read open it read-only: they then work on a store in a read-only folder or
    # from a newer mixchat, and create nothing where there is no store yet.
    return Store(paths.store_path(), readonly=readonly)


def _list(ns: argparse.Namespace) -> int:
    from mixchat.conversations.exporting import format_list

    print(format_list(_store(readonly=True).list()))
    return 0


def _show(ns: argparse.Namespace) -> int:
    from mixchat.conversations.exporting import dumps, export_json, export_markdown

    store = _store(readonly=True)
    if getattr(ns, "format", "markdown") == "json":
        print(dumps(export_json(store, ns.id)), end="")
    else:
        print(export_markdown(store, ns.id), end="")
    return 0


def _search(ns: argparse.Namespace) -> int:
    from mixchat.conversations.exporting import format_hit
    from mixchat.conversations.store import search_words
    from mixchat.frontends.oneshot import check_text
    from mixchat.safetext import one_line

    text = check_text(ns.text, "the search text", "give the words to search for")
    if not search_words(text):
        raise MixchatError(f"the search text {one_line(text)[:40]!r} has no letters or digits; give the words to "
                           "search for")
    if not 1 <= ns.limit <= 10_000:
        raise MixchatError(f"--limit {ns.limit}: give a number of hits from 1 to 10000")
    hits = _store(readonly=True).search(text, ns.limit)
    for hit in hits:
        print(format_hit(hit))
    if not hits:
        # Not an error (exit 0): the search worked and found nothing, as an empty `list` is not one.
        print(f"no match: no conversation holds every word of {one_line(text)}")
    return 0


def _import(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from mixchat.conversations.exporting import add_imported, parse_import, read_json_file
    from mixchat.conversations.store import short_id
    from mixchat.safetext import one_line

    path = Path(ns.file)
    imported = parse_import(read_json_file(path), str(path))  # all checked before the store is opened
    conv = add_imported(_store(), imported)
    print(f"{short_id(conv.id)}: {one_line(conv.title) or '(untitled)'} ({len(imported.messages)} messages, "
          f"imported from {one_line(str(path))})")
    return 0


def _rm(ns: argparse.Namespace) -> int:
    from mixchat import paths
    from mixchat.conversations.store import short_id
    from mixchat.safetext import one_line

    conv = _store().delete(ns.id)
    print(f"deleted {short_id(conv.id)} ({one_line(conv.title) or '(untitled)'}) and its messages")
    # its cache, and the parts other ranks of a torchrun launch saved on this machine (<id>.rank<r>.safetensors)
    for kv in [paths.kv_dir() / f"{conv.id}.safetensors", *paths.kv_dir().glob(f"{conv.id}.rank*.safetensors")]:
        try:
            kv.unlink(missing_ok=True)
        except OSError as exc:  # the conversation is gone; only its cache file is left behind
            print(f"mixchat: warning: could not delete its KV cache {kv} ({exc.strerror}); remove it by hand",
                  file=sys.stderr)
    return 0


def _rename(ns: argparse.Namespace) -> int:
    from mixchat.conversations.store import short_id
    from mixchat.frontends.oneshot import check_text
    from mixchat.safetext import one_line

    conv = _store().rename(ns.id, check_text(ns.title, "the title", "give the new title"))
    print(f"{short_id(conv.id)}: {one_line(conv.title)}")
    return 0


def _chosen_model(ns: argparse.Namespace) -> tuple[str | None, str | None, bool]:
    """The model to load, a note to show with it, and whether it is the one saved in the settings:
    --model, else $MIXCHAT_MODEL, else the folder saved in the settings (F2), else the demo model
    (with a note saying what it is). Every front end picks it this way, so a question piped in is
    answered by the model the app would open."""
    folder = model_given(ns)
    if folder:
        return folder, None, False
    from mixchat import paths
    from mixchat import settings as settings_mod

    saved = settings_mod.load().model
    if saved:
        return saved, None, True
    demo = paths.demo_model()
    return (str(demo), DEMO_NOTE, False) if demo else (None, None, False)


def _model_folder(ns: argparse.Namespace) -> str:
    """The model for a command with no screen to fix a setting in (one-shot, bench): a saved folder
    that has gone is an error that says where it was saved (the app opens and shows it instead)."""
    folder, _, saved = _chosen_model(ns)
    if not folder:
        raise MixchatError("no model given: pass --model DIR (a Mistral/Mixtral release folder) or set MIXCHAT_MODEL")
    if saved and not Path(folder).expanduser().is_dir():
        from mixchat.safetext import one_line
        from mixchat.settings import settings_path

        raise MixchatError(f"the model folder saved in the settings ({settings_path()}), {one_line(folder)}, is not "
                           "a folder; pass --model DIR, or choose another in the app's settings (F2)")
    return folder


DEMO_NOTE = ("This is mixchat's small demo model (a 4-layer Mixtral trained on Jane Austen): expect "
             "Austen-flavoured sentences, not answers. Point mixchat at a real release folder with "
             "--model DIR or in the settings (F2).")


def _interactive(ns: argparse.Namespace, first_message: str | None) -> int:
    """The TUI, or line mode when asked for or when the terminal cannot draw it."""
    from mixchat import settings as settings_mod

    model, note, _ = _chosen_model(ns)
    from mixchat.frontends import repl

    if ns.plain or repl.wants_plain():
        if (ns.cont or ns.cid) and not model_given(ns):
            # going on with a conversation: its own model, unless a flag names one (as in one-shot)
            ns.model, ns.default_model = None, model
            return repl.run(ns, first=first_message)
        ns.model = model
        if not model:
            raise MixchatError("no model given: pass --model DIR (a Mistral/Mixtral release folder)")
        if note:
            print(note)
        return repl.run(ns, first=first_message)
    from mixchat.engine.engine import load_options
    from mixchat.frontends.oneshot import load_flags_given, recommended_sampling, sampling_from
    from mixchat.frontends.tui.app import MixchatApp

    load_options(ns)  # the model and sampling flags are checked as in every other front end, by name
    sampling_from(ns)
    opened = None
    if ns.cont or ns.cid:  # `mixchat -c` / `--cid ID` in a terminal: the app opens on that conversation
        from mixchat import paths
        from mixchat.conversations.store import Store
        from mixchat.frontends.oneshot import _resolve_conversation

        conv = _resolve_conversation(ns, Store(paths.store_path(), readonly=True))
        opened = conv.id
        if not model_given(ns) and conv.model_path and Path(conv.model_path).is_dir():
            # its own model, as in one-shot and line mode (loading another first would cost a 7B's load, then ask)
            model, note = conv.model_path, None
    settings, saved_keys, problems = settings_mod.read()
    params = Path(model) / "params.json" if model else None
    if params is not None and params.is_file():
        # A folder's recommended sampling (the demo's: it loops when greedy) fills in what the user did
        # not save; a saved value wins, as in one-shot and line mode, and flags win over both (below).
        from mixchat.release.config import ModelArgs

        try:
            recommended = recommended_sampling(extra=ModelArgs.from_file(params).extra)
        except MixchatError:
            recommended = {}  # the app says what is wrong with the folder when it loads it
        sampling_from(ns, recommended, str(params))  # a bad value is blamed on the file
        settings_mod.apply_recommended(settings, saved_keys, recommended)
    flagged = set()  # the settings flags chose for this run: the app does not save them as the user's choice
    for key in ("temperature", "top_p", "top_k", "repeat_penalty", "seed", "max_tokens", "draft", "system"):
        if getattr(ns, key, None) is not None:  # flags given now win over the saved settings
            setattr(settings, key, getattr(ns, key))
            flagged.add(key)
    for key, value in load_flags_given(ns).items():
        setattr(settings, key, value)
        flagged.add(key)
    if ns.when_full is not None:
        settings.when_full = ns.when_full
        flagged.add("when_full")
    settings.check()
    app = MixchatApp(model=model, settings=settings, first_message=first_message, demo_note=note, notes=problems,
                     open_cid=opened, saved_keys=saved_keys, flag_keys=frozenset(flagged))
    app.run()
    # 0 after Ctrl+Q, 128 + the signal after SIGTERM/SIGHUP (replies saved first), 1 after a crash
    # (Textual sets it on an unhandled exception and prints the traceback once the terminal is back).
    return app.return_code or 0


def _reattach_terminal() -> None:
    """`cat notes | mixchat -i`: stdin was the notes; the chat goes on in the terminal."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR)
    except OSError:
        raise MixchatError("-i needs a terminal to keep chatting in, and /dev/tty cannot be opened") from None
    os.dup2(fd, 0)
    os.close(fd)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - stays open for the app's life


def _chat(ns: argparse.Namespace) -> int:
    from mixchat.frontends import oneshot

    source = "-p/--prompt"
    positional = getattr(ns, "prompt_text", None)
    if positional is not None:
        if ns.prompt is not None:
            raise MixchatError("the message is given twice, as PROMPT and with -p; give it once")
        ns.prompt, source = positional, "PROMPT"
    if ns.cid is not None and not ns.cid.strip():
        # `--cid "$ID"` with ID unset must not start a new conversation where the script meant an old one
        raise MixchatError("--cid is empty: give a conversation id (`mixchat list` shows them), or leave --cid out "
                           "to start a new conversation")
    if ns.system:
        oneshot.check_text(ns.system, "--system", "give the system prompt's text, or leave --system out")
    if ns.interactive:
        first = oneshot.read_stdin() if not sys.stdin.isatty() else ns.prompt
        if first is not None:
            first = oneshot.check_text(first, source, "give the first message")
        _reattach_terminal()
        return _interactive(ns, first)
    if ns.plain and (ns.prompt is not None or not sys.stdin.isatty()):
        # Line mode reads a terminal; taking a pipe or -p as one message would send `/bye` to the model.
        raise MixchatError("--plain is the line mode, which reads its messages from a terminal: leave --plain out "
                           "for a one-shot answer to piped text or -p, or add -i to start line mode with it")
    if ns.prompt is not None:
        text = oneshot.check_text(ns.prompt, source, "give the question to ask")
    elif not sys.stdin.isatty():
        text = oneshot.read_stdin()
    else:
        return _interactive(ns, None)
    if not (ns.cont or ns.cid):
        ns.model = _model_folder(ns)
    else:  # else the conversation's own model; one it does not name (an import) takes the usual choice
        ns.model = model_given(ns)
        ns.default_model = _chosen_model(ns)[0]
    return oneshot.run(ns, text)


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", metavar="DIR", help="release folder (default: $MIXCHAT_MODEL)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weight dtype; auto = bf16 (see README: decode is memory-bound)")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--quant", choices=CHOICES, default=None,
                   help="weight-only quantization at load, cached for the next start: int8 (per row) or int4 "
                        "(groups of 128, or int4-32/int4-64); none = the release dtype (default)")
    g.add_argument("--memory-budget", type=float, metavar="GB",
                   help="Mixtral: keep the weights within GB, loading experts on demand into an LRU cache "
                        "(with prefetching); for models larger than memory")
    g.add_argument("--rank-layers", metavar="N,N,...",
                   help="under torchrun: the layers each rank holds, in rank order (default: by each rank's free "
                        "memory)")
    g.add_argument("--split", choices=["pipeline", "experts"], default=None,
                   help="under torchrun: pipeline (default: each rank a range of layers) or experts (Mixtral: each "
                        "rank every layer's attention and a share of its experts)")
    g.add_argument("--rank-timeout", type=float, metavar="SECONDS",
                   help="under torchrun: how long rank 0 waits on another rank before it gives up and says which "
                        f"(default {DEFAULT_RANK_TIMEOUT:g})")
    g.add_argument("--context", type=int, metavar="TOKENS",
                   help="the tokens a conversation may hold (default: params.json's max_seq_len, or what the "
                        "KV cache can take in the memory left after the weights, if less)")


DEFAULT_RANK_TIMEOUT = 120.0  # seconds: one chunk of a rank's layers, read from disk if it must

COMMANDS = ("inspect", "verify", "list", "show", "search", "export", "import", "rm", "rename", "bench")
USAGE = "%(prog)s [options] [PROMPT]\n       %(prog)s COMMAND [args]  (COMMAND: " + ", ".join(COMMANDS) + ")"
EPILOG = ("PROMPT is the message, as one argument (quote it), like -p; stdin is then not read. A PROMPT that is "
          "exactly a command's name is that command: to ask the model about one of those words, give it with -p "
          "or after -- (mixchat -- list). Conversation ids: `mixchat list` shows the short form; every command "
          "also takes the full id or a unique prefix or suffix of at least 4 characters. Exit status: 0; 1 when "
          "inspect or verify find a folder that does not check out; 2 on an error (one line on stderr); 128+N "
          "after signal N stopped a reply (130: Ctrl+C). search exits 0 also when nothing matched.")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line like every other expected failure (argparse prints
    its two-line usage first), naming where the full usage is."""

    def error(self, message: str):
        from mixchat.safetext import one_line

        raise MixchatError(f"{one_line(message)} (see {self.prog} --help)")


def build_parser(prompt: bool = False) -> argparse.ArgumentParser:
    """The command line. prompt=True: the options and a positional PROMPT, without the commands
    (main picks it when the first positional argument is not a command's name)."""
    parser = _Parser(
        prog="mixchat", usage=USAGE, epilog=EPILOG,
        description="Chat with Mistral and Mixtral release folders, with mixchat's own model code. "
        "Ask with mixchat \"QUESTION\", -p QUESTION or a pipe (echo hi | mixchat -m DIR); the answer streams "
        "to stdout. Without a question, in a terminal, mixchat opens the app.",
    )
    parser.add_argument("--version", action="version", version=f"mixchat {__version__}")
    parser.add_argument("--home", metavar="DIR", help="keep conversations, settings and quantized weights here "
                        "(default: $MIXCHAT_HOME, else the per-user folders)")
    if prompt:
        parser.add_argument("prompt_text", nargs="?", metavar="PROMPT", help="the message to answer, like -p")
    _model_options(parser)
    c = parser.add_argument_group("one-shot answer")
    c.add_argument("-p", "--prompt", help="the message to answer (default: PROMPT, else all of stdin, which must be "
                   "UTF-8)")
    c.add_argument("--system", help="system prompt, placed where mistral-common places it")
    c.add_argument("--raw", action="store_true", help="no chat format: BOS + the text, plain completion")
    c.add_argument("--json", action="store_true", help="one JSON object per token, then a summary line")
    c.add_argument("--stats", action="store_true", help="print speed and token counts to stderr (default: if a tty)")
    c.add_argument("-c", "--continue", dest="cont", action="store_true",
                   help="add this turn to the most recent conversation (its KV cache is re-used)")
    c.add_argument("--cid", metavar="ID", help="add this turn to conversation ID (its short form, or a unique "
                   "prefix or suffix of it)")
    c.add_argument("--no-save", action="store_true", help="do not save this exchange as a conversation")
    c.add_argument("--when-full", choices=["drop", "stop"], default=None,
                   help="when a conversation outgrows its context: drop its oldest turns to make room (the system "
                        "prompt stays), or stop and say so (default: the saved setting, else drop)")
    i = parser.add_argument_group("interactive")
    i.add_argument("-i", "--interactive", action="store_true",
                   help="send stdin (or -p) as the first message, then keep chatting in the terminal")
    i.add_argument("--plain", action="store_true", help="line mode instead of the full-screen app")
    s = parser.add_argument_group("sampling")
    # Defaults are None so an interactive session can tell a flag given now from its saved settings.
    s.add_argument("--temperature", type=float, help="0 = greedy (default 0.7)")
    s.add_argument("--top-p", type=float, help="nucleus sampling mass (default 0.95)")
    s.add_argument("--top-k", type=int, help="keep the k most likely tokens; 0 = off (default)")
    s.add_argument("--repeat-penalty", type=float,
                   help="penalise the last 64 tokens' ids; 1 = off (default; params.json may recommend another)")
    s.add_argument("--seed", type=int, help="same seed and settings give the same text")
    s.add_argument("--max-tokens", type=int, help="stop after this many new tokens (default 512)")
    s.add_argument("--draft", type=int, metavar="N",
                   help="guess up to N tokens ahead from the conversation and check them in one pass (prompt "
                        "lookup: the same reply, faster where it repeats text); 0 = off (default 7)")
    parser.set_defaults(func=_chat)
    if prompt:
        return parser

    sub = parser.add_subparsers(dest="command", metavar="COMMAND", prog="mixchat")
    p = sub.add_parser("inspect", help="show what a release folder holds (shapes, params, memory) in a blink")
    p.add_argument("folder", help="release folder (params.json, consolidated weights, tokenizer)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("verify", help="check the folder loads, then its files against the md5 sums in RELEASE")
    p.add_argument("folder", help="release folder with a RELEASE file")
    p.set_defaults(func=_verify)
    an_id = "conversation id: the short form `list` shows, the full id, or a unique prefix or suffix"
    p = sub.add_parser("list", help="saved conversations, newest first (with their short ids)")
    p.set_defaults(func=_list)
    p = sub.add_parser("show", help="print a conversation's transcript")
    p.add_argument("id", help=an_id)
    p.set_defaults(func=_show)
    p = sub.add_parser("search", help="find words in conversations' messages and titles, newest first; exit 0 "
                       "also when nothing matched")
    p.add_argument("text", help="the words, all of which must be there (each as a word or a word's start; case "
                   "and accents ignored); quotes, * and the like are just characters")
    p.add_argument("-n", "--limit", type=int, default=50, help="show at most this many hits (default 50)")
    p.set_defaults(func=_search)
    p = sub.add_parser("export", help="write a conversation as markdown or JSON to stdout")
    p.add_argument("id", help=an_id)
    p.add_argument("--format", choices=["markdown", "json"], default="markdown")
    p.set_defaults(func=_show)
    p = sub.add_parser("import", help="add a conversation from a file `export --format json` wrote, as a new "
                       "conversation; prints its short id")
    p.add_argument("file", metavar="FILE.json")
    p.set_defaults(func=_import)
    p = sub.add_parser("rm", help="delete a conversation and its saved KV cache")
    p.add_argument("id", help=an_id)
    p.set_defaults(func=_rm)
    p = sub.add_parser("rename", help="change a conversation's title")
    p.add_argument("id", help=an_id)
    p.add_argument("title")
    p.set_defaults(func=_rename)
    p = sub.add_parser("bench", help="load time, peak RSS, prefill and decode tokens/sec against the memory ceiling")
    _model_options(p)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3, help="report the median of this many runs")
    p.add_argument("--json", action="store_true")
    p.add_argument("--measure-again", action="store_true",
                   help="measure this machine's kernel choices (row reads, prompt GEMM) anew rather than use the "
                        "kept ones, e.g. after they were measured while other work shared the machine")
    p.set_defaults(func=_bench)
    return parser


def _first_positional(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[str | None, bool]:
    """The first argument that is neither an option nor an option's value, and whether a `--`
    came before it. argparse cannot tell a PROMPT from a COMMAND by itself: both are positional."""
    takes_value = {opt: action.nargs != 0 for action in parser._actions for opt in action.option_strings}
    longs = [opt for opt in takes_value if opt.startswith("--")]
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return (argv[i + 1] if i + 1 < len(argv) else None), True
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
            # argparse accepts a unique abbreviation of a long option (--temp 0)
            matches = [name] if name in takes_value else [o for o in longs if o.startswith(name)]
            if "=" not in arg and len(matches) == 1 and takes_value[matches[0]]:
                i += 1
        elif arg.startswith("-") and len(arg) > 1 and not _NEGATIVE.match(arg):
            # -ic (flags together), -mDIR (a value attached), -im DIR (the last one takes the next)
            for j in range(1, len(arg)):
                if takes_value.get("-" + arg[j]):
                    i += j == len(arg) - 1
                    break
        else:
            return arg, False
        i += 1
    return None, False


_NEGATIVE = re.compile(r"^-\d+$|^-\d*\.\d+$")  # argparse reads these as values, not options


def parse_args(argv: list[str]) -> argparse.Namespace:
    """A first positional argument that names a command is that command; any other is the PROMPT."""
    parser = build_parser()
    first, after_dashes = _first_positional(parser, argv)
    if first is not None and (after_dashes or first not in COMMANDS):
        parser = build_parser(prompt=True)
    return parser.parse_args(argv)


def _join_launch(ns: argparse.Namespace):
    """Under torchrun: join the ranks' group (None otherwise)."""
    from mixchat.distributed import group as dist_group

    if not dist_group.launched():
        return None
    timeout = getattr(ns, "rank_timeout", None)
    valid = timeout is None or (math.isfinite(timeout) and 0.001 <= timeout <= 86400)
    group = dist_group.start(timeout if valid and timeout else DEFAULT_RANK_TIMEOUT)
    if group.rank == 0:  # the other ranks say nothing: rank 0 names a bad flag, once
        if not valid:
            raise MixchatError(f"--rank-timeout {timeout:g}: must be a number of seconds from 0.001 to 86400")
        group.split = getattr(ns, "split", None) or "pipeline"
        from mixchat.engine.engine import load_options

        group.rank_layers = load_options(ns)["rank_layers"] if getattr(ns, "rank_layers", None) else None
    return group


def main(argv: list[str] | None = None) -> int:
    from mixchat.safetext import visible
    from mixchat.signals import Terminated

    try:
        ns = parse_args(sys.argv[1:] if argv is None else list(argv))
    except MixchatError as exc:  # a bad flag: before anything else is set up
        _stderr(f"mixchat: error: {visible(str(exc))}")
        return exc.exit_code
    if ns.home:
        os.environ["MIXCHAT_HOME"] = ns.home
    from mixchat.speed import heap

    heap.keep_freed_memory()  # before the app's threads start: each keeps the malloc arena it began with
    try:
        group = _join_launch(ns)
        if group is not None and group.rank != 0:
            from mixchat.distributed.serving import serve

            return serve(group)  # the other ranks only answer rank 0, and say nothing
        code = ns.func(ns)
    except MixchatError as exc:
        # Messages quote paths and values from files and flags: no control character may act.
        _stderr(f"mixchat: error: {visible(str(exc))}")
        code = exc.exit_code
    except KeyboardInterrupt:
        _stderr("")
        code = 130
    except Terminated as exc:
        code = 128 + exc.signum
    except BrokenPipeError:
        code = 0  # the reader went away (mixchat ... | head): stop quietly, as Unix tools do
    finally:
        from mixchat.distributed import group as dist_group

        # also when the launch was joined and a flag then refused: the other ranks wait for their stop
        if (joined := dist_group.current()) is not None and joined.rank == 0:
            from mixchat.distributed.pipeline import Pipeline

            Pipeline.of(joined).stop()
            joined.close()
    try:
        sys.stdout.flush()
    except OSError:
        # Point stdout at /dev/null so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


def _stderr(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass
