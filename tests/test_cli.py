"""The one-shot command end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_args
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixchat.errors import MixchatError
from mixchat.text.tokenizer import Tokenizer

MOE = {"num_experts": 4, "num_experts_per_tok": 2}


@pytest.fixture
def mixtral(make_release):
    return make_release(tiny_args(moe=MOE, n_layers=3), "torrent", seed=1, std=0.15)


def mixchat(*args, stdin: bytes | None = b"", timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixchat", *args], input=stdin, capture_output=True, timeout=timeout)


def one_error_line(proc) -> str:
    err = proc.stderr.decode()
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mixchat: error: ")
    return lines[0]


def test_piped_stdin_answers_on_stdout(mixtral):
    proc = mixchat("--model", str(mixtral), "--max-tokens", "12", "--seed", "3", stdin=b"What is a dragon?\n")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert out.endswith("\n") and len(out.strip()) > 0
    assert proc.stderr == b""  # stats only for a terminal or with --stats


def test_json_lines_and_summary(mixtral):
    text = "Tell me about the sea 🌊"
    proc = mixchat("--model", str(mixtral), "--json", "--temperature", "0", "--max-tokens", "10", "--stats",
                   stdin=text.encode())
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    tokens, done = lines[:-1], lines[-1]
    expected_prompt = MistralTokenizer.v1().encode_chat_completion(
        ChatCompletionRequest(messages=[UserMessage(content=text)])).tokens
    assert done["done"] is True and done["prompt_tokens"] == expected_prompt
    assert done["cached_tokens"] == 0 and done["prefilled_tokens"] == len(expected_prompt)
    assert done["generated_tokens"] == len(tokens) and done["stop"] in ("eos", "length")
    assert done["prefill_tokens_per_second"] > 0 and done["decode_tokens_per_second"] > 0
    # drafting's counts: every pass gives one token and the drafted ones it kept
    assert 0 <= done["accepted_tokens"] <= done["drafted_tokens"]
    assert done["decode_passes"] + done["accepted_tokens"] == done["generated_tokens"]
    for t in tokens:
        assert set(t) == {"token", "text", "experts"}
        assert len(t["experts"]) == 3 and all(len(pair) == 2 and pair[0] != pair[1] for pair in t["experts"])
    tok = Tokenizer(mixtral / "tokenizer.model")
    assert "".join(t["text"] for t in tokens) == tok.decode([t["token"] for t in tokens])
    stats = proc.stderr.decode().strip().splitlines()
    assert len(stats) == 1 and "tok/s" in stats[0] and "stop:" in stats[0]


def test_dense_json_has_no_experts(make_release):
    folder = make_release(tiny_args(sliding_window=8))
    proc = mixchat("-m", str(folder), "-p", "hi", "--json", "--max-tokens", "3", stdin=None)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.decode().splitlines()]
    assert len(lines) >= 2 and lines[-1]["done"]
    assert all(set(t) == {"token", "text"} for t in lines[:-1])


def test_raw_is_bos_plus_text(mixtral):
    proc = mixchat("-m", str(mixtral), "--raw", "-p", "Once upon a time", "--json", "--max-tokens", "2")
    done = json.loads(proc.stdout.decode().splitlines()[-1])
    tok = Tokenizer(mixtral / "tokenizer.model")
    assert done["prompt_tokens"] == [1] + tok.encode("Once upon a time", bos=False)


def test_system_prompt_goes_where_mistral_common_puts_it(mixtral):
    from mistral_common.protocol.instruct.messages import SystemMessage

    proc = mixchat("-m", str(mixtral), "--system", "Be brief.", "-p", "Hi", "--json", "--max-tokens", "1")
    done = json.loads(proc.stdout.decode().splitlines()[-1])
    assert done["prompt_tokens"] == MistralTokenizer.v1().encode_chat_completion(
        ChatCompletionRequest(messages=[SystemMessage(content="Be brief."), UserMessage(content="Hi")])).tokens


def test_same_seed_same_answer(mixtral):
    a = mixchat("-m", str(mixtral), "--seed", "7", "--max-tokens", "15", stdin=b"hello")
    b = mixchat("-m", str(mixtral), "--seed", "7", "--max-tokens", "15", stdin=b"hello")
    assert a.stdout == b.stdout and a.returncode == b.returncode == 0


@pytest.mark.parametrize("stdin, words", [
    (b"", "stdin is empty"),
    (b"  \n\t\n", "stdin is empty"),
    (b"caf\xe9 au lait", "stdin is not UTF-8 (byte 0xe9 at offset 3)"),
])
def test_bad_stdin(mixtral, stdin, words):
    proc = mixchat("-m", str(mixtral), stdin=stdin)
    assert proc.returncode == 2 and words in one_error_line(proc)
    assert proc.stdout == b""


def test_prompt_over_the_context(make_release):
    args = tiny_args(sliding_window=8)
    params = {**args.to_params(), "max_seq_len": 32}
    folder = make_release(args, params=params)
    proc = mixchat("-m", str(folder), stdin=("word " * 100).encode())
    assert proc.returncode == 2 and "the context holds" in one_error_line(proc)


def test_no_model_and_bad_flags(mixtral, tmp_path, monkeypatch, capsys):
    from mixchat import paths
    from mixchat.frontends import cli

    monkeypatch.delenv("MIXCHAT_MODEL", raising=False)
    monkeypatch.setattr(paths, "demo_model", lambda: None)  # a checkout without the demo model
    assert cli.main(["-p", "hi"]) == 2
    assert "no model given" in capsys.readouterr().err
    proc = mixchat("-m", str(mixtral), "-p", "hi", "--top-p", "1.5")
    assert proc.returncode == 2 and "--top-p 1.5" in one_error_line(proc)
    proc = mixchat("-m", str(tmp_path / "nowhere"), "-p", "hi")
    assert proc.returncode == 2 and "nowhere: no such folder" in one_error_line(proc)


def test_sigint_stops_keeps_the_partial_answer_and_exits_130(mixtral):
    proc = subprocess.Popen([sys.executable, "-m", "mixchat", "-m", str(mixtral), "--json", "--max-tokens", "100000",
                             "--temperature", "1", "-p", "go on forever"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    deadline = time.time() + 60
    while len(lines) < 5 and time.time() < deadline:
        lines.append(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    all_lines = [json.loads(x) for x in b"".join(lines + [rest]).decode().splitlines()]
    done = all_lines[-1]
    assert done["done"] and done["stop"] == "interrupted"
    assert done["generated_tokens"] == len(all_lines) - 1 >= 5


def test_sampling_recommended_in_params_json_applies_unless_a_flag_overrides(make_release):
    args = tiny_args(sliding_window=8)
    params = {**args.to_params(), "mixchat": {"sampling": {"temperature": 0, "max_tokens": 6}}}
    folder = make_release(args, params=params, seed=8, std=0.15)

    def tokens(*flags) -> list[int]:
        out = mixchat("-m", str(folder), "--no-save", "--json", "-p", "hello", *flags).stdout.decode()
        return [json.loads(line)["token"] for line in out.splitlines()[:-1]]

    runs = [tokens() for _ in range(2)]
    # No seed given, yet identical and equal to explicit greedy: the recommendation made it greedy.
    assert runs[0] == runs[1] == tokens("--temperature", "0", "--max-tokens", "6")
    assert len(runs[0]) <= 6
    assert tokens("--temperature", "0", "--max-tokens", "9")[: len(runs[0])] == runs[0]


# -- the command line's shape: a positional PROMPT beside the commands, --when-full ---------------------


@pytest.mark.parametrize("argv, command, prompt", [
    (["What is a dragon?"], None, "What is a dragon?"),
    (["list"], "list", None),
    (["search", "sea"], "search", None),
    (["import", "a.json"], "import", None),
    (["rm", "abcd"], "rm", None),
    (["-m", "list", "show", "abcd"], "show", None),  # `list` is -m's value: `show` is the first positional
    (["--model", "search", "why?"], None, "why?"),
    (["--model=x", "export", "abcd"], "export", None),
    (["--temp", "0", "list"], "list", None),  # argparse's abbreviation of --temperature takes a value
    (["-mDIR", "hi"], None, "hi"),
    (["-im", "DIR", "hi"], None, "hi"),
    (["-c", "--cid", "abcd", "and then?"], None, "and then?"),
    (["--", "list"], None, "list"),  # after --, even a command's name is the prompt
    (["--", "-5 degrees?"], None, "-5 degrees?"),
    (["-p", "list"], None, None),
    ([], None, None),
])
def test_a_first_positional_that_names_a_command_is_that_command(argv, command, prompt):
    from mixchat.frontends.cli import COMMANDS, parse_args

    assert {"list", "show", "export", "rm", "rename", "search", "import", "inspect", "verify", "bench"} == set(COMMANDS)
    ns = parse_args(argv)
    assert getattr(ns, "command", None) == command and getattr(ns, "prompt_text", None) == prompt


def test_every_command_still_parses():
    from mixchat.frontends.cli import parse_args

    for argv, func in [(["inspect", "d"], "_inspect"), (["verify", "d"], "_verify"), (["list"], "_list"),
                       (["show", "abcd"], "_show"), (["export", "abcd", "--format", "json"], "_show"),
                       (["rm", "abcd"], "_rm"), (["rename", "abcd", "t"], "_rename"), (["search", "x", "-n", "3"],
                       "_search"), (["import", "f.json"], "_import"), (["bench", "-m", "d"], "_bench")]:
        assert parse_args(argv).func.__name__ == func, argv


def test_when_full_is_parsed_and_checked(capsys):
    from mixchat.frontends.cli import parse_args

    assert parse_args(["-p", "x"]).when_full is None
    assert parse_args(["--when-full", "drop", "q"]).when_full == "drop"
    assert parse_args(["--when-full", "stop", "-i"]).when_full == "stop"
    with pytest.raises(MixchatError, match="invalid choice: 'later'") as refused:
        parse_args(["--when-full", "later", "q"])
    assert refused.value.exit_code == 2 and capsys.readouterr().err == ""  # main prints it, as one line


def test_help_says_how_a_prompt_and_a_command_are_told_apart():
    out = mixchat("--help").stdout.decode()
    assert "[PROMPT]" in out and "is that command" in out and "mixchat -- list" in out and "--when-full" in out


def test_a_positional_prompt_is_answered_like_p(mixtral):
    flags = ["-m", str(mixtral), "--no-save", "--json", "--temperature", "0", "--max-tokens", "6"]
    by_p = mixchat(*flags, "-p", "What is a dragon?", stdin=None)
    positional = mixchat(*flags, "What is a dragon?", stdin=None)
    assert by_p.returncode == positional.returncode == 0, positional.stderr
    lines = [[json.loads(line) for line in proc.stdout.decode().splitlines()] for proc in (by_p, positional)]
    assert lines[0][:-1] == lines[1][:-1] and len(lines[0]) > 1  # the same tokens (greedy)
    assert lines[0][-1]["prompt_tokens"] == lines[1][-1]["prompt_tokens"]
    proc = mixchat(*flags, "-p", "one", "two")
    assert proc.returncode == 2 and "given twice, as PROMPT and with -p" in one_error_line(proc)
    proc = mixchat(*flags, "caf\udce9".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape"))
    assert proc.returncode == 2 and "PROMPT is not UTF-8 (byte 0xe9" in one_error_line(proc)


def test_when_full_reaches_the_apps_settings(monkeypatch):
    """_interactive hands --when-full to the app's Settings (once settings.py has the field)."""
    import dataclasses

    from mixchat import settings as settings_mod
    from mixchat.frontends import cli, repl
    from mixchat.frontends.tui import app as app_mod

    with_field = settings_mod.Settings if hasattr(settings_mod.Settings(), "when_full") else \
        dataclasses.make_dataclass("WithWhenFull", [("when_full", str, "drop")], bases=(settings_mod.Settings,))
    seen = []

    class FakeApp:
        return_code = 0

        def __init__(self, settings, **kw) -> None:
            seen.append(settings)

        def run(self) -> None:
            pass

    monkeypatch.setattr(repl, "wants_plain", lambda: False)
    monkeypatch.setattr(app_mod, "MixchatApp", FakeApp)
    for load, argv, expected in [(with_field, ["--when-full", "stop"], "stop"), (with_field, [], "drop")]:
        monkeypatch.setattr(settings_mod, "load", load)
        ns = cli.parse_args(["-m", "somewhere", *argv])
        assert cli._interactive(ns, None) == 0
        assert getattr(seen[-1], "when_full", None) == expected


def test_plain_line_mode_refuses_a_pipe_instead_of_sending_it_as_one_message(mixtral):
    proc = mixchat("--plain", "--model", str(mixtral), stdin=b"hello\nsecond message\n/bye\n")
    assert proc.returncode == 2 and "--plain is the line mode" in one_error_line(proc)
    assert mixchat("list").stdout.decode().startswith("no conversations")  # nothing was sent or saved


@pytest.mark.parametrize("args, words", [
    (["--temperature"], "--temperature: expected one argument (see mixchat --help)"),
    (["--bogus", "-p", "hi"], "unrecognized arguments: --bogus"),
    (["--quant", "int3", "-p", "hi"], "invalid choice: 'int3'"),
    (["bench", "--runs", "x"], "--runs: invalid int value: 'x' (see mixchat bench --help)"),
    (["rm"], "required: id (see mixchat rm --help)"),
])
def test_a_bad_flag_is_one_line_naming_the_help(args, words):
    proc = mixchat(*args)
    assert proc.returncode == 2 and proc.stdout == b""
    assert words in one_error_line(proc)


def test_an_empty_cid_is_refused_not_a_new_conversation(mixtral, tmp_path):
    from mixchat import paths
    from mixchat.conversations.store import Store

    for args in (["--cid", ""], ["--cid", "  "], ["--plain", "--cid", ""]):
        proc = mixchat("--model", str(mixtral), "--max-tokens", "2", *args, "-p", "hi")
        assert proc.returncode == 2 and "--cid is empty" in one_error_line(proc)
    assert not paths.store_path().exists() or Store(paths.store_path()).list() == []
