"""The hostile corpus: what people (and damaged files) feed mixchat, in one table.

Each case builds one hostile input (a params.json, a weights file, a flag, stdin, a saved cache, a
RELEASE, a store), runs mixchat's command line on it, and asserts what the trust issue promises:
the expected exit status, one line on stderr that contains the case's words (the problem and the
fix), no traceback, no control character reaching the terminal, and, where a case says so, that
nothing was lost or written where it must not be.

The commands run in-process (cli.main), so a hundred cases take seconds of model loading rather
than minutes of interpreter starts; a few that need a real process (signals, another user) live in
tests/test_faults.py.
"""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

from mixchat import paths
from mixchat.conversations.store import short_id
from mixchat.dev.synthetic import mistral_common_tokenizer, write_release
from mixchat.frontends import cli

FAST = ("--temperature", "0", "--max-tokens", "3", "--dtype", "fp32")


@dataclass
class Ctx:
    """Where a case runs: a fresh copy of a small release folder, the home folder, scratch space."""

    model: Path
    home: Path
    tmp: Path
    run: Callable[..., tuple[int, str, str]]
    saved: dict = field(default_factory=dict)  # what `prepare` wants `after` to compare with

    def params(self, **changes) -> None:
        path = self.model / "params.json"
        params = json.loads(path.read_text())
        for key, value in changes.items():
            if value is None:
                params.pop(key, None)
            else:
                params[key] = value
        path.write_text(json.dumps(params))

    def raw_params(self, text: str) -> None:
        (self.model / "params.json").write_text(text)

    def weights(self, transform: Callable[[bytes], bytes]) -> None:
        path = self.model / "consolidated.00.pth"
        path.write_bytes(transform(path.read_bytes()))

    def safetensors(self, edit_header: Callable[[dict], object], data: bytes | None = None) -> None:
        """Replace the weights by a safetensors file whose JSON header `edit_header` rewrote."""
        from safetensors.torch import save_file

        sd = torch.load(self.model / "consolidated.00.pth", weights_only=True)
        (self.model / "consolidated.00.pth").unlink()
        path = self.model / "consolidated.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        new = json.dumps(edit_header(header)).encode()
        path.write_bytes(len(new).to_bytes(8, "little") + new + (raw[8 + n :] if data is None else data))

    def state(self, edit: Callable[[dict], None]) -> None:
        path = self.model / "consolidated.00.pth"
        sd = torch.load(path, weights_only=True)
        edit(sd)
        torch.save(sd, path)

    def converse(self, *extra: str) -> str:
        """A first turn, saved; returns the conversation's id."""
        code, out, err = self.run("-m", str(self.model), *FAST, "--json", "-p", "Hello there", *extra)
        assert code == 0, err
        return json.loads(out.splitlines()[-1])["conversation"]

    def messages(self, cid: str | None = None) -> list[tuple]:
        db = sqlite3.connect(paths.store_path())
        try:
            if cid is None:
                return db.execute("SELECT conversation_id, role, content, stop FROM messages ORDER BY id").fetchall()
            return db.execute("SELECT role, content, stop FROM messages WHERE conversation_id = ? ORDER BY position",
                              (cid,)).fetchall()
        finally:
            db.close()


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    argv: tuple[str, ...]  # {model}, {home} and {tmp} are filled in
    code: int
    words: tuple[str, ...] = ()  # each must be in what the user sees (any case): stderr, or a report's verdict
    stdin: bytes = b""
    prepare: Callable[[Ctx], None] | None = None
    after: Callable[[Ctx, str, str], None] | None = None  # (ctx, stdout, stderr): what must still hold

    @property
    def id(self) -> str:
        return f"{self.group}:{self.name}"


def chat(*extra: str) -> tuple[str, ...]:
    return ("-m", "{model}", *FAST, "-p", "Hi", *extra)


def p(**changes) -> Callable[[Ctx], None]:
    return lambda ctx: ctx.params(**changes)


def raw(text: str) -> Callable[[Ctx], None]:
    return lambda ctx: ctx.raw_params(text)


def header(edit: Callable[[dict], object], data: bytes | None = None) -> Callable[[Ctx], None]:
    return lambda ctx: ctx.safetensors(edit, data)


def first_tensor(h: dict) -> str:
    return next(k for k in h if k != "__metadata__")


def set_entry(key: str, value: object) -> Callable[[dict], dict]:
    def edit(h: dict) -> dict:
        h[first_tensor(h)][key] = value
        return h

    return edit


def nothing_stored(ctx: Ctx, out: str, err: str) -> None:
    assert not paths.store_path().exists() or ctx.messages() == []


def poison(name: str, value: float) -> Callable[[Ctx], None]:
    def edit(sd: dict) -> None:
        sd[name] = sd[name].clone()
        sd[name].view(-1)[::7] = value

    return lambda ctx: ctx.state(edit)


# -- caches --------------------------------------------------------------------------------------


def _kv_file(ctx: Ctx) -> Path:
    files = list(paths.kv_dir().glob("*.safetensors"))
    assert len(files) == 1
    return files[0]


def damaged_kv(how: str) -> Callable[[Ctx], None]:
    def prepare(ctx: Ctx) -> None:
        ctx.saved["cid"] = ctx.converse()
        kv = _kv_file(ctx)
        data = bytearray(kv.read_bytes())
        if how == "overwrite":  # bytes in the middle of the keys and values, past the header
            data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
        elif how == "truncate":
            data = data[: len(data) // 3]
        elif how == "no-checksum":  # a file as mixchat 0.1 wrote it: no crc32 in the metadata
            from safetensors import safe_open
            from safetensors.torch import save_file

            with safe_open(str(kv), framework="pt") as f:
                meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
            meta.pop("crc32")
            save_file(state, str(kv), metadata=meta)
            return
        kv.write_bytes(bytes(data))

    return prepare


def continued_cleanly(note: str) -> Callable[[Ctx, str, str], None]:
    def after(ctx: Ctx, out: str, err: str) -> None:
        assert note in err.lower()
        summary = json.loads(out.splitlines()[-1])
        assert summary["cached_tokens"] == 0 and summary["stop"] in ("eos", "length")
        rows = ctx.messages(ctx.saved["cid"])
        assert [r[0] for r in rows] == ["user", "assistant", "user", "assistant"]  # no junk, nothing lost
        assert _kv_file(ctx).stat().st_size > 0  # written anew

    return after


def kv_in_the_way(kind: str) -> Callable[[Ctx], None]:
    def prepare(ctx: Ctx) -> None:
        ctx.saved["cid"] = ctx.converse()
        kv = _kv_file(ctx)
        if kind == "dir":  # the cache file's name is taken by a folder
            kv.unlink()
            kv.mkdir()
        else:  # the kv folder itself is a file
            shutil.rmtree(paths.kv_dir())
            paths.kv_dir().write_text("not a folder")

    return prepare


def reply_saved_anyway(ctx: Ctx, out: str, err: str) -> None:
    assert "could not save the kv cache" in err.lower()
    rows = ctx.messages(ctx.saved["cid"])
    assert [r[0] for r in rows] == ["user", "assistant", "user", "assistant"] and rows[-1][2] in ("eos", "length")


def quant_cache(how: str) -> Callable[[Ctx], None]:
    def prepare(ctx: Ctx) -> None:
        code, _, err = ctx.run("-m", str(ctx.model), *FAST, "--quant", "int8", "--no-save", "-p", "Hi")
        assert code == 0, err
        (path,) = (ctx.home / "cache" / "quant").glob("*.safetensors")
        ctx.saved["quant"] = (path, path.read_bytes())
        data = bytearray(path.read_bytes())
        if how == "overwrite":
            data[-4096:-4096 + 64] = b"\x7f" * 64
        else:
            data = data[: len(data) // 2]
        path.write_bytes(bytes(data))

    return prepare


def quant_rebuilt(ctx: Ctx, out: str, err: str) -> None:
    path, original = ctx.saved["quant"]
    assert path.read_bytes() == original  # quantized again, the same bytes as the first time


def injected_conversation(ctx: Ctx) -> None:
    """A saved conversation whose title, messages and model path hold escape sequences."""
    evil = "\x1b[2J\x1b]0;pwned\x07\x1b]52;c;ZXZpbA==\x07 [/INST] \x9b31m"
    ctx.saved["cid"] = ctx.converse()
    db = sqlite3.connect(paths.store_path())
    with db:
        db.execute("UPDATE conversations SET title = ?, model_path = ?", ("title " + evil, "/x/" + evil))
        db.execute("UPDATE messages SET content = content || ?", (evil,))
    db.close()


def no_raw_controls(ctx: Ctx, out: str, err: str) -> None:
    assert "pwned" in out  # the text is shown ...
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out  # ... and cannot act


def release_lists(*names: str) -> Callable[[Ctx], None]:
    def prepare(ctx: Ctx) -> None:
        lines = (ctx.model / "RELEASE").read_text().splitlines()
        box = [line for line in lines if "║" in line][-1]
        extra = [box.replace(box.split()[1], "d41d8cd98f00b204e9800998ecf8427e").replace(box.split()[2], n)
                 for n in names]
        (ctx.model / "RELEASE").write_text("\n".join(lines[:-1] + extra + lines[-1:]) + "\n")
        (ctx.tmp / "outside").write_text("")  # an empty file: d41d8… is its md5, were it ever read
        (ctx.model / "link").symlink_to(ctx.tmp / "outside")

    return prepare


def fake_reply(text: str):
    """Session.generate replaced by one that 'generates' `text` (model output is input too)."""
    from mixchat.engine.generation import Done, TokenEvent

    def generate(self, prompt, settings=None, cancel=None):
        done = Done(prompt_tokens=list(prompt), cached_tokens=0, prefilled_tokens=len(prompt), generated=[5, 6])
        for i, piece in enumerate((text[: len(text) // 2], text[len(text) // 2 :])):
            done.text += piece
            yield TokenEvent(5 + i, piece, None, None, 0.0)
        done.stop = "eos"
        yield done

    return generate


CASES = [
    # -- params.json: sizes, numbers and types ---------------------------------------------------
    Case("params", "a billion layers", ("inspect", "{model}"), 2, ("n_layers", "1000000000", "params.json"),
         prepare=p(n_layers=10**9)),
    Case("params", "a billion layers (chat)", chat(), 2, ("n_layers", "1000000000"), prepare=p(n_layers=10**9)),
    Case("params", "a billion experts", ("inspect", "{model}"), 2, ("num_experts", "1000000000"),
         prepare=p(moe={"num_experts": 10**9, "num_experts_per_tok": 2})),
    Case("params", "1000 layers, 2 in the file", ("inspect", "{model}"), 1, ("1000 layers", "do not belong together"),
         prepare=p(n_layers=1000)),
    Case("params", "1000 layers, 2 in the file (chat)", chat(), 2, ("1000 layers", "do not belong together"),
         prepare=p(n_layers=1000)),
    Case("params", "rope_theta NaN", chat(), 2, ("rope_theta", "finite", "params.json"),
         prepare=raw('{"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 96, "n_heads": 4, "n_kv_heads": 2, '
                     '"vocab_size": 32000, "rope_theta": NaN}')),
    Case("params", "rope_theta Infinity", ("inspect", "{model}"), 2, ("rope_theta", "finite"),
         prepare=raw('{"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 96, "n_heads": 4, "n_kv_heads": 2, '
                     '"vocab_size": 32000, "rope_theta": Infinity}')),
    Case("params", "rope_theta negative", chat(), 2, ("rope_theta", "positive"), prepare=p(rope_theta=-1e4)),
    Case("params", "norm_eps a string", chat(), 2, ("norm_eps", "'tiny'"), prepare=p(norm_eps="tiny")),
    Case("params", "dim a string", chat(), 2, ("dim", "positive integer"), prepare=p(dim="64")),
    Case("params", "dim a float", chat(), 2, ("dim", "positive integer"), prepare=p(dim=64.0)),
    Case("params", "dim a bool", chat(), 2, ("dim", "positive integer"), prepare=p(dim=True)),
    Case("params", "head_dim zero", chat(), 2, ("head_dim", "positive integer"), prepare=p(head_dim=0)),
    Case("params", "more kv heads than heads", chat(), 2, ("n_kv_heads", "exceeds"), prepare=p(n_kv_heads=8)),
    Case("params", "max_seq_len absurd", chat(), 2, ("max_seq_len", "beyond"), prepare=p(max_seq_len=10**12)),
    Case("params", "a window list that does not repeat evenly", chat(), 2, ("sliding_window", "repeat evenly"),
         prepare=p(sliding_window=[4, 4, 4])),
    Case("params", "a window list of strings", chat(), 2, ("sliding_window", "positive integer"),
         prepare=p(sliding_window=["4", "4"])),
    Case("params", "not JSON", chat(), 2, ("params.json", "not valid json", "restore"), prepare=raw("{dim: 64")),
    Case("params", "empty file", ("inspect", "{model}"), 2, ("params.json", "not valid json"), prepare=raw("")),
    Case("params", "a JSON list", chat(), 2, ("expected a json object",), prepare=raw("[1, 2, 3]")),
    Case("params", "nested a million deep", chat(), 2, ("not valid json",), prepare=raw("[" * 1_000_000)),
    Case("params", "two megabytes", chat(), 2, ("params.json", "bytes"), prepare=raw(" " * (2 << 20) + "{}")),
    Case("params", "missing dim", chat(), 2, ("missing required", "dim"), prepare=p(dim=None)),
    Case("params", "shapes contradict params", chat(), 2, ("shape", "params.json"), prepare=p(hidden_dim=128)),
    Case("params", "sampling block of the wrong type", ("-m", "{model}", "--max-tokens", "3", "-p", "Hi"), 2,
         ("params.json", "mixchat.sampling.temperature"),
         prepare=p(mixchat={"sampling": {"temperature": "hot"}}),
         after=lambda ctx, out, err: (lambda e: "--temperature" not in e)(err) or pytest.fail(err)),
    Case("params", "sampling block NaN", chat(), 2, ("mixchat.sampling.top_p", "finite"),
         prepare=p(mixchat={"sampling": {"top_p": float("nan")}})),
    Case("params", "sampling block overridden by the flag", chat(), 0,
         prepare=p(mixchat={"sampling": {"temperature": "hot"}})),
    Case("params", "params.json is a folder", chat(), 2, ("params.json",),
         prepare=lambda ctx: ((ctx.model / "params.json").unlink(), (ctx.model / "params.json").mkdir())),
    # -- weights and tokenizer -------------------------------------------------------------------
    Case("weights", "missing", chat(), 2, ("no weights found", "consolidated.00.pth"),
         prepare=lambda ctx: (ctx.model / "consolidated.00.pth").unlink(), after=nothing_stored),
    Case("weights", "truncated", chat(), 2, ("consolidated.00.pth", "download it again"),
         prepare=lambda ctx: ctx.weights(lambda b: b[: len(b) // 2]), after=nothing_stored),
    Case("weights", "truncated (inspect)", ("inspect", "{model}"), 2, ("consolidated.00.pth", "download"),
         prepare=lambda ctx: ctx.weights(lambda b: b[: len(b) // 2])),
    Case("weights", "empty", chat(), 2, ("empty", "download"), prepare=lambda ctx: ctx.weights(lambda b: b"")),
    Case("weights", "random bytes", chat(), 2, ("not a pytorch zip",),
         prepare=lambda ctx: ctx.weights(lambda b: bytes(range(256)) * 64)),
    Case("weights", "NaN in a weight", chat(), 2, ("nan", "layers.1.attention.wq.weight", "mixchat verify"),
         prepare=poison("layers.1.attention.wq.weight", float("nan")), after=nothing_stored),
    Case("weights", "infinity in a weight", chat(), 2, ("non-finite", "layers.0.feed_forward.w2.weight"),
         prepare=poison("layers.0.feed_forward.w2.weight", float("inf"))),
    Case("weights", "NaN in the embedding", chat("--quant", "int8"), 2, ("tok_embeddings.weight", "non-finite"),
         prepare=poison("tok_embeddings.weight", float("nan"))),
    Case("weights", "a pickle that runs code", chat(), 2, ("refusing", "could run code"),
         prepare=lambda ctx: torch.save({"tok_embeddings.weight": torch.zeros(2), "x": ZeroDivisionError()},
                                        ctx.model / "consolidated.00.pth")),
    Case("weights", "an integer tensor", chat(), 2, ("non-float",),
         prepare=lambda ctx: ctx.state(lambda sd: sd.update({"norm.weight": sd["norm.weight"].long()}))),
    Case("weights", "safetensors header is a list", chat(), 2, ("corrupt safetensors header", "json list"),
         prepare=header(lambda h: [1, 2])),
    Case("weights", "safetensors header is a string", ("inspect", "{model}"), 2, ("corrupt safetensors header",),
         prepare=header(lambda h: "tensors")),
    Case("weights", "data_offsets a string", chat(), 2, ("data_offsets",),
         prepare=header(set_entry("data_offsets", "0-10"))),
    Case("weights", "data_offsets negative", chat(), 2, ("data_offsets", "out of order"),
         prepare=header(set_entry("data_offsets", [-64, 0]))),
    Case("weights", "data_offsets reversed", ("inspect", "{model}"), 2, ("out of order",),
         prepare=header(set_entry("data_offsets", [64, 0]))),
    Case("weights", "offsets shorter than the shape", chat(), 2, ("spans", "needs"),
         prepare=header(set_entry("data_offsets", [0, 2]))),
    Case("weights", "offsets past the end", chat(), 2, ("truncated",),
         prepare=header(set_entry("data_offsets", [0, 1 << 40]))),
    Case("weights", "a shape of strings", chat(), 2, ("shape",), prepare=header(set_entry("shape", ["a", "b"]))),
    Case("weights", "an unknown dtype", chat(), 2, ("unsupported dtype",), prepare=header(set_entry("dtype", "Q5"))),
    Case("weights", "an entry that is a number", chat(), 2, ("not an object",),
         prepare=header(lambda h: {**h, "x": 5})),
    Case("weights", "header length absurd", chat(), 2, ("corrupt safetensors header", "claims"),
         prepare=lambda ctx: (ctx.safetensors(lambda h: h),
                              (ctx.model / "consolidated.safetensors").write_bytes(
                                  (1 << 62).to_bytes(8, "little") + b"{}"))),
    Case("weights", "tokenizer missing", chat(), 2, ("tokenizer.model", "missing"),
         prepare=lambda ctx: (ctx.model / "tokenizer.model").unlink()),
    Case("weights", "tokenizer missing (inspect exits 1)", ("inspect", "{model}"), 1, ("missing",),
         prepare=lambda ctx: (ctx.model / "tokenizer.model").unlink()),
    Case("weights", "tokenizer random bytes", chat(), 2, ("not a sentencepiece model",),
         prepare=lambda ctx: (ctx.model / "tokenizer.model").write_bytes(b"\x00\xff" * 999)),
    Case("weights", "tokenizer of another model", chat(), 2, ("pieces", "vocab_size", "another model"),
         prepare=lambda ctx: shutil.copy(mistral_common_tokenizer("v3"), ctx.model / "tokenizer.model")),
    Case("weights", "tokenizer of another model (inspect exits 1)", ("inspect", "{model}"), 1, ("mismatch",),
         prepare=lambda ctx: shutil.copy(mistral_common_tokenizer("v3"), ctx.model / "tokenizer.model")),
    Case("weights", "the folder is a file", ("-m", "{tmp}/file", *FAST, "-p", "Hi"), 2, ("is a file",),
         prepare=lambda ctx: (ctx.tmp / "file").write_text("x")),
    Case("weights", "no such folder", ("inspect", "{tmp}/nowhere"), 2, ("no such folder",)),
    # -- flags -----------------------------------------------------------------------------------
    Case("flags", "temperature nan", chat("--temperature", "nan"), 2, ("--temperature", "finite")),
    Case("flags", "temperature inf", chat("--temperature", "inf"), 2, ("--temperature", "finite")),
    Case("flags", "temperature negative", chat("--temperature", "-1"), 2, ("--temperature", "0 (greedy)")),
    Case("flags", "temperature tiny", chat("--temperature", "1e-40"), 2, ("--temperature", "0.001")),
    Case("flags", "top-p nan", chat("--top-p", "nan"), 2, ("--top-p",)),
    Case("flags", "top-p zero", chat("--top-p", "0"), 2, ("--top-p", "(0, 1]")),
    Case("flags", "top-k negative", chat("--top-k", "-1"), 2, ("--top-k",)),
    Case("flags", "repeat-penalty nan", chat("--repeat-penalty", "nan"), 2, ("--repeat-penalty", "finite")),
    Case("flags", "repeat-penalty zero", chat("--repeat-penalty", "0"), 2, ("--repeat-penalty", "0.01")),
    Case("flags", "memory-budget nan", chat("--memory-budget", "nan"), 2, ("--memory-budget", "positive")),
    Case("flags", "memory-budget inf", chat("--memory-budget", "inf"), 2, ("--memory-budget", "positive")),
    Case("flags", "memory-budget zero", chat("--memory-budget", "0"), 2, ("--memory-budget", "positive")),
    Case("flags", "threads zero", chat("--threads", "0"), 2, ("--threads", "from 1")),
    Case("flags", "threads negative", chat("--threads", "-3"), 2, ("--threads",)),
    Case("flags", "threads a million", chat("--threads", "1000000"), 2, ("--threads", "1024")),
    Case("flags", "seed past 64 bits", chat("--seed", str(2**70)), 2, ("--seed", "2^64")),
    Case("flags", "seed negative", chat("--seed", "-1"), 2, ("--seed",)),
    Case("flags", "max-tokens zero", chat("--max-tokens", "0"), 2, ("--max-tokens", "at least 1")),
    Case("flags", "unknown device", chat("--device", "warp9"), 2, ("--device", "unknown")),
    Case("flags", "bench prompt too long", ("bench", "-m", "{model}", "--prompt-tokens", "100000"), 2,
         ("--prompt-tokens",)),
    Case("flags", "bench zero runs", ("bench", "-m", "{model}", "--runs", "0"), 2, ("--runs",)),
    # -- what people type ------------------------------------------------------------------------
    Case("input", "stdin not UTF-8", ("-m", "{model}", *FAST), 2, ("not utf-8", "0xe9", "iconv"),
         stdin="café".encode("latin-1"), after=nothing_stored),
    Case("input", "stdin empty", ("-m", "{model}", *FAST), 2, ("stdin is empty",), after=nothing_stored),
    Case("input", "stdin only spaces", ("-m", "{model}", *FAST), 2, ("empty",), stdin=b" \n\t \n"),
    Case("input", "stdin only NULs", ("-m", "{model}", *FAST), 2, ("nul",), stdin=b"\0\0\0", after=nothing_stored),
    Case("input", "stdin with a NUL inside", ("-m", "{model}", *FAST), 2, ("nul", "offset 5"), stdin=b"hello\0x"),
    Case("input", "stdin only control characters", ("-m", "{model}", *FAST), 2, ("empty",), stdin=b"\x1b\x07\x08"),
    Case("input", "-p not UTF-8", ("-m", "{model}", *FAST, "-p", "caf\udce9"), 2, ("-p", "not utf-8", "0xe9")),
    Case("input", "-p empty", ("-m", "{model}", *FAST, "-p", ""), 2, ("-p", "empty")),
    Case("input", "-p only an escape", ("-m", "{model}", *FAST, "-p", "\x1b"), 2, ("empty",)),
    Case("input", "--system not UTF-8", chat("--system", "\udcff"), 2, ("--system", "utf-8")),
    Case("input", "a prompt longer than the context", ("-m", "{model}", *FAST), 2, ("the context holds",),
         stdin=b"word " * 900, prepare=p(max_seq_len=256), after=nothing_stored),
    Case("input", "-c with nothing to continue", ("-c", *FAST, "-p", "Hi"), 2, ("no conversation",)),
    Case("input", "--raw with -c", ("-m", "{model}", "--raw", "-c", "-p", "Hi"), 2, ("--raw",)),
    Case("input", "an escape sequence in the prompt", chat("--json"), 0,
         after=lambda ctx, out, err: no_raw_controls_in_list(ctx)),
    # -- saved caches ----------------------------------------------------------------------------
    Case("caches", "KV cache bytes overwritten", ("-c", *FAST, "--json", "-p", "More"), 0, ("checksum",),
         prepare=damaged_kv("overwrite"), after=continued_cleanly("discarded the saved kv cache")),
    Case("caches", "KV cache truncated", ("-c", *FAST, "--json", "-p", "More"), 0, ("damaged",),
         prepare=damaged_kv("truncate"), after=continued_cleanly("discarded")),
    Case("caches", "KV cache without a checksum", ("-c", *FAST, "--json", "-p", "More"), 0, ("no checksum",),
         prepare=damaged_kv("no-checksum"), after=continued_cleanly("discarded")),
    Case("caches", "KV cache path is a folder", ("-c", *FAST, "--json", "-p", "More"), 0, ("could not save",),
         prepare=kv_in_the_way("dir"), after=reply_saved_anyway),
    Case("caches", "KV folder is a file", ("-c", *FAST, "--json", "-p", "More"), 0, ("could not save",),
         prepare=kv_in_the_way("file"), after=reply_saved_anyway),
    Case("caches", "quantized cache bytes overwritten", chat("--quant", "int8", "--no-save"), 0,
         ("quantized cache", "checksum", "quantizing again"), prepare=quant_cache("overwrite"), after=quant_rebuilt),
    Case("caches", "quantized cache truncated", chat("--quant", "int8", "--no-save"), 0,
         ("quantized cache", "quantizing again"), prepare=quant_cache("truncate"), after=quant_rebuilt),
    Case("caches", "quantized cache folder cannot be made", chat("--quant", "int8", "--no-save"), 0,
         ("could not write the quantized weights", "in memory"),
         prepare=lambda ctx: ((ctx.home / "cache").mkdir(parents=True), (ctx.home / "cache" / "quant").write_text(""))),
    Case("caches", "temporary files of a killed run", ("-c", *FAST, "-p", "More"), 0,
         prepare=lambda ctx: (ctx.converse(), (paths.kv_dir() / "x.safetensors.tmp999999999").write_text("half"),
                              (paths.kv_dir() / "y.safetensors.tmp").write_text("older")),
         after=lambda ctx, out, err: not list(paths.kv_dir().glob("*.tmp*")) or pytest.fail("tmp left")),
    # -- text that reaches the terminal ----------------------------------------------------------
    Case("terminal", "list", ("list",), 0, prepare=injected_conversation, after=no_raw_controls),
    Case("terminal", "show", ("show", "{cid}"), 0, prepare=injected_conversation, after=no_raw_controls),
    Case("terminal", "export markdown", ("export", "{cid}", "--format", "markdown"), 0,
         prepare=injected_conversation, after=no_raw_controls),
    Case("terminal", "export json keeps the text, escaped", ("export", "{cid}", "--format", "json"), 0,
         prepare=injected_conversation,
         after=lambda ctx, out, err: ("\\u001b]0;pwned" in out and "\x1b" not in out) or pytest.fail(out)),
    Case("terminal", "model output", chat(), 0,
         after=lambda ctx, out, err: ("␛]0;pwned" in out and "\x1b" not in out) or pytest.fail(repr(out))),
    Case("terminal", "an error naming a path", ("inspect", "{tmp}/\x1b]0;pwned\x07"), 2, ("no such folder", "␛")),
    # -- RELEASE and verify ----------------------------------------------------------------------
    Case("verify", "a path out of the folder", ("verify", "{model}"), 1, ("outside the folder", "../../outside"),
         prepare=release_lists("../../outside"),
         after=lambda ctx, out, err: "REFUSED" in out and "OK        ../../outside" not in out or pytest.fail(out)),
    Case("verify", "an absolute path", ("verify", "{model}"), 1, ("outside the folder", "/etc/passwd"),
         prepare=release_lists("/etc/passwd")),
    Case("verify", "a symlink out of the folder", ("verify", "{model}"), 1, ("outside the folder", "link"),
         prepare=release_lists("link")),
    Case("verify", "a checksum mismatch", ("verify", "{model}"), 1, ("not matching", "download them again"),
         prepare=lambda ctx: (ctx.model / "params.json").write_text((ctx.model / "params.json").read_text() + " ")),
    Case("verify", "RELEASE of a gigabyte", ("verify", "{model}"), 2, ("too large",),
         prepare=lambda ctx: (ctx.model / "RELEASE").write_bytes(b"x" * (2 << 20))),
    Case("verify", "no RELEASE", ("verify", "{model}"), 2, ("RELEASE", "missing"),
         prepare=lambda ctx: (ctx.model / "RELEASE").unlink()),
]


# -- the store -------------------------------------------------------------------------------------


def random_store(ctx: Ctx) -> None:
    paths.store_path().parent.mkdir(parents=True)
    paths.store_path().write_bytes(bytes(range(256)) * 16)
    ctx.saved["bytes"] = paths.store_path().read_bytes()


def store_untouched(ctx: Ctx, out: str, err: str) -> None:
    assert paths.store_path().read_bytes() == ctx.saved["bytes"]


def newer_store(ctx: Ctx) -> None:
    ctx.saved["cid"] = ctx.converse()
    db = sqlite3.connect(paths.store_path())
    db.execute("PRAGMA user_version = 999")
    db.close()


def locked_store(ctx: Ctx) -> None:
    import os

    ctx.saved["cid"] = ctx.converse()
    os.environ["MIXCHAT_DB_TIMEOUT"] = "0.2"  # monkeypatch restores the environment after the test
    db = sqlite3.connect(paths.store_path(), isolation_level=None, check_same_thread=False)
    db.execute("BEGIN IMMEDIATE")
    ctx.saved["lock"] = db  # held until the test ends


def one_conversation_left(ctx: Ctx, out: str, err: str) -> None:
    assert {r[0] for r in ctx.messages()} == {ctx.saved["cid"]}


def no_raw_controls_in_list(ctx: Ctx) -> None:
    """Chat with an escape sequence in the prompt: the title keeps it, and `list` shows it harmlessly."""
    code, out, err = ctx.run("list")
    assert code == 0 and "\x1b" not in out


def with_conversation(ctx: Ctx) -> None:
    ctx.saved["cid"] = ctx.converse()


CASES += [
    Case("store", "random bytes: list", ("list",), 2, ("not a mixchat store", "mv "), prepare=random_store,
         after=store_untouched),
    Case("store", "random bytes: chat", chat(), 2, ("not a mixchat store",), prepare=random_store,
         after=store_untouched),
    Case("store", "random bytes: show", ("show", "abcd1234"), 2, ("not a mixchat store",), prepare=random_store,
         after=store_untouched),
    Case("store", "a newer schema still lists", ("list",), 0, prepare=newer_store,
         after=lambda ctx, out, err: short_id(ctx.saved["cid"]) in out or pytest.fail(out)),
    Case("store", "a newer schema is not written", ("-c", *FAST, "-p", "More"), 2, ("newer mixchat", "upgrade"),
         prepare=newer_store, after=lambda ctx, out, err: len(ctx.messages()) == 2 or pytest.fail("written")),
    Case("store", "MIXCHAT_HOME is a file", chat(), 2, ("is a file",),
         prepare=lambda ctx: (ctx.tmp.joinpath("f").write_text("x"),
                              __import__("os").environ.__setitem__("MIXCHAT_HOME", str(ctx.tmp / "f")))),
    Case("store", "locked by another writer", ("-c", *FAST, "-p", "More"), 2, ("locked", "try again"),
         prepare=locked_store),
    Case("store", "rm with an empty id", ("rm", ""), 2, ("no conversation id given",), prepare=with_conversation,
         after=one_conversation_left),
    Case("store", "rm %", ("rm", "%"), 2, ("hexadecimal",), prepare=with_conversation, after=one_conversation_left),
    Case("store", "rm _", ("rm", "_"), 2, ("hexadecimal",), prepare=with_conversation, after=one_conversation_left),
    Case("store", "rm a one-character prefix", ("rm", "0"), 2, ("too short",), prepare=with_conversation,
         after=one_conversation_left),
    Case("store", "rm an unknown id", ("rm", "deadbeef"), 2, ("no conversation",), prepare=with_conversation,
         after=one_conversation_left),
    Case("store", "rm says what it deletes", ("rm", "{cid}"), 0, prepare=with_conversation,
         after=lambda ctx, out, err: ("deleted" in out and "Hello there" in out and not ctx.messages())
         or pytest.fail(out)),
    Case("store", "show an unknown id", ("show", "deadbeef"), 2, ("no conversation",), prepare=with_conversation),
    Case("store", "rename to nothing visible", ("rename", "{cid}", "\x1b\x07"), 2, ("title", "empty"),
         prepare=with_conversation),
]


CASES.append(Case("terminal", "a prompt with an escape sequence, then list",
                  ("-m", "{model}", *FAST, "-p", "hi \x1b[2J\x1b]0;pwned\x07 there"), 0,
                  after=lambda ctx, out, err: no_raw_controls(ctx, ctx.run("list")[1], "")))


@pytest.fixture(scope="module")
def release_template(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("template") / "release"
    return write_release(folder, tiny_args(), "dense", seed=5, std=0.15)


def test_the_corpus_is_large_enough_and_covers_every_group():
    groups = {c.group for c in CASES}
    assert len(CASES) >= 80 and groups >= {"params", "weights", "flags", "input", "caches", "terminal", "verify"}
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, release_template, tmp_path, monkeypatch, capsys):
    model = tmp_path / "model"
    shutil.copytree(release_template, model)
    home = tmp_path / "home"
    monkeypatch.setenv("MIXCHAT_HOME", str(home))
    monkeypatch.delenv("MIXCHAT_MODEL", raising=False)

    def run(*argv: str, stdin: bytes = b"") -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    ctx = Ctx(model, home, tmp_path, run)
    if case.name == "model output":
        from mixchat.engine.generation import Session

        monkeypatch.setattr(Session, "generate", fake_reply("say \x1b]0;pwned\x07 then \x1b[2J done"))
    if case.prepare is not None:
        case.prepare(ctx)
    argv = [a.format(model=model, home=home, tmp=tmp_path, cid=ctx.saved.get("cid", "")) for a in case.argv]
    code, out, err = run(*argv, stdin=case.stdin)
    assert code == case.code, f"exit {code}, stderr: {err}"
    assert "Traceback" not in err
    # An error is said on stderr; a report that ends in a verdict (inspect, verify: exit 1) is on stdout.
    seen = err if case.code not in (0, 1) else err + out
    for word in case.words:
        assert word.lower() in seen.lower(), f"{word!r} not in: {seen}"
    if case.code != 0 and case.code != 1:
        errors = [line for line in err.splitlines() if line.startswith("mixchat: error:")]
        assert len(errors) == 1, err  # one line names the problem and the fix
    assert "\x1b" not in err and "\x07" not in err
    if case.after is not None:
        case.after(ctx, out, err)
