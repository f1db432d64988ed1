"""Loading release folders: the three layouts, zero-copy mapping, and every bad input failing with
one clear line through the real command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

from mixchat.dev.synthetic import mistral_common_tokenizer, write_release_file
from mixchat.engine.engine import Engine

MOE = {"num_experts": 4, "num_experts_per_tok": 2}


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixchat", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("layout, moe", [("dense", None), ("torrent", MOE), ("experts", MOE)])
@pytest.mark.parametrize("safetensors", [False, True], ids=["pth", "safetensors"])
def test_each_layout_loads_without_copying_the_weights(make_release, layout, moe, safetensors):
    args = tiny_args(moe=moe, sliding_window=None if moe else 16)
    folder = make_release(args, layout, safetensors=safetensors)
    engine = Engine.load(folder, dtype="bf16", warm=False, huge_pages=False)  # pinning copies on purpose
    assert engine.layout == layout
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    weights = str(engine.release.weights)
    regions = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps if len(m) >= 6 and m[5] == weights]
    assert regions, "the weights file is not memory-mapped"
    params = list(engine.model.parameters())
    n_experts = moe["num_experts"] if moe else 0
    assert len(params) == 3 + args.n_layers * (6 + (1 + 3 * n_experts if moe else 3))
    for p in params:
        assert any(lo <= p.data_ptr() < hi for lo, hi in regions), "a parameter was copied out of the mapped file"


def test_loading_progress_reads_the_file_once(make_release, capsys):
    folder = make_release(tiny_args())
    Engine.load(folder, dtype="bf16", warm=True, show_progress=True)
    err = capsys.readouterr().err
    assert "reading consolidated.00.pth" in err and "100%" in err


def test_converting_dtype_shows_progress(make_release, capsys):
    folder = make_release(tiny_args())
    Engine.load(folder, dtype="fp32", show_progress=True, huge_pages=False)
    assert "converting to float32 on cpu" in capsys.readouterr().err
    Engine.load(folder, dtype="fp32", show_progress=True)  # converted as it is copied into huge pages
    err = capsys.readouterr().err
    assert "reading consolidated.00.pth " in err and "100%" in err


# -- bad inputs: one line on stderr, non-zero exit, nothing written ---------------------------------

def _evil_pth(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"tok_embeddings.weight": torch.zeros(2), "x": Payload()}, path)


def _break(folder: Path, how: str, tmp: Path) -> str:
    """Damage a good folder; returns a word the error line must contain."""
    pth = folder / "consolidated.00.pth"
    params = json.loads((folder / "params.json").read_text())
    if how == "no params":
        (folder / "params.json").unlink()
        return "params.json"
    if how == "no weights":
        pth.unlink()
        return "no weights found"
    if how == "no tokenizer":
        (folder / "tokenizer.model").unlink()
        return "tokenizer.model: missing"
    if how == "params not json":
        (folder / "params.json").write_text('{"dim": 64,')
        return "params.json: not valid JSON"
    if how == "params lacks a field":
        del params["hidden_dim"]
        (folder / "params.json").write_text(json.dumps(params))
        return "missing required field(s) hidden_dim"
    if how == "truncated pth":
        data = pth.read_bytes()
        pth.write_bytes(data[: len(data) // 2])
        return "consolidated.00.pth"
    if how == "unsafe pickle":
        _evil_pth(pth, tmp / "pwned")
        return "unsafe unpickling"
    if how == "shapes contradict params":
        params["hidden_dim"] = 128
        (folder / "params.json").write_text(json.dumps(params))
        return "layers.0.feed_forward.w1.weight has shape [96, 64] but params.json implies [128, 64]"
    if how == "vocab disagrees with tokenizer":
        shutil.copyfile(mistral_common_tokenizer("v3"), folder / "tokenizer.model")
        return "has 32768 pieces but"
    if how == "wrong tokenizer file":
        (folder / "tokenizer.model").write_bytes(b"\x00garbage")
        return "not a SentencePiece model"
    if how == "moe weights, dense params":
        return "no 'moe' section"
    raise AssertionError(how)


BAD = ["no params", "no weights", "no tokenizer", "params not json", "params lacks a field", "truncated pth",
       "unsafe pickle", "shapes contradict params", "vocab disagrees with tokenizer", "wrong tokenizer file"]


@pytest.mark.parametrize("how", BAD)
def test_bad_folder_gives_one_clear_line(make_release, tmp_path, how):
    folder = make_release(tiny_args(sliding_window=8))
    words = _break(folder, how, tmp_path)
    before = snapshot(folder)
    proc = run_cli("verify", str(folder), cwd=tmp_path)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("mixchat: error: ") and words in lines[0], lines[0]
    assert snapshot(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no marker from a payload, no stray file


def test_unsafe_pickle_payload_is_real_but_never_runs(tmp_path):
    """The payload runs under an unsafe torch.load, so the refusal above is a real defence."""
    evil, marker = tmp_path / "evil.pth", tmp_path / "marker"
    _evil_pth(evil, marker)
    from mixchat.errors import ReleaseError
    from mixchat.release.folder import open_weights

    with pytest.raises(ReleaseError, match="unsafe unpickling"):
        open_weights(evil)
    assert not marker.exists()
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(evil)!r}, weights_only=False)"],
                   capture_output=True, timeout=120)
    assert marker.exists()


def test_moe_weights_with_dense_params(make_release, tmp_path):
    args = tiny_args(moe=MOE)
    folder = make_release(args, "torrent")
    params = args.to_params()
    del params["moe"]
    (folder / "params.json").write_text(json.dumps(params))
    proc = run_cli("verify", str(folder))
    assert proc.returncode == 2 and "no 'moe' section" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_verify_passes_a_good_folder(make_release):
    folder = make_release(tiny_args())
    proc = run_cli("verify", str(folder))
    assert proc.returncode == 0, proc.stderr
    assert "OK        consolidated.00.pth" in proc.stdout and "all 3 files match RELEASE" in proc.stdout


def test_verify_reports_a_checksum_mismatch(make_release):
    folder = make_release(tiny_args())
    params = folder / "params.json"
    params.write_text(params.read_text().replace('"norm_eps": 1e-05', '"norm_eps": 1e-5'))  # same meaning, other bytes
    before = snapshot(folder)
    proc = run_cli("verify", str(folder))
    assert proc.returncode == 1
    assert "MISMATCH  params.json" in proc.stdout and "OK        consolidated.00.pth" in proc.stdout
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "RELEASE: 1 of 3 files missing or not matching (params.json)" in err[0]
    assert snapshot(folder) == before


@pytest.mark.parametrize("safetensors", [False, True], ids=["pth", "safetensors"])
def test_verify_checks_the_sums_of_a_folder_that_does_not_load(make_release, safetensors):
    # The loader's error for a truncated weight file says to run verify: verify must then say which
    # file differs from RELEASE, not repeat the loader's error.
    folder = make_release(tiny_args(), safetensors=safetensors)
    weights = folder / ("consolidated.safetensors" if safetensors else "consolidated.00.pth")
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    proc = run_cli("verify", str(folder))
    assert proc.returncode == 2, proc.stderr
    assert "FAILED    the folder does not load" in proc.stdout and f"MISMATCH  {weights.name}" in proc.stdout
    assert "OK        params.json" in proc.stdout
    err = proc.stderr.strip().splitlines()
    # One line: why the folder is unusable, and the file that differs from RELEASE as the fix.
    assert len(err) == 1 and "truncated" in err[0] and "check it with `mixchat verify`" not in err[0]
    assert f"1 of 3 files missing or not matching ({weights.name}); download them again" in err[0]
    # Files as released but a folder that still does not load: the loader's reason, exit 2.
    write_release_file(folder, ["params.json", weights.name, "tokenizer.model"])
    proc = run_cli("verify", str(folder))
    assert proc.returncode == 2 and "its files match RELEASE" in proc.stderr and "Traceback" not in proc.stderr


def test_verify_reports_a_missing_listed_file(make_release):
    folder = make_release(tiny_args())
    (folder / "extra.bin").write_bytes(b"x")
    write_release_file(folder, ["params.json", "consolidated.00.pth", "tokenizer.model", "extra.bin"])
    (folder / "extra.bin").unlink()
    proc = run_cli("verify", str(folder))
    assert proc.returncode == 1 and "MISSING   extra.bin" in proc.stdout


def test_release_md5_block_is_parsed_from_box_characters(tmp_path):
    from mixchat.release.folder import parse_release_md5

    text = ("Mixtral 8x7B\n╔════╗\n"
            "║        1faa9bc9b20fcfe81fcd4eb7166a79e6  consolidated.00.pth               ║\n"
            "║        37974873eb68a7ab30c4912fc36264ae  tokenizer.model                   ║\n╚════╝\n")
    (tmp_path / "RELEASE").write_text(text)
    assert parse_release_md5(tmp_path / "RELEASE") == {
        "consolidated.00.pth": "1faa9bc9b20fcfe81fcd4eb7166a79e6",
        "tokenizer.model": "37974873eb68a7ab30c4912fc36264ae",
    }
