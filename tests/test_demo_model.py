"""The shipped demo model (assets/demo): a small Mixtral trained on Jane Austen by scripts/train_demo.py.

Everything here runs the shipped folder itself, so a retrained or damaged model fails loudly:
it verifies and inspects clean, loads strictly, reproduces recorded greedy tokens, keeps its
perplexity on held-out Austen below a recorded bound, and answers chat prompts with a reply that
ends by itself (EOS) through the real one-shot command.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixchat.dev.training import forward_train, load_balancing_loss
from mixchat.engine.engine import Engine
from mixchat.engine.generation import Done, Session
from mixchat.engine.sampling import SamplingSettings
from mixchat.model.cache import KVCache
from mixchat.text.chat_format import Message, encode_chat

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"
HELDOUT = Path(__file__).resolve().parent / "data" / "austen_heldout.txt"

# Recorded from the shipped model (see assets/demo/TRAINING.md); update them when it is retrained.
GREEDY_PROMPT = "It is a truth universally acknowledged"
GREEDY_TOKENS = [4055, 306, 447, 732, 306, 447, 318, 355, 378, 1652, 286, 549, 296, 271, 1032, 4055, 306, 447, 732,
                 306]  # '. I am sure I am not at all afraid of being in the world. I am sure I'
_spec = importlib.util.spec_from_file_location("demo_prompts", ROOT / "scripts" / "demo_prompts.py")
_prompts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_prompts)
CHAT_PROMPTS = _prompts.CHAT_PROMPTS  # the ones the training script recorded replies for
HELDOUT_NATS_PER_TOKEN_MAX = 3.49  # measured 3.440 nats/token (0.818 nats/char) + 0.05
CHAT_MAX_TOKENS = 80
CHAT_SEED = 1811
EOS_FRACTION_MIN = 0.75  # measured 8/8; allows two prompts to run to --max-tokens


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(DEMO, dtype="fp32", warm=False, show_progress=False)


def _mixchat(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixchat", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_folder_is_a_complete_small_release():
    names = sorted(p.name for p in DEMO.iterdir())
    assert names == ["RELEASE", "TRAINING.md", "consolidated.00.pth", "params.json", "tokenizer.model"]
    assert sum((DEMO / n).stat().st_size for n in names) < 50e6
    params = json.loads((DEMO / "params.json").read_text())
    assert params["moe"] == {"num_experts": 8, "num_experts_per_tok": 2}
    sampling = params["mixchat"]["sampling"]
    assert sampling["temperature"] > 0 and 0 < sampling["top_p"] <= 1 and sampling["repeat_penalty"] > 1
    release = (DEMO / "RELEASE").read_text(encoding="utf-8")
    assert "janeaustenr" in release and "public domain" in release and "scripts/train_demo.py" in release
    assert "seed" in release


def test_verify_and_inspect_pass():
    verify = _mixchat("verify", str(DEMO))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "all 3 files match RELEASE" in verify.stdout
    inspect = _mixchat("inspect", "--json", str(DEMO))
    assert inspect.returncode == 0, inspect.stdout + inspect.stderr
    report = json.loads(inspect.stdout)
    assert report["layout"] == "experts" and report["params"]["moe"]["num_experts"] == 8
    assert report["tokenizer"]["version"] == "v1" and report["tokenizer"]["matches_params"]
    assert report["unknown_params"] == ["mixchat"] and report["release_md5_entries"] == 3
    assert report["dtypes"] == {"bfloat16": report["tensors"]}


def test_loads_strictly_with_bf16_weights_and_a_v1_tokenizer(engine):
    state = torch.load(DEMO / "consolidated.00.pth", map_location="cpu", mmap=True, weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert set(state) == set(engine.model.state_dict())  # the exact Mistral (experts layout) names
    assert "layers.0.feed_forward.experts.7.w2.weight" in state
    assert engine.layout == "experts" and engine.args.moe.num_experts == 8
    tok = engine.tokenizer
    assert tok.version == "v1" and tok.vocab_size == engine.args.vocab_size
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.sp.pad_id()) == (0, 1, 2, -1)
    inst, end = tok.sp.piece_to_id("[INST]"), tok.sp.piece_to_id("[/INST]")
    assert inst > 2 and end > 2 and not tok.sp.is_control(inst)
    ids = tok.encode("[INST] Hello [/INST]", bos=False)
    assert ids.count(inst) == 1 and ids.count(end) == 1 and len(ids) <= 8
    assert tok.decode(tok.encode("Œuvre — 1811 ☃", bos=False)) == "Œuvre — 1811 ☃"  # byte fallback


def test_greedy_generation_matches_recorded_tokens(engine):
    settings = SamplingSettings(temperature=0, repeat_penalty=1.0, max_tokens=20)
    prompt = engine.tokenizer.encode(GREEDY_PROMPT)
    done = [e for e in Session(engine).generate(prompt, settings) if isinstance(e, Done)][0]
    assert done.generated == GREEDY_TOKENS, (done.generated, done.text)


def _heldout_ids(tok) -> tuple[list[int], int]:
    """Encoded as train_demo.py encodes prose: BOS, then each paragraph followed by a newline byte."""
    text = HELDOUT.read_text(encoding="utf-8")
    newline = tok.encode("\n", bos=False)[-1:]
    ids = [tok.bos_id]
    for para in text.splitlines():
        ids += tok.encode(para, bos=False) + newline
    return ids, len(text)


def test_heldout_perplexity_is_below_recorded_bound(engine):
    ids, chars = _heldout_ids(engine.tokenizer)
    assert 800 < chars < 1500 and len(ids) < engine.args.max_seq_len
    out = engine.model(torch.tensor(ids), KVCache(engine.args, torch.float32))
    nats = F.cross_entropy(out.logits[:-1], torch.tensor(ids[1:])).item()
    assert nats < HELDOUT_NATS_PER_TOKEN_MAX, nats
    assert math.exp(nats) < math.exp(HELDOUT_NATS_PER_TOKEN_MAX)
    # Far better than knowing nothing (uniform over the vocabulary).
    assert nats < 0.7 * math.log(engine.args.vocab_size)


def test_training_forward_equals_inference_forward_on_the_shipped_weights(engine):
    ids, _ = _heldout_ids(engine.tokenizer)
    ids = torch.tensor(ids[:96])
    ref = engine.model(ids, KVCache(engine.args, torch.float32))
    with torch.no_grad():
        out = forward_train(engine.model, ids[None])
    torch.testing.assert_close(out.logits[0], ref.logits, atol=2e-3, rtol=1e-3)
    for layer, chosen in enumerate(out.experts):
        # Routing agrees wherever the top-2 choice is not a near tie.
        assert (chosen.sort(-1).values == ref.experts[:, layer].sort(-1).values).all(-1).float().mean() > 0.95
    assert 1.0 <= load_balancing_loss(out.router_logits, 2).item() < 1.5


def test_experts_are_all_used(engine):
    ids, _ = _heldout_ids(engine.tokenizer)
    out = engine.model(torch.tensor(ids), KVCache(engine.args, torch.float32))
    for layer in range(engine.args.n_layers):
        share = torch.bincount(out.experts[:, layer].reshape(-1), minlength=8).float() / out.experts[:, layer].numel()
        assert share.min() > 0.02 and share.max() < 0.4, (layer, share.tolist())


def test_chat_format_prompt_is_what_training_used(engine):
    tok = engine.tokenizer
    ids = encode_chat(tok, [Message("user", "How do you do?")])
    assert ids[0] == tok.bos_id and tok.sp.piece_to_id("[INST]") in ids[1:3]
    assert ids[-1] == tok.sp.piece_to_id("[/INST]")
    assert tok.decode(ids[1:]) == "[INST] How do you do? [/INST]"


def _chat_argv(prompt: str) -> list[str]:
    """The one-shot command with the demo's recommended sampling (from its params.json)."""
    sampling = json.loads((DEMO / "params.json").read_text())["mixchat"]["sampling"]
    return ["--model", str(DEMO), "--no-save", "--json", "--max-tokens", str(CHAT_MAX_TOKENS),
            "--temperature", str(sampling["temperature"]), "--top-p", str(sampling["top_p"]),
            "--repeat-penalty", str(sampling["repeat_penalty"]), "--seed", str(CHAT_SEED), "-p", prompt]


def _parse_chat(stdout: str) -> dict:
    lines = [json.loads(line) for line in stdout.splitlines()]
    done = lines[-1]
    assert done["done"] is True
    tokens = [line for line in lines[:-1] if line["token"] >= 0]
    assert all(len(line["experts"]) == 4 and len(line["experts"][0]) == 2 for line in tokens)
    text = "".join(line["text"] for line in lines[:-1])
    return {"stop": done["stop"], "text": text, "generated": done["generated_tokens"]}


def test_chat_replies_end_by_themselves(capsys):
    # In-process `mixchat.frontends.cli.main` (the exact one-shot code path) for all prompts: eight fresh
    # interpreters would spend ~30 CPU-seconds importing torch. One real subprocess below checks
    # that `python -m mixchat` gives the very same answer.
    from mixchat.frontends.cli import main

    results = []
    for prompt in CHAT_PROMPTS:
        assert main(_chat_argv(prompt)) == 0
        results.append(_parse_chat(capsys.readouterr().out))
    for r in results:
        assert r["text"].strip(), r
        assert r["stop"] in ("eos", "length") and (r["stop"] == "length") == (r["generated"] >= CHAT_MAX_TOKENS)
    eos = sum(r["stop"] == "eos" for r in results) / len(results)
    assert eos >= EOS_FRACTION_MIN, [(r["stop"], r["text"]) for r in results]

    proc = _mixchat(*_chat_argv(CHAT_PROMPTS[0]), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _parse_chat(proc.stdout) == results[0]


class _XDR:
    """Writes R's XDR serialization (format 3) of character vectors, integer vectors and named lists."""

    @staticmethod
    def i32(v: int) -> bytes:
        import struct

        return struct.pack(">i", v)

    @classmethod
    def chars(cls, s: str | None) -> bytes:
        if s is None:
            return cls.i32(9) + cls.i32(-1)
        raw = s.encode("utf-8")
        return cls.i32(0x40009 if raw.isascii() else 0x8009) + cls.i32(len(raw)) + raw

    @classmethod
    def strings(cls, values: list[str | None]) -> bytes:
        return cls.i32(16) + cls.i32(len(values)) + b"".join(map(cls.chars, values))

    @classmethod
    def ints(cls, values: list[int]) -> bytes:
        return cls.i32(13) + cls.i32(len(values)) + b"".join(map(cls.i32, values))

    @classmethod
    def named_list(cls, items: dict[str, bytes]) -> bytes:
        # VECSXP with attributes, then the attribute pairlist (tag: SYMSXP "names", value: STRSXP), NILVALUE
        return (cls.i32(0x213) + cls.i32(len(items)) + b"".join(items.values()) + cls.i32(0x402) + cls.i32(1)
                + cls.chars("names") + cls.strings(list(items)) + cls.i32(254))

    @classmethod
    def stream(cls, item: bytes) -> bytes:
        return b"X\n" + cls.i32(3) + cls.i32(0x040201) + cls.i32(0x030500) + cls.i32(5) + b"UTF-8" + item


def test_janeausten_reader_parses_r_lazy_load_databases(tmp_path):
    import gzip
    import struct
    import zlib

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import janeausten
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    lines = ["PRIDE AND PREJUDICE", "", None, "It is a truth universally acknowledged, that…", "Œuvre"]
    blob = _XDR.stream(_XDR.strings(lines))
    rdb = tmp_path / "Rdata.rdb"
    rdb.write_bytes(b"junk" + struct.pack(">I", len(blob)) + zlib.compress(blob))
    length = rdb.stat().st_size - 4
    assert janeausten.read_object(rdb, 4, length) == lines
    variables = _XDR.named_list({"emma": _XDR.ints([4, length]), "persuasion": _XDR.ints([0, 4])})
    rdx = tmp_path / "Rdata.rdx"
    rdx.write_bytes(gzip.compress(_XDR.stream(_XDR.named_list(
        {"variables": variables, "references": _XDR.named_list({}), "compressed": _XDR.i32(10) + _XDR.i32(1)
         + _XDR.i32(1)}))))
    assert janeausten.read_index(rdx) == {"emma": (4, length), "persuasion": (0, 4)}
