"""Train mixchat's demo model: a small Mixtral (8 experts, top-2) on Jane Austen's six novels.

End to end and seeded: fetch the novels (Debian's r-cran-janeaustenr, read by scripts/janeausten.py),
split them (the last VAL_SHARE of each novel's paragraphs is held out), train a SentencePiece BPE
tokenizer with Mistral's special ids, build two streams of training rows — plain prose and the
novels' dialogue as v1 instruct exchanges (BOS [INST] speech [/INST] reply EOS, exactly what
mixchat.text.chat_format.encode_chat writes) — train with mixchat's own modules (mixchat.dev.training),
then write a release folder in Mistral's format (params.json, consolidated.00.pth in bf16,
tokenizer.model, RELEASE) and TRAINING.md, with samples generated from the saved folder through
Engine.load + Session.

    .venv/bin/python scripts/train_demo.py --out assets/demo --work ~/.cache/mixchat-train
"""

from __future__ import annotations

import os

# Spinning OpenMP threads make a 2-thread run 10x slower whenever another process wants a core
# (measured here while tests ran alongside: 1.3 s/step passive against up to 17 s/step spinning).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import math
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import janeausten  # noqa: E402
from demo_prompts import CHAT_PROMPTS  # noqa: E402

from mixchat.dev.synthetic import md5  # noqa: E402
from mixchat.dev.training import expert_usage, forward_train, load_balancing_loss  # noqa: E402
from mixchat.model.model import Transformer  # noqa: E402
from mixchat.release.config import ModelArgs, MoeArgs  # noqa: E402
from mixchat.text.chat_format import Message, encode_chat  # noqa: E402
from mixchat.text.tokenizer import Tokenizer  # noqa: E402

VAL_SHARE = 0.05
RECOMMENDED = {"temperature": 0.8, "top_p": 0.9, "repeat_penalty": 1.15}


# ---------------------------------------------------------------- data

def paragraphs(lines: list[str]) -> list[str]:
    """Blank-line separated paragraphs, each joined into one line; '_emphasis_' marks dropped."""
    out, cur = [], []
    for line in lines + [""]:
        line = line.strip()
        if line:
            cur.append(line)
        elif cur:
            out.append(re.sub(r"\s+", " ", " ".join(cur)).replace("_", ""))
            cur = []
    return out


def speech(paragraph: str) -> str | None:
    """The quoted words of a paragraph whose quotes all close, with the narration ('said he')
    between quotations dropped; None for paragraphs without speech or with a speech that goes on
    into the next paragraph."""
    if '"' not in paragraph or paragraph.count('"') % 2:
        return None
    parts = [p.strip() for p in paragraph.split('"')[1::2] if p.strip()]
    if not parts:
        return None
    text = " ".join(parts)
    if text.endswith(","):
        text = text[:-1] + "."
    text = text[0].upper() + text[1:]
    return text if 2 <= len(text) <= 500 else None


def exchanges(paras: list[str]) -> list[tuple[str, str]]:
    """Consecutive speeches (a line and the answer to it) as (user, assistant) pairs."""
    pairs = []
    for a, b in zip(paras, paras[1:], strict=False):
        sa, sb = speech(a), speech(b)
        if sa and sb:
            pairs.append((sa, sb))
    return pairs


def split_books(work: Path) -> dict[str, dict[str, list]]:
    books = janeausten.read_books(janeausten.fetch(work))
    split = {"train": {"prose": [], "chat": []}, "val": {"prose": [], "chat": []}}
    for lines in books.values():
        paras = paragraphs(lines)
        cut = int(len(paras) * (1 - VAL_SHARE))
        for name, part in (("train", paras[:cut]), ("val", paras[cut:])):
            split[name]["prose"].append(part)
            split[name]["chat"].extend(exchanges(part))
    return split


def train_tokenizer(split: dict, out: Path, vocab_size: int, seed: int) -> Tokenizer:
    import sentencepiece as spm

    corpus = out.with_suffix(".txt")
    with open(corpus, "w", encoding="utf-8") as f:
        for book in split["train"]["prose"]:
            for p in book:
                f.write(p + "\n")
    # Mistral's v1 tokenizer settings: BPE, byte fallback, digits split, identity normalisation,
    # <unk>=0 <s>=1 </s>=2, no pad. [INST] and [/INST] are user-defined (plain text that is always
    # one piece), not control pieces, so mixchat still recognises the v1 chat format.
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out.with_suffix("")), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["[INST]", "[/INST]"], character_coverage=0.9999, max_sentence_length=20000,
        shuffle_input_sentence=False, num_threads=2, minloglevel=2,
    )
    tok = Tokenizer(out.with_suffix(".model"))
    assert tok.version == "v1", tok.version
    assert tok.vocab_size == vocab_size
    return tok


def encode_prose(tok: Tokenizer, books: list[list[str]]) -> list[torch.Tensor]:
    """Each novel as one id stream: BOS, then its paragraphs separated by a newline."""
    newline = tok.encode("\n", bos=False)[-1:]  # the <0x0A> byte piece
    streams = []
    for paras in books:
        ids = [tok.bos_id]
        for p in paras:
            ids += tok.encode(p, bos=False) + newline
        streams.append(torch.tensor(ids))
    return streams


def encode_exchanges(tok: Tokenizer, pairs: list[tuple[str, str]]) -> list[list[int]]:
    return [encode_chat(tok, [Message("user", u), Message("assistant", a)]) for u, a in pairs]


def pack(seqs: list[list[int]], row: int, rng: random.Random) -> torch.Tensor:
    """Exchanges shuffled and packed back to back into rows of `row` ids, each row starting at an
    exchange's BOS; the exchange that overflows a row is cut."""
    order = list(range(len(seqs)))
    rng.shuffle(order)
    rows, cur = [], []
    for i in order:
        cur += seqs[i]
        if len(cur) >= row:
            rows.append(cur[:row])
            cur = []
    return torch.tensor(rows)


class Batches:
    """Rows of seq_len + 1 ids: a share `chat_share` from packed exchanges (re-packed every epoch),
    the rest random windows of the prose streams."""

    def __init__(self, prose: list[torch.Tensor], chat: list[list[int]], seq_len: int, chat_share: float,
                 seed: int) -> None:
        self.prose, self.chat, self.row = prose, chat, seq_len + 1
        self.chat_share = chat_share
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.lengths = torch.tensor([len(s) - self.row for s in prose], dtype=torch.float)
        self.chat_rows, self.chat_pos = pack(chat, self.row, self.rng), 0

    def next(self, batch: int) -> torch.Tensor:
        n_chat = sum(self.rng.random() < self.chat_share for _ in range(batch))
        rows = []
        for _ in range(batch - n_chat):
            book = int(torch.multinomial(self.lengths, 1, generator=self.gen))
            start = int(torch.randint(0, int(self.lengths[book]) + 1, (1,), generator=self.gen))
            rows.append(self.prose[book][start : start + self.row])
        for _ in range(n_chat):
            if self.chat_pos >= len(self.chat_rows):
                self.chat_rows, self.chat_pos = pack(self.chat, self.row, self.rng), 0
            rows.append(self.chat_rows[self.chat_pos])
            self.chat_pos += 1
        return torch.stack(rows)


# ---------------------------------------------------------------- model

def build_model(args: ModelArgs, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    std = 0.02
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p)
        elif name.endswith(("wo.weight", "w2.weight")):  # residual projections, GPT-2 style scaling
            torch.nn.init.normal_(p, std=std / math.sqrt(2 * args.n_layers))
        else:
            torch.nn.init.normal_(p, std=std)
    return model


def lr_at(step: int, progress: float, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from `peak` down to floor * peak as
    `progress` goes from 0 to 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def evaluate(model: Transformer, rows: torch.Tensor, batch: int = 16) -> tuple[float, torch.Tensor]:
    """Mean next-token loss in nats over `rows` and the per-layer expert usage on them."""
    model.eval()
    total, count, usage = 0.0, 0, []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        out = forward_train(model, chunk[:, :-1])
        loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), chunk[:, 1:].reshape(-1),
                               reduction="sum")
        total += float(loss)
        count += chunk[:, 1:].numel()
        usage.append(expert_usage(out.experts, model.args.moe.num_experts) * chunk.shape[0])
    model.train()
    return total / count, torch.stack(usage).sum(0) / len(rows)


def windows(stream: torch.Tensor, row: int) -> torch.Tensor:
    n = (len(stream) - 1) // (row - 1)
    return torch.stack([stream[i * (row - 1) : i * (row - 1) + row] for i in range(n)])


# ---------------------------------------------------------------- release

def save_release(model: Transformer, tok_path: Path, folder: Path, seed: int, command: str,
                 extra_params: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    params = model.args.to_params()
    params["max_seq_len"] = model.args.max_seq_len
    params.update(extra_params)
    (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().to(torch.bfloat16).contiguous().clone() for k, v in model.state_dict().items()}
    torch.save(state, folder / "consolidated.00.pth")
    shutil.copyfile(tok_path, folder / "tokenizer.model")
    write_release(folder, seed, command)


def write_release(folder: Path, seed: int, command: str) -> None:
    names = ["params.json", "consolidated.00.pth", "tokenizer.model"]
    rows = [f"{md5(folder / n)}  {n}" for n in names]
    width = max(len(r) for r in rows) + 16
    lines = [
        "mixchat demo model: a small Mixtral (8 experts, top-2) trained on Jane Austen's six novels.",
        "",
        "Texts: Sense and Sensibility, Pride and Prejudice, Mansfield Park, Emma, Northanger Abbey and",
        "Persuasion by Jane Austen (public domain), as packaged by the janeaustenr R package",
        "(Debian r-cran-janeaustenr 1.0.0-1).",
        f"Trained by mixchat's scripts/train_demo.py with seed {seed}:",
        f"    {command}",
        "See TRAINING.md for the loss curve, validation loss, samples and expert usage.",
        "",
        "╔" + "═" * width + "╗",
    ]
    lines += ["║        " + r.ljust(width - 8) + "║" for r in rows]
    lines.append("╚" + "═" * width + "╝")
    (folder / "RELEASE").write_text("\n".join(lines) + "\n", encoding="utf-8")


def chat_samples(folder: Path, prompts: list[str], max_tokens: int, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, reply, stop) for each prompt, generated from the saved folder with the recommended
    sampling settings, through the same path `mixchat -p` takes."""
    from mixchat.engine.engine import Engine
    from mixchat.engine.generation import Done, Session
    from mixchat.engine.sampling import SamplingSettings

    engine = Engine.load(folder, show_progress=False)
    settings = SamplingSettings(**RECOMMENDED, max_tokens=max_tokens, seed=seed)
    out = []
    for prompt in prompts:
        session = Session(engine)
        ids = encode_chat(engine.tokenizer, [Message("user", prompt)])
        done = [e for e in session.generate(ids, settings) if isinstance(e, Done)][0]
        out.append((prompt, done.text, done.stop))
    return out


def raw_samples(folder: Path, prompts: list[str], max_tokens: int, seed: int) -> list[tuple[str, str, str]]:
    from mixchat.engine.engine import Engine
    from mixchat.engine.generation import Done, Session
    from mixchat.engine.sampling import SamplingSettings

    engine = Engine.load(folder, show_progress=False)
    settings = SamplingSettings(**RECOMMENDED, max_tokens=max_tokens, seed=seed)
    out = []
    for prompt in prompts:
        done = [e for e in Session(engine).generate(engine.tokenizer.encode(prompt), settings)
                if isinstance(e, Done)][0]
        out.append((prompt, done.text, done.stop))
    return out


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("assets/demo"))
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "mixchat-train")
    ap.add_argument("--seed", type=int, default=1811)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux", type=float, default=0.01, help="load-balancing loss coefficient")
    ap.add_argument("--chat-share", type=float, default=0.35)
    ap.add_argument("--dropout", type=float, default=0.0, help="embedding and residual-branch dropout")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=0.0,
                    help="also end the cosine schedule (and training) after this many minutes; 0: off")
    ap.add_argument("--trial", action="store_true", help="train and evaluate only; write no release")
    ns = ap.parse_args()
    command = "python scripts/train_demo.py " + " ".join(sys.argv[1:])
    torch.set_num_threads(ns.threads)
    random.seed(ns.seed)
    torch.manual_seed(ns.seed)
    t_start = time.time()

    ns.work.mkdir(parents=True, exist_ok=True)
    split = split_books(ns.work)
    tok = train_tokenizer(split, ns.work / f"austen{ns.vocab}", ns.vocab, ns.seed)
    train_prose = encode_prose(tok, split["train"]["prose"])
    val_prose = encode_prose(tok, split["val"]["prose"])
    train_chat = encode_exchanges(tok, split["train"]["chat"])
    val_chat = encode_exchanges(tok, split["val"]["chat"])
    val_chars = sum(len("\n".join(b)) + 1 for b in split["val"]["prose"])
    val_tokens = sum(len(s) - 1 for s in val_prose)
    print(f"data: train prose {sum(map(len, train_prose))} tokens, {len(train_chat)} exchanges "
          f"({sum(map(len, train_chat))} tokens); val prose {val_tokens} tokens / {val_chars} chars "
          f"({val_chars / val_tokens:.2f} chars/token), {len(val_chat)} exchanges; "
          f"tokenizer {time.time() - t_start:.0f}s", flush=True)
    (ns.work / "heldout.txt").write_text("\n".join(split["val"]["prose"][1]) + "\n", encoding="utf-8")

    row = ns.seq_len + 1
    val_prose_rows = torch.cat([windows(s, row) for s in val_prose])
    val_chat_rows = pack(val_chat, row, random.Random(0))

    args = ModelArgs(dim=ns.dim, n_layers=ns.layers, hidden_dim=ns.hidden, n_heads=ns.heads, vocab_size=ns.vocab,
                     head_dim=ns.dim // ns.heads, n_kv_heads=ns.kv_heads, norm_eps=1e-5, rope_theta=10000.0,
                     sliding_window=None, max_seq_len=ns.max_seq_len, moe=MoeArgs(ns.experts, 2))
    model = build_model(args, ns.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters", flush=True)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() == 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": ns.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=ns.lr, betas=(0.9, 0.95), eps=1e-8)
    batches = Batches(train_prose, train_chat, ns.seq_len, ns.chat_share, ns.seed)
    curve = []
    t_train = time.time()
    smooth = None
    step = 0
    best = None  # (val prose, step, state): the release keeps the best evaluated weights, not the last
    while True:
        # Progress is the step count, or the share of --max-minutes spent if that is further along
        # (so a run on a busier machine still finishes its cosine decay in time).
        elapsed = time.time() - t_train
        progress = max((step - ns.warmup) / max(1, ns.steps - ns.warmup),
                       elapsed / 60 / ns.max_minutes if ns.max_minutes else 0.0)
        if step >= ns.steps or (step > ns.warmup and progress >= 1):
            break
        last = step == ns.steps - 1
        for g in opt.param_groups:
            g["lr"] = lr_at(step, progress, ns.lr, ns.warmup)
        rows = batches.next(ns.batch)
        out = forward_train(model, rows[:, :-1], ns.dropout)
        ce = F.cross_entropy(out.logits.reshape(-1, ns.vocab), rows[:, 1:].reshape(-1))
        aux = load_balancing_loss(out.router_logits, 2)
        opt.zero_grad(set_to_none=True)
        (ce + ns.aux * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = float(ce.detach())
        smooth = loss_value if smooth is None else 0.98 * smooth + 0.02 * loss_value
        if step % 50 == 0 or last:
            el = time.time() - t_train
            print(f"step {step:5d}  loss {loss_value:.3f} (avg {smooth:.3f})  aux {float(aux.detach()):.3f}  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  {el / 60:.1f} min  "
                  f"{(step + 1) * ns.batch * ns.seq_len / el:.0f} tok/s", flush=True)
        if (step + 1) % ns.eval_every == 0 or last:
            vp, _ = evaluate(model, val_prose_rows[::3])  # a third of the held-out prose, to save time
            vc, _ = evaluate(model, val_chat_rows)
            curve.append({"step": step + 1, "minutes": round((time.time() - t_train) / 60, 1),
                          "train": round(smooth, 3), "val_prose": round(vp, 3), "val_chat": round(vc, 3)})
            print(f"eval step {step + 1}: val prose (1/3) {vp:.3f} nats/token = "
                  f"{vp * val_tokens / val_chars:.3f} nats/char, val chat {vc:.3f}", flush=True)
            torch.save(model.state_dict(), ns.work / "checkpoint.pt")
            if best is None or vp < best[0]:
                best = (vp, step + 1, {k: v.clone() for k, v in model.state_dict().items()})
        step += 1
    ns.steps_done = step
    if best is not None and best[1] != step:
        print(f"keeping the weights of step {best[1]} (best held-out prose loss {best[0]:.3f})", flush=True)
        model.load_state_dict(best[2])
    ns.best_step = best[1] if best is not None else step
    train_minutes = (time.time() - t_train) / 60
    vp, usage = evaluate(model, val_prose_rows)
    vc, usage_chat = evaluate(model, val_chat_rows)
    tp, _ = evaluate(model, torch.stack([batches.next(16) for _ in range(8)]).view(-1, row))
    print(f"done in {train_minutes:.1f} min: train {tp:.3f}, val prose {vp:.3f} nats/token "
          f"({vp * val_tokens / val_chars:.3f} nats/char), val chat {vc:.3f}", flush=True)
    print("expert usage (val prose), per layer:\n" + "\n".join(
        " ".join(f"{x:.3f}" for x in r) for r in usage.tolist()), flush=True)
    if ns.trial:
        return

    extra = {"mixchat": {"sampling": dict(RECOMMENDED)}}
    save_release(model, tok.path, ns.out, ns.seed, command, extra)
    folder_mb = sum(p.stat().st_size for p in ns.out.iterdir()) / 1e6
    chats = chat_samples(ns.out, CHAT_PROMPTS, 80, ns.seed)
    raws = raw_samples(ns.out, ["It is a truth universally acknowledged", "Mr. Darcy", "The weather at Bath"],
                       80, ns.seed)
    eos = sum(stop == "eos" for _, _, stop in chats) / len(chats)
    for p, text, stop in chats + raws:
        print(f"--- {p!r} -> {text!r} [{stop}]")
    write_report(ns, command, n_params, folder_mb, train_minutes, time.time() - t_start, curve, tp, vp, vc,
                 val_tokens, val_chars, usage, usage_chat, chats, raws, eos, len(split["train"]["chat"]),
                 sum(map(len, train_prose)))


def write_report(ns, command, n_params, folder_mb, train_minutes, total_seconds, curve, tp, vp, vc, val_tokens,
                 val_chars, usage, usage_chat, chats, raws, eos, n_exchanges, n_prose) -> None:
    cpt = val_chars / val_tokens
    lines = [
        "# The demo model: a small Mixtral trained on Jane Austen",
        "",
        f"`assets/demo` is a {n_params / 1e6:.1f}M-parameter Mixtral-architecture model ({ns.layers} layers, dim "
        f"{ns.dim}, {ns.heads} heads / {ns.kv_heads} KV heads, {ns.experts} experts of hidden size {ns.hidden}, "
        f"top-2 routing, {ns.vocab}-piece SentencePiece BPE tokenizer) in Mistral's release format "
        f"({folder_mb:.1f} MB, weights in bf16). It was trained from scratch on the two CPU cores of the "
        "development machine by `scripts/train_demo.py`, which uses mixchat's own model modules "
        "(`mixchat/dev/training.py`).",
        "",
        "Data: Jane Austen's six novels (public domain), from Debian's `r-cran-janeaustenr` 1.0.0-1, read "
        f"without R by `scripts/janeausten.py`. The last {VAL_SHARE:.0%} of each novel's paragraphs is held "
        f"out. Training rows ({ns.seq_len} tokens) are {1 - ns.chat_share:.0%} prose windows "
        f"({n_prose} tokens) and {ns.chat_share:.0%} packed chat exchanges: {n_exchanges} pairs of consecutive "
        "speeches from the novels, written as v1 instruct turns (`<s>[INST] speech [/INST] reply</s>`, "
        "token for token what `mixchat.text.chat_format.encode_chat` produces), so a line typed to the model gets "
        "an answer in the manner of the novels' dialogue that ends by itself.",
        "",
        f"Command (seed {ns.seed}):",
        "",
        "```bash",
        f".venv/bin/python {command.removeprefix('python ')}",
        "```",
        "",
        f"Training: {ns.steps_done} steps (of at most {ns.steps}; "
        f"{f'time budget {ns.max_minutes} min' if ns.max_minutes else 'step-based schedule, no time budget'}) of "
        f"{ns.batch} x {ns.seq_len} tokens, AdamW (betas 0.9/0.95, weight decay "
        f"{ns.weight_decay}), peak LR {ns.lr} with {ns.warmup} warm-up steps and a cosine decay to 10%, gradient "
        f"clipping at 1.0, load-balancing loss x {ns.aux}, dropout {ns.dropout}, fp32, 2 threads. The release keeps "
        f"the weights of step {ns.best_step}, the evaluation with the lowest held-out prose loss (every 3rd window). "
        f"Wall time: {train_minutes:.1f} min of training, {total_seconds / 60:.1f} min end to end (tokenizer, data, "
        "training, samples).",
        "",
        "## Loss",
        "",
        f"Validation (held-out prose, {val_tokens} tokens = {val_chars} characters, {cpt:.2f} chars/token): "
        f"**{vp:.3f} nats/token = {vp / cpt:.3f} nats/char**. Held-out chat exchanges: {vc:.3f} nats/token. "
        f"Training batches at the end: {tp:.3f} nats/token.",
        "",
        "| step | minutes | train (smoothed) | val prose (every 3rd window) | nats/char | val chat |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {c['step']} | {c['minutes']} | {c['train']:.3f} | {c['val_prose']:.3f} | "
              f"{c['val_prose'] / cpt:.3f} | {c['val_chat']:.3f} |" for c in curve]
    lines += ["", "## Expert usage", "",
              "Share of routed (token, slot) pairs each expert receives on the held-out prose (1/8 = 0.125 is "
              "perfect balance):", "",
              "| layer | " + " | ".join(f"e{e}" for e in range(ns.experts)) + " | max/min |",
              "|---|" + "---:|" * (ns.experts + 1)]
    for i, r in enumerate(usage.tolist()):
        lines.append(f"| {i} | " + " | ".join(f"{x:.3f}" for x in r) + f" | {max(r) / max(min(r), 1e-9):.2f} |")
    lines += ["", "On the held-out chat exchanges:", "",
              "| layer | " + " | ".join(f"e{e}" for e in range(ns.experts)) + " |", "|---|" + "---:|" * ns.experts]
    for i, r in enumerate(usage_chat.tolist()):
        lines.append(f"| {i} | " + " | ".join(f"{x:.3f}" for x in r) + " |")
    s = RECOMMENDED
    lines += [
        "", "## Sampling", "",
        "Greedy decoding of a model this small loops. The recommended settings are written into "
        f"`assets/demo/params.json` under `\"mixchat\": {{\"sampling\": {json.dumps(s)}}}` (the loader ignores "
        f"unknown keys): temperature {s['temperature']}, top-p {s['top_p']}, repetition penalty "
        f"{s['repeat_penalty']}. Equivalent flags: `--temperature {s['temperature']} --top-p {s['top_p']} "
        f"--repeat-penalty {s['repeat_penalty']}`.",
        "",
        f"With these settings and `--seed {ns.seed}`, {eos:.0%} of the {len(chats)} chat prompts below end with EOS "
        "within 80 tokens (tests/test_demo_model.py checks this through the one-shot command).",
        "",
        "## Samples",
        "",
        "Generated from the saved folder through `Engine.load` + `Session` (the path `mixchat -p` takes), "
        f"bf16, recommended sampling, seed {ns.seed}, at most 80 tokens, verbatim:",
        "",
    ]
    for p, text, stop in chats:
        lines += [f"- **{p}** → {text.strip()} *[{stop}]*"]
    lines += ["", "Raw continuation (`--raw`):", ""]
    for p, text, stop in raws:
        lines += [f"- **{p}**{text} *[{stop}]*"]
    lines.append("")
    (ns.out / "TRAINING.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
