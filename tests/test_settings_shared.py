"""One settings file for every front end: one-shot answers and line mode start from settings.json
as the app does. A flag given now wins, then a value the user saved (a key the file holds), then
the release folder's recommendation (the demo recommends temperature 0.8), then the defaults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mixchat import paths, settings
from mixchat.errors import MixchatError
from mixchat.settings import Settings, apply_recommended, choose, load_with_keys, settings_path

DEMO = paths.demo_model()


def write_settings(raw) -> None:
    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw), encoding="utf-8")


def test_load_with_keys_tells_saved_values_from_defaults():
    assert load_with_keys() == (Settings(), frozenset())  # no file
    write_settings({"temperature": 0, "system": "Be brief.", "not_a_setting": 3})
    s, keys = load_with_keys()
    assert keys == {"temperature", "system"} and s.temperature == 0 and s.top_p == Settings().top_p
    assert settings.load() == s
    for broken in ("{not json", '["a list"]', json.dumps({"when_full": "sometimes"}), json.dumps({"top_k": -1})):
        write_settings(broken)
        assert load_with_keys() == (Settings(), frozenset()), broken  # a broken file never stops a front end


def test_choose_follows_one_rule():
    saved, keys = Settings(temperature=0.0, top_p=0.5), frozenset({"temperature"})
    recommended = {"temperature": 0.8, "top_p": 0.9, "repeat_penalty": 1.15}
    assert choose("temperature", {"temperature": 0.3}, saved, keys, recommended) == (0.3, "flag")
    assert choose("temperature", {"temperature": None}, saved, keys, recommended) == (0.0, "saved")
    assert choose("top_p", {}, saved, keys, recommended) == (0.9, "recommended")  # 0.5 was not saved
    assert choose("top_k", {}, saved, keys, recommended) == (0, "default")
    app = apply_recommended(Settings(temperature=0.0), keys, {**recommended, "system": "ignored"})
    assert (app.temperature, app.top_p, app.repeat_penalty, app.system) == (0.0, 0.9, 1.15, "")


def test_when_full_is_a_setting_checked_like_the_others():
    assert Settings().when_full == "drop"
    Settings(when_full="stop").check()
    with pytest.raises(MixchatError, match="when_full 'sometimes': use drop .* or stop"):
        Settings(when_full="sometimes").check()
    settings.save(Settings(when_full="stop"))
    assert load_with_keys()[0].when_full == "stop"


def ask(*args: str) -> list[int]:
    """`echo hi | mixchat ARGS` on the demo model: the reply's token ids."""
    proc = subprocess.run([sys.executable, "-m", "mixchat", "-m", str(DEMO), "--dtype", "fp32", "--no-save", "--json",
                           "--max-tokens", "24", *args], input=b"hi", capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line)["token"] for line in proc.stdout.decode().splitlines()[:-1]]


def test_saved_sampling_wins_over_the_demos_recommendation_and_flags_win_over_both():
    assert DEMO is not None, "the demo model ships with the checkout (assets/demo)"
    # No settings file: the demo's recommendation (temperature 0.8, top-p 0.9, penalty 1.15) applies.
    recommended = ask("--seed", "1")
    assert recommended == ask("--seed", "1", "--temperature", "0.8", "--top-p", "0.9", "--repeat-penalty", "1.15")
    greedy = ask("--temperature", "0", "--repeat-penalty", "1.15")  # the recommended penalty still applies
    assert recommended != greedy

    write_settings({"temperature": 0})  # saved by the user: wins over the folder's 0.8
    assert ask("--seed", "1") == greedy and ask("--seed", "2") == greedy
    assert ask("--seed", "1", "--temperature", "0.8") == recommended  # a flag given now wins

    # A value the user saved, even the default, is still theirs: penalty 1 here is pure greedy.
    write_settings({"temperature": 0, "repeat_penalty": 1.0})
    assert ask("--seed", "3") == ask("--temperature", "0", "--repeat-penalty", "1")


def test_one_shot_loads_the_model_as_the_app_saved_it():
    # the app's F2 sheet saved int4-64: a one-shot answer quantizes the same way, unless a flag says otherwise
    from mixchat.speed import quant

    write_settings({"quant": "int4-64", "temperature": 0})
    ask()
    assert [p.name.split("-", 1)[1] for p in quant.cache_dir().glob("*.safetensors")] == ["int4-g64.safetensors"]
    for p in quant.cache_dir().glob("*.safetensors"):
        p.unlink()
    ask("--quant", "none")
    assert not list(quant.cache_dir().glob("*.safetensors"))  # a flag given now wins over the saved value


def test_line_mode_starts_from_the_saved_settings(make_release):
    from conftest import tiny_args
    from test_repl import ENTER, drive, errors, namespace

    from mixchat.conversations.store import Store

    args = tiny_args()
    model = make_release(args, seed=5, std=0.15, params={**args.to_params(), "max_seq_len": 96})
    write_settings({"temperature": 0, "top_k": 7, "system": "Be brief.", "when_full": "stop"})
    lines = ["/set", *(f"tell me about the sea, day {i}" for i in range(12)), "/bye"]
    rc, text = drive(namespace("-m", str(model), "--max-tokens", "6"), ENTER.join(lines) + ENTER)
    assert rc == 0
    assert "temperature=0 " in text.replace("temperature=0.0", "temperature=0") and "top_k=7" in text
    store = Store(paths.store_path())
    conv = store.latest()
    assert conv.system == "Be brief."
    errs = errors(text)
    assert errs and all("--when-full drop" in e for e in errs), text  # the saved "stop" refuses when full
    assert conv.context_start == 0

    # Flags given now win: --system and --temperature; a new conversation.
    rc, text = drive(namespace("-m", str(model), "--max-tokens", "6", "--system", "Be long.", "--temperature", "0.5"),
                     ENTER.join(["/set", "hello", "/bye"]) + ENTER)
    assert rc == 0 and "temperature=0.5" in text and "top_k=7" in text
    assert store.latest().system == "Be long."


def test_one_shot_answers_with_the_model_saved_in_the_settings(make_release, tmp_path, monkeypatch):
    from conftest import tiny_args

    from mixchat.conversations.store import Store

    monkeypatch.delenv("MIXCHAT_MODEL", raising=False)
    model = make_release(tiny_args(), seed=5, std=0.15)

    def one_shot(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mixchat", "--max-tokens", "3", *args], input=b"hi",
                              capture_output=True, timeout=120)

    write_settings({"model": str(model)})  # chosen in the app's settings (F2): no --model now
    proc = one_shot()
    assert proc.returncode == 0, proc.stderr
    assert Store(paths.store_path()).latest().model_path == str(model)  # not the demo

    gone = tmp_path / "moved away"
    write_settings({"model": str(gone)})
    proc = one_shot("--no-save")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "saved in the settings" in err and str(gone) in err and "--model DIR" in err
    proc = one_shot("--no-save", "-m", str(DEMO))  # a flag given now wins over the saved folder
    assert proc.returncode == 0, proc.stderr


def test_a_saved_quant_that_cannot_apply_is_blamed_on_the_settings(make_release, monkeypatch):
    from conftest import tiny_args

    from mixchat.release.inspection import inspect_release

    model = make_release(tiny_args(), seed=5, std=0.15)  # dim 64: groups of 128 cannot divide it
    assert "int4-128" not in inspect_release(model)["memory_estimate_bytes"]  # not offered where it cannot apply
    assert "int4-32" in inspect_release(model)["memory_estimate_bytes"]
    write_settings({"quant": "int4"})
    proc = subprocess.run([sys.executable, "-m", "mixchat", "-m", str(model), "--no-save", "-p", "hi"],
                          capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "do not divide" in err and "choose int4-32" in err  # the largest group that fits, as inspect offers
    assert f"the saved settings, {settings_path()}, chose --quant int4" in err
    proc = subprocess.run([sys.executable, "-m", "mixchat", "-m", str(model / "nowhere"), "--no-save", "-p", "hi"],
                          capture_output=True, timeout=120)
    assert proc.returncode == 2 and "saved settings" not in proc.stderr.decode()  # not blamed for what they did not do
    proc = subprocess.run([sys.executable, "-m", "mixchat", "-m", str(model), "--no-save", "--quant", "int4-32",
                           "--max-tokens", "2", "-p", "hi"], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr  # a flag given now overrides the saved choice


def test_a_settings_value_that_does_not_check_out_is_named_and_the_rest_kept(make_release, tmp_path, monkeypatch):
    """One bad value used to throw every saved setting away without a word (the saved model too), and the app's
    next save overwrote the file: now the bad value alone is left out and named, and an unreadable file is kept
    aside before a save writes a new one."""
    import os
    import stat

    from conftest import tiny_args

    from mixchat.conversations.store import Store

    monkeypatch.delenv("MIXCHAT_MODEL", raising=False)
    model = make_release(tiny_args(), seed=5, std=0.15)
    write_settings({"model": str(model), "temperature": "hot", "top_k": 3, "from_a_newer_mixchat": True})
    s, keys, problems = settings.read()
    assert s.model == str(model) and s.top_k == 3 and s.temperature == Settings().temperature
    assert keys == {"model", "top_k"} and len(problems) == 1 and "temperature 'hot'" in problems[0]
    proc = subprocess.run([sys.executable, "-m", "mixchat", "--max-tokens", "2", "-p", "hi"], capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Store(paths.store_path()).latest().model_path == str(model)  # the saved model is still the one used
    err = proc.stderr.decode()
    assert "temperature 'hot'" in err and str(settings_path()) in err and "Traceback" not in err

    assert settings.save(s) is None  # a readable file: rewritten, keeping what this mixchat does not know
    assert json.loads(settings_path().read_text())["from_a_newer_mixchat"] is True
    assert stat.S_IMODE(os.stat(settings_path()).st_mode) == 0o600  # it holds the system prompt

    write_settings('{"model": "/somewhere", "temperature": ')  # cut short
    s, keys, problems = settings.read()
    assert s == Settings() and "not valid JSON" in problems[0]
    note = settings.save(Settings(top_k=5))
    (aside,) = settings_path().parent.glob("settings.json.unreadable-*")
    assert str(aside) in note and aside.read_text() == '{"model": "/somewhere", "temperature": '  # nothing lost
    assert settings.read()[0].top_k == 5


def test_an_input_history_an_older_mixchat_left_readable_is_made_private(tmp_path):
    import os

    from mixchat.frontends.tui import history

    path = paths.input_history_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n# 2026-01-01\n+an old prompt\n")
    os.chmod(path, 0o644)
    history.append("a new one")
    assert path.stat().st_mode & 0o777 == 0o600 and history.load() == ["an old prompt", "a new one"]
