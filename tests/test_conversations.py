"""Saved conversations through the command line: continue with the cache, crash safety, and the
list / show / export / rm / rename commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_args
from test_cli import mixchat, one_error_line

from mixchat.conversations.store import Store, short_id
from mixchat.engine.engine import Engine
from mixchat.engine.generation import Session
from mixchat.engine.sampling import SamplingSettings
from mixchat.text.chat_format import Message, encode_chat

ARGS = ["--dtype", "fp32", "--temperature", "0", "--repeat-penalty", "1", "--json"]


@pytest.fixture
def model(make_release):
    return make_release(tiny_args(sliding_window=24), seed=31, std=0.15)


def ask(*args, text: str) -> tuple[list[dict], dict, subprocess.CompletedProcess]:
    proc = mixchat(*args, stdin=text.encode())
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.decode().splitlines()]
    return lines[:-1], lines[-1], proc


def store() -> Store:
    return Store(__import__("mixchat.paths", fromlist=["x"]).store_path())


def test_continue_reuses_the_saved_cache_and_matches_a_fresh_run(model):
    t1, d1, _ = ask("-m", str(model), *ARGS, "--max-tokens", "10", text="Where do rivers go?")
    t2, d2, _ = ask("-c", *ARGS, "--max-tokens", "10", text="And the rain?")
    first_exchange = len(d1["prompt_tokens"]) + d1["generated_tokens"]
    assert d2["conversation"] == d1["conversation"]
    assert d2["cached_tokens"] == first_exchange
    assert d2["prefilled_tokens"] == len(d2["prompt_tokens"]) - first_exchange
    assert d2["prefilled_tokens"] < 20

    engine = Engine.load(model, dtype="fp32", warm=False)
    reply1 = [t["token"] for t in t1]
    history = [Message("user", "Where do rivers go?"), Message("assistant", "", ids=reply1),
               Message("user", "And the rain?")]
    prompt = encode_chat(engine.tokenizer, history)
    assert prompt == d2["prompt_tokens"]
    fresh = list(Session(engine).generate(prompt, SamplingSettings(temperature=0, repeat_penalty=1.0,
                                                                   max_tokens=10)))[-1]
    assert fresh.generated == [t["token"] for t in t2]

    s = store()
    msgs = s.messages(d1["conversation"])
    assert [m.role for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[1].token_ids == reply1 and msgs[3].stop in ("eos", "length") and msgs[3].timings


def test_cid_with_another_model_does_not_use_the_cache_with_a_note(model, make_release):
    _, d1, _ = ask("-m", str(model), *ARGS, "--max-tokens", "4", text="hello")
    other = make_release(tiny_args(sliding_window=24), seed=99, std=0.15)
    # Opened with the other model, refused before a token (too long): the first model's cache is still there.
    proc = mixchat("--cid", d1["conversation"][:12], "-m", str(other), "--context", "64", *ARGS,
                   stdin=("word " * 200).encode())
    assert proc.returncode != 0 and "context holds" in proc.stderr.decode()
    _, d1b, _ = ask("-c", *ARGS, "--max-tokens", "4", text="still yours")
    assert d1b["cached_tokens"] == len(d1["prompt_tokens"]) + d1["generated_tokens"]
    d1 = d1b
    _, d2, proc = ask("--cid", d1["conversation"][:12], "-m", str(other), *ARGS, "--max-tokens", "4", text="again")
    err = proc.stderr.decode()
    assert "was held with another model" in err and "made by another model" in err
    assert d2["cached_tokens"] == 0 and d2["prefilled_tokens"] == len(d2["prompt_tokens"])
    # Its latest turn and its cache are the other model's now: the store names that model, so `-c`
    # goes on with it (re-using the cache it wrote, not asked about the first model), and `list` shows it.
    conv = store().get(d1["conversation"])
    assert conv.model_path == str(other.resolve()) and conv.model_path != str(model.resolve())
    _, d3, proc = ask("-c", *ARGS, "--max-tokens", "4", text="and again")
    assert "another model" not in proc.stderr.decode()
    assert d3["cached_tokens"] == len(d2["prompt_tokens"]) + d2["generated_tokens"]
    assert other.name in mixchat("list").stdout.decode()


def test_truncated_cache_file_is_rebuilt(model):
    from mixchat import paths

    _, d1, _ = ask("-m", str(model), *ARGS, "--max-tokens", "4", text="hello")
    kv = paths.kv_dir() / f"{d1['conversation']}.safetensors"
    kv.write_bytes(kv.read_bytes()[:100])
    _, d2, proc = ask("-c", *ARGS, "--max-tokens", "4", text="again")
    assert "damaged" in proc.stderr.decode() and d2["cached_tokens"] == 0
    assert kv.exists()  # written anew after the turn


def test_kill_9_mid_reply_keeps_every_message(model):
    _, d1, _ = ask("-m", str(model), *ARGS, "--max-tokens", "5", text="first question")
    proc = subprocess.Popen([sys.executable, "-m", "mixchat", "-c", "--dtype", "fp32", "--json", "--temperature", "1",
                             "--seed", "1", "--max-tokens", "100000", "-p", "second question"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    seen = []
    deadline = time.time() + 60
    while len(seen) < 30 and time.time() < deadline:
        seen.append(json.loads(proc.stdout.readline())["token"])
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    msgs = store().messages(d1["conversation"])
    assert [m.content for m in msgs[:3] if m.role == "user"] == ["first question", "second question"]
    assert msgs[1].stop in ("eos", "length")
    partial = msgs[3]
    assert partial.role == "assistant" and partial.stop is None
    n = min(len(partial.token_ids), len(seen))
    assert partial.token_ids[:n] == seen[:n] and len(partial.token_ids) >= len(seen) - 8
    shown = mixchat("show", d1["conversation"]).stdout.decode()
    assert "[unfinished: the process stopped while writing]" in shown and "second question" in shown


def test_ctrl_c_saves_the_partial_reply_as_stopped(model):
    proc = subprocess.Popen([sys.executable, "-m", "mixchat", "-m", str(model), "--json", "--temperature", "1",
                             "--max-tokens", "100000", "-p", "talk"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(5):
        proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    done = json.loads(out.decode().splitlines()[-1])
    reply = store().messages(done["conversation"])[-1]
    assert reply.stop == "interrupted" and len(reply.token_ids) == done["generated_tokens"] >= 5


def test_list_show_export_rename_rm(model):
    from mixchat import paths

    _, d, _ = ask("-m", str(model), *ARGS, "--max-tokens", "3", "--system", "Be kind.", text="Tell me a joke")
    cid = d["conversation"]
    listing = mixchat("list").stdout.decode()
    assert short_id(cid) in listing and "Tell me a joke" in listing and model.name in listing

    md = mixchat("export", cid, "--format", "markdown").stdout.decode()
    assert md.startswith("# Tell me a joke") and "## user\n\nTell me a joke" in md and "system prompt: Be kind." in md
    js = json.loads(mixchat("export", cid[:10], "--format", "json").stdout)
    assert js["id"] == cid and [m["role"] for m in js["messages"]] == ["user", "assistant"]
    assert js["messages"][1]["token_ids"] and js["system"] == "Be kind."

    assert mixchat("rename", cid, "Jokes").returncode == 0
    assert "Jokes" in mixchat("list").stdout.decode()
    kv = paths.kv_dir() / f"{cid}.safetensors"
    assert kv.exists()
    assert mixchat("rm", cid).returncode == 0
    assert not kv.exists() and short_id(cid) not in mixchat("list").stdout.decode()
    proc = mixchat("show", cid)
    assert proc.returncode == 2 and "no conversation" in one_error_line(proc)


def test_no_save_and_corrupt_store(model):
    from mixchat import paths

    _, d, _ = ask("-m", str(model), *ARGS, "--max-tokens", "2", "--no-save", text="private")
    assert d["conversation"] is None and not paths.store_path().exists()
    proc = mixchat("-c", "-p", "x")
    assert proc.returncode == 2
    paths.store_path().parent.mkdir(parents=True, exist_ok=True)
    paths.store_path().write_bytes(b"garbage" * 200)
    proc = mixchat("list")
    assert proc.returncode == 2 and "cannot open the conversation store" in one_error_line(proc)


def test_json_output_escapes_every_control_character_c1_included(model):
    """`--json` and `export --format json` keep the exact text, but no byte of it may act on a terminal that shows
    the JSON: U+009B is CSI to some terminals, and json.dumps(ensure_ascii=False) left it raw."""
    from mixchat.safetext import json_text

    text = "csi \x9b2J esc \x1b[2J del \x7f é 🌊"
    assert json.loads(json_text({"t": text})) == {"t": text}
    assert not any(0x7f <= ord(c) <= 0x9f or ord(c) < 0x20 for c in json_text({"t": text}, indent=2).replace("\n", ""))
    assert "é 🌊" in json_text(text)  # other text stays readable
    proc = mixchat("-m", str(model), *ARGS, "--max-tokens", "2", "-p", text)  # ARGS hold --json
    assert proc.returncode == 0 and not any(0x7f <= ord(c) <= 0x9f for c in proc.stdout.decode())
    cid = json.loads(proc.stdout.decode().splitlines()[-1])["conversation"]
    raw = mixchat("export", cid, "--format", "json").stdout.decode()
    assert "\\u009b" in raw and "\x9b" not in raw and json.loads(raw)["messages"][0]["content"] == text


def test_continuing_a_conversation_whose_folder_has_gone_says_so(model, make_release, tmp_path):
    """-c when the model that last wrote the conversation has been moved: one line naming the conversation, the
    folder and the way on (it said only "no such folder", as if the user had typed it); -m goes on."""
    folder = make_release(tiny_args(sliding_window=24), seed=7, std=0.15)
    _, d1, _ = ask("-m", str(folder), *ARGS, "--max-tokens", "4", text="hello")
    folder.rename(tmp_path / "moved")
    proc = mixchat("-c", *ARGS, stdin=b"again")  # (line mode asks the same oneshot.model_for)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert short_id(d1["conversation"]) in err and str(folder) in err and "--model DIR" in err, err
    _, d2, _ = ask("-c", "-m", str(model), *ARGS, "--max-tokens", "4", text="again")
    assert d2["conversation"] == d1["conversation"]
