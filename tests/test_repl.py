"""Line mode (`mixchat --plain`): the prompt_toolkit REPL driven through a pipe, on a small random
model, with the real Chat, store, KV cache files and input history."""

from __future__ import annotations

import contextlib
import io
import signal

import pytest
from conftest import tiny_args
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from mixchat import paths
from mixchat.conversations.store import Store, short_id
from mixchat.engine.engine import Engine
from mixchat.engine.generation import Session
from mixchat.engine.sampling import SamplingSettings
from mixchat.frontends import repl
from mixchat.frontends.cli import build_parser
from mixchat.text.chat_format import Message, encode_chat

MOE = {"num_experts": 4, "num_experts_per_tok": 2}
ENTER, META_ENTER, CTRL_C, CTRL_D = "\r", "\x1b\r", "\x03", "\x04"


@pytest.fixture
def model(make_release):
    return make_release(tiny_args(sliding_window=24), seed=31, std=0.15)


def namespace(*args: str):
    """The Namespace cli.py's parser gives (the names run() reads are those of the real flags)."""
    return build_parser().parse_args(["--dtype", "fp32", "--repeat-penalty", "1", *args])


@contextlib.contextmanager
def deadline(seconds: int):
    """A hung REPL fails the test instead of blocking the run."""
    def expire(signum, frame):
        raise TimeoutError(f"the REPL did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def drive(ns, keys: str, out=None) -> tuple[int, str]:
    out = out if out is not None else io.StringIO()
    with create_pipe_input() as inp, deadline(120):
        inp.send_text(keys)
        rc = repl.run(ns, input=inp, output=DummyOutput(), out=out)
    return rc, out.getvalue()


def store() -> Store:
    return Store(paths.store_path())


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_two_turns_stream_save_and_reuse_the_cache(model):
    ns = namespace("-m", str(model), "--temperature", "0", "--max-tokens", "8")
    rc, text = drive(ns, "Where do rivers go?" + ENTER + "And the rain?" + ENTER + "/bye" + ENTER)
    assert rc == 0
    (conv,) = store().list()
    msgs = store().messages(conv.id)
    assert [(m.role, m.content) for m in msgs if m.role == "user"] == [("user", "Where do rivers go?"),
                                                                       ("user", "And the rain?")]
    assert [m.role for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[1].token_ids and msgs[1].stop in ("eos", "length") and msgs[3].stop in ("eos", "length")
    # The second turn re-used the first exchange from the KV cache and prefilled only the new tokens.
    engine = Engine.load(model, dtype="fp32", warm=False)
    first = encode_chat(engine.tokenizer, [Message("user", "Where do rivers go?")])
    assert msgs[3].timings["cached_tokens"] == len(first) + len(msgs[1].token_ids)
    assert 0 < msgs[3].timings["prefilled_tokens"] < 20
    # Both replies were streamed, each followed by one stats line.
    assert msgs[1].content in text and msgs[3].content in text
    stats = [line for line in text.splitlines() if "tok/s" in line]
    assert len(stats) == 2 and f"({msgs[3].timings['cached_tokens']} cached" in stats[1]
    assert stats[0].endswith(f"stop: {msgs[1].stop}")


def test_set_changes_the_settings_used_and_saved(model):
    ns = namespace("-m", str(model), "--temperature", "1.5", "--max-tokens", "12")
    keys = ["/set temperature 0", "Name a colour.", "/new", "Name a colour.", "/set top-k 5", "/set seed 7",
            "/set", "/bye"]
    rc, text = drive(ns, ENTER.join(keys) + ENTER)
    assert rc == 0 and not errors(text)
    second, first = store().list()
    a, b = store().messages(first.id)[1], store().messages(second.id)[1]
    # Greedy: both conversations got the same reply, the one a plain greedy Session gives.
    engine = Engine.load(model, dtype="fp32", warm=False)
    prompt = encode_chat(engine.tokenizer, [Message("user", "Name a colour.")])
    greedy = list(Session(engine).generate(prompt, SamplingSettings(temperature=0, repeat_penalty=1,
                                                                    max_tokens=12)))[-1]
    assert a.token_ids == b.token_ids == greedy.generated
    assert store().get(first.id).settings["temperature"] == 0
    saved = store().get(second.id).settings  # /set after the conversation began updates what is saved
    assert (saved["temperature"], saved["top_k"], saved["seed"]) == (0, 5, 7)
    assert "temperature=0.0 top_p=0.95 top_k=5 repeat_penalty=1.0 max_tokens=12 seed=7" in text


def test_unknown_key_bad_values_and_unknown_commands_are_one_line_errors(model):
    ns = namespace("-m", str(model), "--temperature", "0", "--max-tokens", "3")
    keys = ["/set colour blue", "/set temperature -1", "/set top_k many", "/set top_p", "/frobnicate",
            "/open", "/open nosuchid", "/experts maybe", "still here", "/bye"]
    rc, text = drive(ns, ENTER.join(keys) + ENTER)
    assert rc == 0
    errs = errors(text)
    assert len(errs) == 8, text
    assert "unknown setting" in errs[0] and "temperature" in errs[0]
    assert errs[1].startswith("error: /set temperature -1: must be 0")
    assert "not a whole number" in errs[2] and "needs a value" in errs[3] and "unknown command /frobnicate" in errs[4]
    assert "no conversation 'nosuchid'" in errs[6]
    ((_, user),) = [(m.role, m.content) for m in store().messages(store().latest().id) if m.role == "user"]
    assert user == "still here"  # the REPL went on after every error
    assert SamplingSettings(temperature=0).temperature == 0  # defaults untouched by failed /set


def test_context_overflow_is_one_line_and_the_repl_continues(make_release):
    args = tiny_args()
    model = make_release(args, seed=5, std=0.15, params={**args.to_params(), "max_seq_len": 40})
    ns = namespace("-m", str(model), "--temperature", "0", "--max-tokens", "3")
    rc, text = drive(ns, ENTER.join(["tell me " * 30, "hi", "/bye"]) + ENTER)
    assert rc == 0
    (err,) = errors(text)
    assert "the context holds 40" in err
    msgs = store().messages(store().latest().id)
    assert [m.content for m in msgs if m.role == "user"] == ["hi"]


def test_new_list_and_open(model):
    ns = namespace("-m", str(model), "--temperature", "0", "--max-tokens", "4")
    rc, text = drive(ns, ENTER.join(["first question", "/new", "second question", "/list", "/bye"]) + ENTER)
    assert rc == 0
    newest, oldest = store().list()
    listing = text[text.index("updated"):]
    new, old = short_id(newest.id), short_id(oldest.id)
    assert new in listing and old in listing and "first question" in listing
    assert listing.index(new) < listing.index(old)

    rc, text = drive(ns, ENTER.join([f"/open {old}", "follow-up", "/save", "/bye"]) + ENTER)
    assert rc == 0
    assert ">>> first question" in text  # its last messages are shown on opening
    msgs = store().messages(oldest.id)
    assert [m.content for m in msgs if m.role == "user"] == ["first question", "follow-up"]
    assert msgs[3].timings["cached_tokens"] > 0  # the saved KV cache file was used
    assert f"saved as {oldest.id}" in text
    assert len(store().messages(newest.id)) == 2


def test_continue_flag_reopens_the_latest_conversation(model):
    ns = namespace("-m", str(model), "--temperature", "0", "--max-tokens", "4")
    drive(ns, "hello" + ENTER + "/bye" + ENTER)
    rc, text = drive(namespace("-c", "--temperature", "0", "--max-tokens", "4", "--system", "Be brief."),
                     "again" + ENTER + CTRL_D)
    assert rc == 0 and ">>> hello" in text
    conv = store().latest()
    msgs = store().messages(conv.id)
    assert len(store().list()) == 1 and [m.content for m in msgs if m.role == "user"] == ["hello", "again"]
    assert conv.system == "Be brief." and msgs[3].timings["cached_tokens"] > 0


def test_plain_continue_without_a_model_flag_takes_the_conversations_own(model, monkeypatch):
    """`mixchat --plain -c`: the conversation's model (and its KV cache), not the demo or the saved one."""
    from mixchat.frontends import cli

    drive(namespace("-m", str(model), "--temperature", "0", "--max-tokens", "4"), "hello" + ENTER + "/bye" + ENTER)
    real = repl.run

    def run(ns, **kw):
        with create_pipe_input() as inp, deadline(120):
            inp.send_text("again" + ENTER + "/bye" + ENTER)
            return real(ns, input=inp, output=DummyOutput(), out=io.StringIO())

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(repl, "run", run)
    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.delenv("MIXCHAT_MODEL", raising=False)
    assert cli.main(["--plain", "-c", "--dtype", "fp32", "--temperature", "0", "--max-tokens", "4"]) == 0
    conv = store().latest()
    msgs = store().messages(conv.id)
    assert len(store().list()) == 1 and [m.content for m in msgs if m.role == "user"] == ["hello", "again"]
    assert conv.model_path == str(model) and msgs[3].timings["cached_tokens"] > 0  # its cache, so its model


def test_piped_first_message_with_plain_i_is_sent_first(model, monkeypatch):
    """`cat notes | mixchat --plain -i`: the notes are the first message (they were dropped), then the chat goes on."""
    from mixchat.frontends import cli

    real = repl.run
    seen = {}

    def run(ns, first=None, **kw):
        seen["first"] = first
        with create_pipe_input() as inp, deadline(120):
            inp.send_text("/bye" + ENTER)
            out = io.StringIO()
            rc = real(ns, input=inp, output=DummyOutput(), out=out, first=first)
            seen["text"] = out.getvalue()
            return rc

    monkeypatch.setattr(repl, "run", run)
    monkeypatch.setattr(cli, "_reattach_terminal", lambda: None)  # no /dev/tty in a test
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"/notes about Bingley\nand Darcy\n")))
    assert cli.main(["--plain", "-i", "-m", str(model), "--dtype", "fp32", "--max-tokens", "3"]) == 0
    assert seen["first"] == "/notes about Bingley\nand Darcy\n"  # as piped, as the app and one-shot take it
    msgs = store().messages(store().latest().id)
    # sent as a message (not read as a /command), answered, saved; shown as if typed
    assert [m.role for m in msgs] == ["user", "assistant"] and msgs[0].content.startswith("/notes about Bingley\nand")
    assert ">>> /notes about Bingley\n... and Darcy" in seen["text"] and msgs[1].content in seen["text"]


def test_multiline_input_and_the_history_file(model):
    ns = namespace("-m", str(model), "--temperature", "0", "--max-tokens", "2")
    keys = "line one\\" + ENTER + "line two" + ENTER + "alpha" + META_ENTER + "beta" + ENTER + "/help" + ENTER
    rc, text = drive(ns, keys + "/bye" + ENTER)
    assert rc == 0
    msgs = store().messages(store().latest().id)
    assert [m.content for m in msgs if m.role == "user"] == ["line one\nline two", "alpha\nbeta"]
    assert "backslash" in text and "Meta+Enter" in text  # /help says how
    history = paths.input_history_path().read_text()
    assert oct(paths.input_history_path().stat().st_mode & 0o777) == oct(0o600)  # everything typed: the owner's only
    assert "+line one\n+line two\n" in history and "+alpha\n+beta\n" in history and "+/bye\n" in history
    # The next session recalls it: Up twice brings back /help (Up once would be /bye).
    rc, text = drive(ns, "\x1b[A\x1b[A" + ENTER + "/bye" + ENTER)
    assert rc == 0 and "Commands:" in text


def test_ctrl_c_clears_the_line_and_twice_on_an_empty_line_leaves(model):
    ns = namespace("-m", str(model))
    rc, text = drive(ns, "never sent" + CTRL_C + CTRL_C + CTRL_C)
    assert rc == 0 and text.count("Ctrl+C again") == 1
    assert not store().list()  # the cleared line was not sent
    rc, text = drive(ns, "x" + CTRL_C + CTRL_C + "/save" + ENTER + CTRL_D)  # any input disarms it
    assert rc == 0 and "nothing to save yet" in text


class InterruptingOut(io.StringIO):
    """Sends this process SIGINT (what Ctrl+C does while the model writes) at the Nth write made
    while the REPL's own SIGINT handler is installed, i.e. during generation."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.seen, self.original = after, 0, signal.getsignal(signal.SIGINT)

    def write(self, s: str) -> int:
        n = super().write(s)
        if signal.getsignal(signal.SIGINT) is not self.original:
            self.seen += 1
            if self.seen == self.after:
                signal.raise_signal(signal.SIGINT)
        return n


def test_ctrl_c_while_generating_stops_within_a_token_and_keeps_the_reply(model):
    original = signal.getsignal(signal.SIGINT)
    ns = namespace("-m", str(model), "--temperature", "1", "--seed", "3", "--max-tokens", "400")
    out = InterruptingOut(after=3)
    rc, text = drive(ns, ENTER.join(["talk", "/set max_tokens 2", "more", "/bye"]) + ENTER, out)
    assert rc == 0 and signal.getsignal(signal.SIGINT) is original
    msgs = store().messages(store().latest().id)
    assert msgs[1].stop == "interrupted" and len(msgs[1].token_ids) == 3 and msgs[1].content in text
    assert "stop: interrupted" in text
    assert msgs[2].content == "more" and msgs[3].stop in ("eos", "length")  # the REPL went on


def test_experts_view_for_moe_and_dense(make_release, model):
    moe = make_release(tiny_args(moe=MOE), "torrent", seed=12, std=0.15)
    ns = namespace("-m", str(moe), "--temperature", "0", "--max-tokens", "5")
    rc, text = drive(ns, ENTER.join(["/experts on", "hi", "/experts off", "hi again", "/bye"]) + ENTER)
    assert rc == 0
    reply = store().messages(store().latest().id)[1]
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("experts:"))
    assert f"of the reply's {len(reply.token_ids)} tokens" in lines[start] and "top-2 of 4" in lines[start]
    assert lines[start + 1].split() == ["layer", "e0", "e1", "e2", "e3"]
    rows = [[int(x) for x in line.split()] for line in lines[start + 2 : start + 4]]
    assert [r[0] for r in rows] == [0, 1]
    for layer, row in enumerate(rows):
        assert sum(row[1:]) == 2 * len(reply.token_ids)
        assert row[1:] == [sum(e in tok[layer] for tok in reply.experts) for e in range(4)]
    assert sum(line.startswith("experts:") for line in lines) == 1  # off after /experts off

    rc, text = drive(namespace("-m", str(model)), "/experts on" + ENTER + "/bye" + ENTER)
    assert rc == 0 and "the expert view does not apply" in text


def test_system_prompt_and_save(model):
    ns = namespace("-m", str(model), "--temperature", "0", "--max-tokens", "2")
    keys = ["/save", "/system Be brief.", "hi", "/system Be kind.", "/system", "/save", "/bye"]
    rc, text = drive(ns, ENTER.join(keys) + ENTER)
    assert rc == 0 and "nothing to save yet" in text and "system prompt: Be kind." in text
    conv = store().latest()
    assert conv.system == "Be kind." and f"saved as {conv.id}" in text
    engine = Engine.load(model, dtype="fp32", warm=False)
    assert store().messages(conv.id)[1].timings["cached_tokens"] == 0
    assert len(encode_chat(engine.tokenizer, [Message("user", "hi")], "Be brief.")) > len(
        encode_chat(engine.tokenizer, [Message("user", "hi")]))


def test_no_save_writes_nothing(model):
    ns = namespace("-m", str(model), "--temperature", "0", "--max-tokens", "2", "--no-save")
    rc, text = drive(ns, ENTER.join(["private", "/save", "/list", "/bye"]) + ENTER)
    assert rc == 0 and "not saved: --no-save" in text and "no conversations yet" in text
    assert not paths.store_path().exists()
    assert not paths.input_history_path().exists() or "private" not in paths.input_history_path().read_text()


def test_wants_plain_on_a_dumb_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("TERM", "dumb")
    assert repl.wants_plain(Tty(), Tty())
    monkeypatch.setenv("TERM", "xterm-256color")
    assert not repl.wants_plain(Tty(), Tty())
    assert repl.wants_plain(io.StringIO(), Tty())


def test_dumb_terminal_prompt_keeps_the_line_mode_keys(model, monkeypatch, capfd):
    """With TERM=dumb PromptSession switches to its plain-text prompt, whose own Enter and Ctrl+C
    bindings would otherwise win over the REPL's."""
    monkeypatch.setenv("TERM", "dumb")
    ns = namespace("-m", str(model), "--temperature", "0", "--max-tokens", "2")
    out = io.StringIO()
    with create_pipe_input() as inp, deadline(120):
        inp.send_text("one\\" + ENTER + "two" + ENTER + "abc" + CTRL_C + CTRL_C + CTRL_C)
        rc = repl.run(ns, input=inp, out=out)
    assert rc == 0 and out.getvalue().count("Ctrl+C again") == 1
    msgs = store().messages(store().latest().id)
    assert [m.content for m in msgs if m.role == "user"] == ["one\ntwo"]
    screen = capfd.readouterr().out
    assert ">>> one\\\n... two" in screen and "abc^C\r\n>>> " in screen and "\x1b[" not in screen
