"""The process group of a torchrun launch, and the messages its ranks exchange.

Rank 0 is the program the user sees; every other rank only answers it. Messages are point to point:
commands as JSON (never pickle: a peer's bytes are data, not code) and activations as raw tensors of a
shape both sides know. gloo has no authentication, so the group binds to one interface (the one that
reaches the rendezvous address, or GLOO_SOCKET_IFNAME) and README says the ranks must sit on a trusted
network.

A rank that dies closes its connections, which gloo reports at once; one that hangs is given up after
the rank timeout (--rank-timeout). Either way the group is broken from then on (gloo closes the pair on a
timeout): rank 0 names the rank, keeps what it has saved, and exits non-zero.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import struct

import torch

from mixchat.errors import MixchatError

DEFAULT_TIMEOUT = 120.0  # seconds rank 0 waits on another rank's answer (one chunk of its layers)
MAX_MESSAGE = 1 << 20  # bytes of one JSON command: a larger length is a broken peer, not a command
FOREVER = datetime.timedelta(days=365)  # the others wait on rank 0 for as long as the user keeps chatting


AFTER = "what was said so far is saved; start every rank again to go on"


class RankLost(MixchatError):
    """Another rank died, hung past the timeout or could not be reached."""


def world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launched() -> bool:
    return world_size() > 1 and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def _interface_for(host: str) -> str | None:
    """The network interface whose address reaches `host` (None when it cannot be told)."""
    import fcntl

    try:
        ip = socket.gethostbyname(host)
        if ip.startswith("127."):
            return "lo"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))  # no packet is sent: this only asks the routing table
            local = s.getsockname()[0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    req = struct.pack("256s", name.encode()[:15])
                    addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24])  # SIOCGIFADDR
                except OSError:
                    continue
                if addr == local:
                    return name
    except OSError:
        return None
    return None


class Group:
    """This process's place in the launch: rank, size, and messages to and from the others."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.timeout = datetime.timedelta(seconds=timeout)
        self.broken: str | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.pipeline = None  # rank 0's mixchat.distributed.pipeline.Pipeline, once a model is loaded
        # The launch's --split and --rank-layers: every model rank 0 loads in this launch is split so (the app
        # loads models from its settings, which do not hold them).
        self.split: str = "pipeline"
        self.rank_layers: list[int] | None = None
        if "GLOO_SOCKET_IFNAME" not in os.environ and (iface := _interface_for(os.environ["MASTER_ADDR"])):
            os.environ["GLOO_SOCKET_IFNAME"] = iface  # listen on the rendezvous network only
        try:
            dist.init_process_group("gloo", timeout=FOREVER)
        except (RuntimeError, ValueError) as exc:
            raise MixchatError(f"torch.distributed could not start (rendezvous {os.environ.get('MASTER_ADDR')}:"
                               f"{os.environ.get('MASTER_PORT')}): {_first_line(exc)}; check --rdzv-endpoint and that "
                               "every rank runs the same command") from None
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def set_timeout(self, seconds: float) -> None:
        self.timeout = datetime.timedelta(seconds=seconds)

    # -- faults
    def _lost(self, peer: int | str, exc: Exception, doing: str) -> RankLost:
        text = str(exc)
        if "Timed out" in text or "timeout" in text.lower() and "closure" not in text:
            why = f"did not answer within {self.timeout.total_seconds():g} s (--rank-timeout)"
        else:
            why = "closed its connection (the process died or was killed, or the network dropped)"
        self.broken = f"rank {peer} {why} while {doing}"
        return RankLost(f"{self.broken}; {AFTER}")

    def _check(self) -> None:
        if self.broken is not None:
            raise RankLost(f"{self.broken}; {AFTER}")

    def _wait(self, work, peer: int | str, doing: str, forever: bool) -> None:
        try:
            # Only rank 0 gives up: the others wait on it (and on the rank before them) for as long as it takes,
            # since rank 0 is the one that names a lost rank and keeps what was said.
            work.wait(FOREVER if forever or self.rank != 0 else self.timeout)
        except RuntimeError as exc:
            raise self._lost(peer, exc, doing) from None

    # -- tensors
    def send(self, t: torch.Tensor, peer: int, doing: str = "sending to it") -> None:
        self._check()
        t = t.detach().contiguous().cpu()
        try:
            work = self.dist.isend(t, peer)
        except RuntimeError as exc:
            raise self._lost(peer, exc, doing) from None
        self._wait(work, peer, doing, forever=False)
        self.bytes_sent += t.nbytes

    def recv(self, t: torch.Tensor, peer: int, doing: str = "waiting on it", forever: bool = False) -> torch.Tensor:
        """Receive into `t` (a CPU tensor of the agreed shape and dtype) from `peer`."""
        self._check()
        try:
            work = self.dist.irecv(t, peer)
        except RuntimeError as exc:
            raise self._lost(peer, exc, doing) from None
        self._wait(work, peer, doing, forever)
        self.bytes_received += t.nbytes
        return t

    # -- commands
    def send_json(self, obj: dict, peer: int, doing: str = "sending it a command") -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        self.send(torch.tensor([len(data)], dtype=torch.int64), peer, doing)
        self.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), peer, doing)

    def recv_json(self, peer: int, doing: str = "waiting on its answer", forever: bool = False) -> dict:
        n = int(self.recv(torch.zeros(1, dtype=torch.int64), peer, doing, forever)[0])
        if not 0 < n <= MAX_MESSAGE:
            self.broken = f"rank {peer} sent a malformed message ({n} bytes)"
            raise RankLost(f"{self.broken}; every rank must run the same mixchat version")
        data = self.recv(torch.zeros(n, dtype=torch.uint8), peer, doing, forever)
        try:
            obj = json.loads(bytes(data.numpy()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
        if not isinstance(obj, dict):
            self.broken = f"rank {peer} sent a message that is not a command"
            raise RankLost(f"{self.broken}; every rank must run the same mixchat version")
        return obj

    def all_reduce(self, t: torch.Tensor, doing: str = "adding its part") -> None:
        """Sum `t` (a CPU tensor) across every rank, in place."""
        self._check()
        peer = 1 if self.size == 2 else 0 if self.rank else f"1-{self.size - 1}"
        try:
            work = self.dist.all_reduce(t, async_op=True)
        except RuntimeError as exc:
            raise self._lost(peer, exc, doing) from None
        self._wait(work, peer, doing, forever=False)
        self.bytes_sent += t.nbytes
        self.bytes_received += t.nbytes

    def close(self) -> None:
        if self.broken is None:
            try:
                self.dist.destroy_process_group()
            except (RuntimeError, ValueError):
                pass


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


_group: Group | None = None


def current() -> Group | None:
    """The group of this launch, once start() made it (None in a plain, single-process run)."""
    return _group


def start(timeout: float = DEFAULT_TIMEOUT) -> Group | None:
    """Join the launch's group (once); None when not launched by torchrun with more than one rank."""
    global _group
    if _group is None and launched():
        _group = Group(timeout)
    elif _group is not None:
        _group.set_timeout(timeout)
    return _group
