"""Pipeline-parallel inference on torch.distributed: two processes on 127.0.0.1 (gloo), launched by torchrun
as a user launches them, against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

from mixchat.distributed import group as dist_group
from mixchat.distributed.pipeline import Part, Pipeline, owns, plan_experts, plan_layers, release_identity
from mixchat.errors import MixchatError

HERE = Path(__file__).parent
ROOT = HERE.parent
SHAPE = {"n_layers": 4, "dim": 128, "hidden_dim": 256, "head_dim": 32, "n_heads": 4, "n_kv_heads": 2,
         "sliding_window": 6}
MOE = {"num_experts": 4, "num_experts_per_tok": 2}


def torchrun(*args: str, ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *args]


def env(home: Path) -> dict[str, str]:
    return {**os.environ, "MIXCHAT_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
            "PYTHONWARNINGS": "ignore"}


@pytest.fixture
def dense(make_release):
    return make_release(tiny_args(**SHAPE), std=0.05)


@pytest.fixture
def mixtral(make_release):
    return make_release(tiny_args(**SHAPE, moe=MOE), layout="experts", std=0.05)


# -- the plan


def test_layers_follow_free_memory_and_rank_zero_carries_the_head():
    # 32 layers of 1 GB, a 2 GB head: equal memory gives rank 0 one layer fewer for the head
    assert plan_layers(32, 10**9, 2 * 10**9, [40 * 10**9, 40 * 10**9]) == [range(0, 15), range(15, 32)]
    # a rank with three times the memory holds three times the layers
    ranges = plan_layers(32, 10**9, 0, [10 * 10**9, 30 * 10**9])
    assert [len(r) for r in ranges] == [8, 24]
    # every rank holds at least one layer, and the ranges cover the model in order
    ranges = plan_layers(4, 10**9, 0, [100 * 10**9, 2 * 10**9, 2 * 10**9])
    assert [len(r) for r in ranges] == [2, 1, 1] and ranges[-1].stop == 4
    assert plan_layers(4, 1, 0, [0, 0], fixed=[1, 3]) == [range(0, 1), range(1, 4)]


@pytest.mark.parametrize("free, fixed, says", [
    ([10**9, 10**9, 10**9], None, "fewer than the 3 ranks"),
    ([10**9, 10**9], [1, 2], "add up to the model's 2 layers"),
    ([3 * 10**9, 10**9], None, "rank 1 would hold layers"),
])
def test_impossible_plans_are_one_line_errors(free, fixed, says):
    with pytest.raises(MixchatError, match=says):
        plan_layers(2, 2 * 10**9, 0, free, fixed)


def test_each_rank_reads_only_its_own_tensors():
    first, last = Part(range(0, 2), head=True), Part(range(2, 4))
    assert owns("layers.3.attention.wq.weight", last) and not owns("layers.1.attention.wq.weight", last)
    assert owns("tok_embeddings.weight", first) and owns("output.weight", first) and owns("norm.weight", first)
    assert not owns("tok_embeddings.weight", last) and not owns("output.weight", last)
    # the expert split: every layer's attention and router, the rank's own experts, the embedding everywhere
    share = Part(range(0, 4), range(4, 8))
    assert owns("layers.0.attention.wk.weight", share) and owns("layers.3.feed_forward.gate.weight", share)
    assert owns("layers.2.feed_forward.experts.5.w1.weight", share)
    assert not owns("layers.2.feed_forward.experts.3.w1.weight", share)
    assert owns("tok_embeddings.weight", share) and not owns("output.weight", share)
    assert plan_experts(8, 2) == [range(0, 4), range(4, 8)] and plan_experts(8, 3) == [range(0, 2), range(2, 5),
                                                                                        range(5, 8)]
    with pytest.raises(MixchatError, match="fewer than the 3 ranks"):
        plan_experts(2, 3)


class FakeGroup:
    """Rank 0's view of a group whose rank 1 answers with what it is given."""

    def __init__(self, replies):
        self.rank, self.size, self.broken, self.pipeline = 0, 2, None, None
        self.replies, self.sent = list(replies), []

    def send_json(self, obj, peer, doing=""):
        self.sent.append((peer, obj))

    def recv_json(self, peer, doing="", forever=False):
        return self.replies.pop(0)


def test_a_rank_with_another_model_is_refused(dense, make_release):
    other = make_release(tiny_args(**{**SHAPE, "hidden_dim": 128}), std=0.05)
    assert release_identity(dense) != release_identity(other)
    group = FakeGroup([{"identity": release_identity(other), "free": 10**10}])
    with pytest.raises(MixchatError, match="rank 1 has another model"):
        Pipeline(group).plan(dense, {}, tiny_args(**SHAPE), 1, 1, None)
    group = FakeGroup([{"error": "no release folder at /x"}])
    with pytest.raises(MixchatError, match="rank 1: no release folder"):
        Pipeline(group).plan(dense, {}, tiny_args(**SHAPE), 1, 1, None)
    assert not any(obj["op"] == "load" for _, obj in group.sent)  # nothing is loaded after a refusal


def test_the_group_listens_on_the_rendezvous_network_only():
    assert dist_group._interface_for("127.0.0.1") == "lo"


# -- two processes against one


def run_worker(folder: Path, tmp_path: Path, dtype: str, quant: str, rank_layers: str, split: str) -> dict:
    out = tmp_path / f"dist-{dtype}-{quant}-{split}.pt"
    proc = subprocess.run(torchrun(str(HERE / "dist_worker.py"), str(folder), str(out), dtype, quant, rank_layers,
                                   split),
                          capture_output=True, text=True, timeout=300, env=env(tmp_path / "home"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("model, dtype, quant, how", [
    ("dense", "fp32", "none", "pipeline"), ("dense", "bf16", "none", "pipeline"), ("dense", "bf16", "int8", "pipeline"),
    ("mixtral", "bf16", "none", "pipeline"), ("mixtral", "bf16", "int8", "pipeline"),
    ("mixtral", "fp32", "none", "pipeline"), ("mixtral", "bf16", "none", "experts"),
    ("mixtral", "bf16", "int8", "experts"), ("mixtral", "fp32", "none", "experts"),
])
def test_two_ranks_give_one_process_logits_and_routing_bit_for_bit(request, tmp_path, model, dtype, quant, how):
    from dist_worker import passes

    from mixchat.engine.engine import Engine

    folder = request.getfixturevalue(model)
    split = run_worker(folder, tmp_path, dtype, quant, "2,2", how)
    assert split["world_size"] == 2
    assert split["split"] == ("pipeline 0-1,2-3 of 2" if how == "pipeline" else "experts 0-1,2-3 of 2")
    engine = Engine.load(folder, dtype=dtype, threads=1, quant=None if quant == "none" else quant,
                         show_progress=False)
    one = passes(engine, engine.new_cache(chunk_size=8))
    assert len(one["logits"]) == len(split["logits"]) == 21
    for a, b in zip(one["logits"], split["logits"], strict=True):
        assert torch.equal(a, b)
    assert len(one["experts"]) == len(split["experts"]) == (21 if model == "mixtral" else 0)
    for a, b in zip(one["experts"], split["experts"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(one["weights"], split["weights"], strict=True):
        assert torch.equal(a, b)


def answer(cmd: list[str], home: Path, *args: str) -> tuple[list[int], dict, subprocess.CompletedProcess]:
    proc = subprocess.run([*cmd, *args, "--json", "--temperature", "0", "--max-tokens", "16"], capture_output=True,
                          text=True, timeout=300, env=env(home))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # every line is rank 0's JSON: rank 1 says nothing
    tokens = [line["token"] for line in lines if "token" in line]
    return tokens, lines[-1], proc


ONE = [sys.executable, "-m", "mixchat"]
TWO = torchrun("-m", "mixchat")


@pytest.mark.parametrize("model, split, other", [
    ("dense", ("--rank-layers", "2,2"), ("--rank-layers", "1,3")),
    ("mixtral", ("--split", "experts"), ("--rank-layers", "2,2")),
])
def test_the_command_under_torchrun_answers_as_one_process_and_continues_from_its_caches(request, tmp_path, model,
                                                                                         split, other):
    folder = request.getfixturevalue(model)
    first = ("--model", str(folder), "Tell me about the sea")
    t1, d1, _ = answer(ONE, tmp_path / "one", *first)
    t2, d2, _ = answer(TWO, tmp_path / "two", *first, *split)
    assert t1 == t2 and d1["generated_tokens"] == 16
    assert d2["world_size"] == 2 and d1["world_size"] == 1
    assert d2["rank_wait_seconds"] > 0 and d1["rank_wait_seconds"] == 0
    kv = tmp_path / "two" / "kv"
    assert sorted(p.name for p in kv.iterdir()) == [f"{d2['conversation']}.rank1.safetensors",
                                                     f"{d2['conversation']}.safetensors"]
    # the follow-up re-uses both ranks' caches: only the new message is read
    follow = ("-c", "And about the mountains?")
    u1, e1, _ = answer(ONE, tmp_path / "one", *follow)
    u2, e2, _ = answer(TWO, tmp_path / "two", *follow, *split)
    assert u1 == u2
    held = len(d2["prompt_tokens"]) + d2["generated_tokens"]
    assert e2["cached_tokens"] == e1["cached_tokens"] >= held - 1
    # another split makes the saved parts another model's: the history is read again, to the same answer
    v2, f2, proc = answer(TWO, tmp_path / "two", "-c", "And the rivers?", *other)
    v1, f1, _ = answer(ONE, tmp_path / "one", "-c", "And the rivers?")
    assert v1 == v2 and f2["cached_tokens"] == 0 and f1["cached_tokens"] > 0
    assert "another model, dtype, quantization or split" in proc.stderr


def rank_pid(parent: subprocess.Popen, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == parent.pid:
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent.pid and f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b" ".join(environ):
            return int(pid)
    return None


def start_long_reply(folder: Path, home: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([*TWO, "--model", str(folder), "--draft", "0", "--max-tokens", "30000", "--context",
                             "32000", "--json", *extra, "tell me everything"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(home))
    assert proc.stdout.readline().startswith("{")  # a token: the reply is under way
    return proc


@pytest.mark.parametrize("model, split, how, says", [
    ("dense", "pipeline", signal.SIGKILL, "rank 1 closed its connection"),
    ("dense", "pipeline", signal.SIGSTOP, "rank 1 did not answer within 2 s"),
    ("mixtral", "experts", signal.SIGKILL, "rank 1 closed its connection"),
])
def test_a_lost_rank_is_named_and_the_conversation_kept(request, tmp_path, model, split, how, says):
    folder = request.getfixturevalue(model)
    proc = start_long_reply(folder, tmp_path / "home", "--rank-timeout", "2", "--split", split)
    pid = rank_pid(proc, 1)
    assert pid is not None
    began = time.monotonic()
    os.kill(pid, how)
    err = ""
    try:
        # rank 0's one line first; then a stopped rank is killed, or torchrun would wait for it to end
        for line in proc.stderr:
            err += line
            if line.startswith("mixchat: error:"):
                break
        if how == signal.SIGSTOP:
            os.kill(pid, signal.SIGKILL)
        err += proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert time.monotonic() - began < 60  # no hang
    line = next(ln for ln in err.splitlines() if ln.startswith("mixchat: error:"))
    assert says in line and "what was said so far is saved" in line
    assert "Traceback" not in err.split("mixchat: error:")[0]  # mixchat's own part: one line, no traceback
    shown = subprocess.run([*ONE, "list"], capture_output=True, text=True, env=env(tmp_path / "home"))
    cid = shown.stdout.splitlines()[1].split()[0]
    transcript = subprocess.run([*ONE, "show", cid], capture_output=True, text=True, env=env(tmp_path / "home")).stdout
    assert "## assistant [error]" in transcript and "tell me everything" in transcript


def test_the_expert_split_keeps_each_ranks_experts_within_its_memory_budget(mixtral, tmp_path):
    def run(cmd, home, *extra):
        proc = subprocess.run([*cmd, "--model", str(mixtral), "--json", "--temperature", "0", "--max-tokens", "20",
                               *extra, "hello there, how are you"], capture_output=True, text=True, timeout=300,
                              env=env(home))
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        return [(ln["token"], ln["experts"]) for ln in lines if "token" in ln], lines[-1]

    whole, _ = run(ONE, tmp_path / "one")
    # ~3 of each rank's 8 experts fit beside the resident weights: most tokens load some from the file
    shared, done = run(TWO, tmp_path / "two", "--split", "experts", "--memory-budget", "0.0175")
    assert shared == whole
    assert done["experts"]["misses"] > 8 and done["world_size"] == 2
    proc = subprocess.run([*TWO, "--model", str(mixtral), "--memory-budget", "0.0175", "-p", "hi"], capture_output=True,
                          text=True, timeout=300, env=env(tmp_path / "two"))
    assert proc.returncode != 0 and "--memory-budget works across ranks with --split experts only" in proc.stderr


def test_an_error_on_rank_zero_after_the_others_loaded_ends_every_rank_at_once(dense, tmp_path):
    began = time.monotonic()
    proc = subprocess.run([*TWO, "--model", str(dense), "--context", "100000", "-p", "hi"], capture_output=True,
                          text=True, timeout=300, env=env(tmp_path / "home"))
    assert proc.returncode != 0 and "mixchat: error: --context 100000" in proc.stderr
    assert time.monotonic() - began < 60  # the others' answers are read, so nobody waits out a timeout


def test_every_probe_answer_is_read_before_a_refusal(dense):
    """A rank whose answer is left unread waits on it, and rank 0's stop after the error would wait on that."""
    group = FakeGroup([{"error": "no release folder at /x"}, {"identity": release_identity(dense), "free": 1}])
    group.size = 3
    with pytest.raises(MixchatError, match="rank 1: no release folder"):
        Pipeline(group).plan(dense, {}, tiny_args(**SHAPE), 1, 1, None)
    assert group.replies == []


def test_only_rank_zero_gives_up_waiting():
    import datetime

    class Work:
        def wait(self, timeout):
            self.timeout = timeout

    for rank, expect in ((0, datetime.timedelta(seconds=3)), (1, dist_group.FOREVER)):
        g = object.__new__(dist_group.Group)
        g.rank, g.timeout = rank, datetime.timedelta(seconds=3)
        work = Work()
        g._wait(work, 1, "", forever=False)
        assert work.timeout == expect


def test_a_lost_rank_inside_the_layers_lets_go_of_the_exchange(dense):
    """Under the expert split the sums run inside rank 0's layers: a rank lost there must not leave the lock
    held, or the app's other thread (saving, deleting a conversation) would wait for good."""
    import threading

    class Lost(FakeGroup):
        def send(self, t, peer, doing=""):
            pass

        def all_reduce(self, t, doing=""):
            self.broken = "rank 1 closed its connection"
            raise dist_group.RankLost(self.broken)

    group = Lost([])
    group.timeout = __import__("datetime").timedelta(seconds=5)
    pipe = Pipeline(group)
    pipe.parts = [Part(range(4), range(0, 2), head=True), Part(range(4), range(2, 4))]

    class Cache:
        cid = 1

    pipe.start(torch.zeros(1, 8), Cache())
    with pytest.raises(dist_group.RankLost):
        pipe.reduce(torch.zeros(1, 8))
    took = []
    t = threading.Thread(target=lambda: took.append(pipe.lock.acquire(timeout=2)))
    t.start()
    t.join()
    assert took == [True] and group.broken


def test_the_disk_budget_keeps_every_part_of_the_conversation_just_saved(tmp_path):
    from mixchat.conversations.kvstore import enforce_disk_budget

    for i, name in enumerate(["old.safetensors", "old.rank1.safetensors", "new.rank1.safetensors",
                              "new.safetensors"]):
        (tmp_path / name).write_bytes(b"x" * 100)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    removed = enforce_disk_budget(tmp_path, 150, keep=tmp_path / "new.safetensors")
    assert sorted(p.name for p in removed) == ["old.rank1.safetensors", "old.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.rank1.safetensors", "new.safetensors"]


def test_rm_deletes_the_parts_other_ranks_saved_on_this_machine(dense, tmp_path):
    home = tmp_path / "home"
    _, done, _ = answer(ONE, home, "--model", str(dense), "hello")
    cid = done["conversation"]
    part = home / "kv" / f"{cid}.rank1.safetensors"
    part.write_bytes(b"part")
    proc = subprocess.run([*ONE, "rm", cid], capture_output=True, text=True, env=env(home))
    assert proc.returncode == 0, proc.stderr
    assert not part.exists() and not (home / "kv" / f"{cid}.safetensors").exists()
