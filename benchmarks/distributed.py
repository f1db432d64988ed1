"""Pipeline parallelism on this machine: `mixchat bench` as one process with 2 threads, against the same
model split over 2 ranks of 1 thread each (torchrun, gloo on 127.0.0.1), and over 2 ranks in two network
namespaces joined by a simulated Ethernet link (tc netem: a delay each way and a rate limit), to predict
two boxes on a LAN. Prints prefill and decode tok/s, the time each decoded token waits on the other rank
and the bytes rank 0 sends and receives per token.

    python benchmarks/distributed.py --model /work/bench/mistral-7b [--quant int8] [--delay-ms 1] [--rate 1gbit]

The namespaces need root (ip netns, tc); without it that row is skipped with a note. Run it on a quiet
machine: on 2 cores anything else running changes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NS = ("mcbench0", "mcbench1")
ADDR = ("10.77.0.1", "10.77.0.2")


def bench_args(a: argparse.Namespace, threads: int, split: str | None = None) -> list[str]:
    out = ["-m", "mixchat", "bench", "--model", a.model, "--json", "--threads", str(threads),
           "--prompt-tokens", str(a.prompt_tokens), "--decode-tokens", str(a.decode_tokens), "--runs", str(a.runs)]
    return out + (["--quant", a.quant] if a.quant else []) + (["--split", split] if split else [])


def is_moe(folder: str) -> bool:
    return bool(json.loads((Path(folder) / "params.json").read_text()).get("moe"))


def parse(stdout: str) -> dict:
    start = stdout.index("{")
    return json.loads(stdout[start: stdout.rindex("}") + 1])


def run(cmd: list[str], env: dict, timeout: int = 3600) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return parse(proc.stdout)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def make_link(delay_ms: float, rate: str) -> bool:
    """Two namespaces joined by a veth pair limited to `rate`, and delayed by `delay_ms` each way where the
    kernel has netem; returns whether the delay is simulated."""
    drop_link()
    for ns in NS:
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", "mcbv0", "type", "veth", "peer", "name", "mcbv1")
    for i, ns in enumerate(NS):
        dev = f"mcbv{i}"
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{ADDR[i]}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # each direction: the delay and the rate of one side of the wire
        try:
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", f"{delay_ms}ms", "rate", rate)
            delayed = True
        except subprocess.CalledProcessError:  # a kernel without sch_netem: the rate alone (tbf), delay added after
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb",
               "latency", "100ms")
            delayed = False
    return delayed


def drop_link() -> None:
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def over_link(a: argparse.Namespace, env: dict, split: str) -> dict:
    """2 ranks, one per namespace, with torchrun's static rendezvous on rank 0's address."""
    procs = []
    for node, ns in enumerate(NS):
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr", ADDR[0], "--master-port", "29531",
               *bench_args(a, 1, split)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outs = [p.communicate(timeout=3600) for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("failed over the simulated link:\n" + "\n".join(err[-2000:] for _, err in outs))
    return parse(outs[0][0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--quant", default=None)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--delay-ms", type=float, default=1.0, help="one-way delay of the simulated link (each direction)")
    p.add_argument("--rate", default="1gbit", help="the simulated link's rate (tc's notation)")
    p.add_argument("--skip-link", action="store_true")
    p.add_argument("--out", help="write every run's JSON here")
    a = p.parse_args()
    home = tempfile.mkdtemp(prefix="mixchat-distbench-")
    env = {**os.environ, "MIXCHAT_HOME": home, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    rows = {}
    rows["one process, 2 threads"] = run([sys.executable, *bench_args(a, 2)], env)
    splits = ["pipeline", "experts"] if is_moe(a.model) else ["pipeline"]
    for split in splits:
        rows[f"{split}: 2 ranks x 1 thread, 127.0.0.1"] = run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             *bench_args(a, 1, split)], env)
    for split in splits if not a.skip_link else []:
        try:
            delayed = make_link(a.delay_ms, a.rate)
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            print(f"note: no simulated link ({exc}); run as root with iproute2 for that row", file=sys.stderr)
            break
        try:
            r = over_link(a, env, split)
        finally:
            drop_link()
        if delayed:
            rows[f"{split}: 2 ranks x 1 thread, {a.delay_ms:g} ms each way, {a.rate}"] = r
        else:
            rows[f"{split}: 2 ranks x 1 thread, {a.rate} (tbf; no netem in this kernel)"] = r
            # The round trips on each token's critical path: the pipeline's one (rank 0's command and
            # activations out, rank 1's report and activations back); the expert split's one per MoE layer
            # (the all_reduce) and the report. The same per prompt chunk.
            trips = 1 if split == "pipeline" else 1 + json.loads((Path(a.model) / "params.json").read_text())[
                "n_layers"]
            rt = 2 * a.delay_ms / 1e3 * trips
            chunks = -(-a.prompt_tokens // 256)
            prefill_s = a.prompt_tokens / r["prefill_tokens_per_second"] + chunks * rt
            rows[f"{split}: the same + {a.delay_ms:g} ms each way x {trips} round trips (predicted)"] = {
                **r, "prefill_tokens_per_second": a.prompt_tokens / prefill_s,
                "decode_tokens_per_second": 1 / (1 / r["decode_tokens_per_second"] + rt),
                "rank_wait_ms_per_token": round(r["rank_wait_ms_per_token"] + rt * 1e3, 3)}
    print(f"{a.model} ({a.quant or 'bf16'}), {a.prompt_tokens}-token prompt, {a.decode_tokens} decoded, "
          f"median of {a.runs}")
    print("| run | prefill tok/s | decode tok/s | waiting on rank 1 (ms/token) | bytes per token | split |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['prefill_tokens_per_second']:.2f} | {r['decode_tokens_per_second']:.3f} | "
              f"{r.get('rank_wait_ms_per_token', '')} | {r.get('link_bytes_per_token', '')} | {r.get('split', '')} |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
