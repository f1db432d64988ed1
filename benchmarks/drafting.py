"""Prompt-lookup drafting against plain decoding: the same replies, how much faster.

    .venv/bin/python benchmarks/drafting.py                       # the demo model, every prompt kind
    .venv/bin/python benchmarks/drafting.py --rounds 3 --verify-model /data/mistral-7b --out d.json

1. End to end on a trained model (default: the shipped demo, a 15M Mixtral trained on Jane Austen):
   each prompt is answered with drafting off and on, in turns, `--rounds` times, and the decode tokens
   per second compared (median per prompt). Every pair of replies must be token-identical, or the script
   stops: that is the contract. Prompt kinds:
   - quote: a held-out Austen passage, then its opening words again, so the reply can continue by
     quoting it (what `mixchat -i notes.txt "quote the part about ..."` asks of a model);
   - edit: a few lines of code, then the same code started again with one name changed;
   - chat: the demo's own chat prompts, open replies that repeat little.
   Greedy, and sampled with the demo's recommended settings and a fixed seed.
2. With --verify-model, on a full-width folder (random weights are fine here):
   - the cost of a verify pass, T = 1..8 rows through the fused step, as a multiple of one row;
   - end to end, the reply to a prompt decoded plainly, then again with drafts that know that reply
     (every guess kept: what quoting a piped file gives a model that quotes faithfully), and with the
     same drafts each guess spoiled with probability 1 - p (p = 0.8, 0.5), the rejections real ones.
     The replies must be identical. A trained model's acceptance on real prompts is not measured here
     (no real weights on this machine); the demo's is, in part 1.

Run it on an otherwise idle machine: on 2 cores any other process halves the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from demo_prompts import CHAT_PROMPTS  # noqa: E402

from mixchat.engine.engine import Engine  # noqa: E402
from mixchat.engine.generation import Done, Session  # noqa: E402
from mixchat.engine.sampling import SamplingSettings  # noqa: E402
from mixchat.text.chat_format import Message, encode_chat  # noqa: E402

CODE = '''def parse_folder(path):
    params = read_params(path / "params.json")
    weights = open_weights(path / "consolidated.00.pth")
    tokenizer = load_tokenizer(path / "tokenizer.model")
    return Release(params, weights, tokenizer)
'''


def prompts(engine: Engine, n_quote: int) -> dict[str, list[list[int]]]:
    tok = engine.tokenizer
    text = (ROOT / "tests/data/austen_heldout.txt").read_text(encoding="utf-8")
    paras = [text[1000 * i:1000 * i + 800] for i in range(n_quote)]  # held-out windows of 800 characters
    quote = [tok.encode(p + "\n\n" + p[:80]) for p in paras]
    edit = [tok.encode(CODE + "\n" + CODE.replace("parse_folder", "load_folder")[:60])]
    return {"quote": quote, "edit": edit, "chat": [CHAT_PROMPTS]}  # chat: one conversation, turn by turn


def answer(engine: Engine, prompt, settings: SamplingSettings, lookup_class=None) -> Done:
    """The reply to a prompt (token ids), or a whole conversation (a list of user messages, each turn
    in the same Session, as the app sends them): one Done with every turn's tokens and seconds added."""
    session = Session(engine)
    if isinstance(prompt[0], str):
        total, messages = None, []
        for text in prompt:
            messages.append(Message("user", text))
            done = answer_once(session, encode_chat(engine.tokenizer, messages), settings)
            messages.append(Message("assistant", done.text, ids=list(done.generated)))
            if total is None:
                total = done
            else:
                total.generated += done.generated
                total.decode_seconds += done.decode_seconds
                total.drafted, total.accepted = total.drafted + done.drafted, total.accepted + done.accepted
                total.passes += done.passes
        return total
    return answer_once(session, prompt, settings, lookup_class)


def answer_once(session: Session, prompt: list[int], settings: SamplingSettings, lookup_class=None) -> Done:
    done = None
    for ev in session.generate(prompt, settings, lookup_class=lookup_class):
        if isinstance(ev, Done):
            done = ev
    return done


def end_to_end(engine: Engine, kinds: dict[str, list[list[int]]], rounds: int, max_tokens: int,
               sampled: dict) -> dict:
    results = {}
    for mode, base in (("greedy", {"temperature": 0}), ("sampled", {**sampled, "seed": 7})):
        for kind, plist in kinds.items():
            ratios, passes, plain_tps, draft_tps = [], [], [], []
            drafted = accepted = tokens = 0
            for i, prompt in enumerate(plist):
                per = {0: [], 7: []}
                for _ in range(rounds):
                    outs = {}
                    for draft in (0, 7):  # in turns, so drift in the machine's speed hits both alike
                        s = SamplingSettings(**{**base, "max_tokens": max_tokens, "draft": draft})
                        outs[draft] = answer(engine, prompt, s)
                        per[draft].append(outs[draft].decode_tokens_per_second)
                    if outs[0].generated != outs[7].generated:
                        raise SystemExit(f"{mode} {kind} prompt {i}: drafting changed the reply; that is a bug")
                    d = outs[7]
                    drafted, accepted, tokens = drafted + d.drafted, accepted + d.accepted, tokens + len(d.generated)
                    passes.append((len(d.generated), d.passes))
                p0, p7 = statistics.median(per[0]), statistics.median(per[7])
                plain_tps.append(p0)
                draft_tps.append(p7)
                ratios.append(p7 / p0)
            results[f"{mode}/{kind}"] = {
                "prompts": len(plist), "speedup_median": round(statistics.median(ratios), 3),
                "speedup_min": round(min(ratios), 3), "plain_tok_s": round(statistics.median(plain_tps), 1),
                "drafting_tok_s": round(statistics.median(draft_tps), 1), "drafted": drafted, "accepted": accepted,
                "tokens": tokens, "passes": sum(p for _, p in passes),
            }
            r = results[f"{mode}/{kind}"]
            print(f"  {mode:8} {kind:6} {r['plain_tok_s']:8.1f} -> {r['drafting_tok_s']:8.1f} tok/s  "
                  f"x{r['speedup_median']:.2f} (worst prompt x{r['speedup_min']:.2f}), {accepted}/{drafted} drafted "
                  f"kept, {r['tokens']} tokens in {r['passes']} passes", flush=True)
    return results


def pass_costs(engine: Engine, reps: int) -> dict[int, float]:
    """Seconds per fused pass of T rows (T = 1..8) after a 64-token prompt, the cache rewound each time."""
    session = Session(engine)
    assert session.can_draft(), "this folder's fused step does not verify exactly (see Session.can_draft)"
    cache, model = session.cache, engine.model
    with torch.no_grad():
        model(torch.arange(1, 65), cache)
        costs = {}
        for rows in range(1, 9):
            times = []
            for _ in range(reps + 1):
                t = time.perf_counter()
                model(torch.arange(100, 100 + rows), cache)
                times.append(time.perf_counter() - t)
                cache.rewind(64)
            costs[rows] = statistics.median(times[1:])
            print(f"  pass of {rows} row(s): {costs[rows] * 1e3:7.1f} ms = {costs[rows] / costs[1]:.2f} x one row",
                  flush=True)
    return costs


def knowing(reply: list[int], prompt_len: int, p: float, seed: int = 0):
    """Drafts that know the reply, each guess spoiled (another token id) with probability 1 - p."""
    import random

    rng = random.Random(seed)

    class Oracle:
        def __init__(self, history: list[int]) -> None:
            self.n = len(history)

        def extend(self, tokens: list[int]) -> None:
            self.n += len(tokens)

        def draft(self, k: int) -> list[int]:
            out = []
            for t in reply[self.n - prompt_len:self.n - prompt_len + k]:
                out.append(t if rng.random() < p else (t + 1) % 1000 + 3)
            return out

    return Oracle


def full_width(engine: Engine, tokens: int) -> dict:
    """Plain decoding against drafting with drafts that know the reply (kept with probability p)."""
    prompt = list(range(100, 164))
    greedy = SamplingSettings(temperature=0, max_tokens=tokens, draft=0)
    plain = answer(engine, prompt, greedy)
    out = {"plain_tok_s": round(plain.decode_tokens_per_second, 3)}
    print(f"  plain decoding: {out['plain_tok_s']:.3f} tok/s ({len(plain.generated)} tokens)", flush=True)
    for p in (1.0, 0.8, 0.5):
        s = SamplingSettings(temperature=0, max_tokens=tokens, draft=7)
        d = answer(engine, prompt, s, knowing(plain.generated, len(prompt), p))
        if d.generated != plain.generated:
            raise SystemExit(f"drafting changed the reply at p = {p}; that is a bug")
        x = d.decode_tokens_per_second / plain.decode_tokens_per_second
        out[f"p={p}"] = {"tok_s": round(d.decode_tokens_per_second, 3), "speedup": round(x, 2),
                         "drafted": d.drafted, "accepted": d.accepted, "passes": d.passes}
        print(f"  guesses kept with p = {p}: {d.decode_tokens_per_second:.3f} tok/s = x{x:.2f}, {d.accepted}/"
              f"{d.drafted} drafted kept, {len(d.generated)} tokens in {d.passes} passes", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, default=ROOT / "assets/demo")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--quotes", type=int, default=4, help="held-out passages to quote")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--verify-model", type=Path, help="a full-width folder to measure verify passes on")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--full-tokens", type=int, default=48, help="tokens decoded on the full-width folder")
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args()
    engine = Engine.load(ns.model, threads=ns.threads)
    rec = (engine.args.extra or {}).get("mixchat", {}).get("sampling", {})
    sampled = {k: rec[k] for k in ("temperature", "top_p", "top_k", "repeat_penalty") if k in rec} or \
        {"temperature": 0.7}
    print(f"end to end on {ns.model} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads), {ns.rounds} rounds, {ns.max_tokens} tokens; sampled = {sampled}", flush=True)
    report: dict = {"model": str(ns.model), "rounds": ns.rounds,
                    "end_to_end": end_to_end(engine, prompts(engine, ns.quotes), ns.rounds, ns.max_tokens, sampled)}
    if ns.verify_model:
        del engine
        print(f"verify passes on {ns.verify_model}", flush=True)
        big = Engine.load(ns.verify_model, threads=ns.threads)
        costs = pass_costs(big, ns.reps)
        report["pass_seconds"] = {str(k): round(v, 5) for k, v in costs.items()}
        print(f"end to end on {ns.verify_model}, greedy, {ns.full_tokens} tokens", flush=True)
        report["full_width"] = full_width(big, ns.full_tokens)
    if ns.out:
        ns.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
