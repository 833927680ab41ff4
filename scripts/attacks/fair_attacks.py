"""Issue 17, findings 2, 4, 9 (NaN) and fair servers, re-run with real processes on 127.0.0.1.

Starts a ``meshinfer dht`` and two ``meshinfer serve`` processes on the demo model (8 blocks: A serves 0:4,
B serves 4:8, default limits), then, each as its own identity (a client-mode ``PeerNode``):

- sessions: an attacker opens 32 sessions of 1,024 tokens on A at once; then an honest greedy generation
  (``DistributedModel``) must equal the local one;
- hijack: a victim runs a push route A -> B; the attacker pushes a step into the victim's B session on
  ``/meshinfer/push/1``; the victim's next step must still equal the local computation;
- nan: a step whose hidden states hold NaN must be refused, the session unchanged;
- greedy: a victim's decode latency on an idle A (before and after), then while a greedy peer (a process of
  its own) keeps 16 sessions busy with 256-token prefills, 8 queued each; the ratio loaded/idle.

Prints one JSON document (RSS and open fds of every server before/during/after each attack). Run with
``PYTHONPATH=src`` (this tree) or ``PYTHONPATH=/work/main/src`` (the code before) to compare. Every process it
starts is stopped by PID at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any

import torch

from meshinfer.config import P2PConfig
from meshinfer.errors import RemoteError
from meshinfer.loopthread import LoopThread
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.p2p import SESSION_PROTOCOL, PeerNode
from meshinfer.p2p.announce import read_coverage
from meshinfer.p2p.node import NodeSettings
from meshinfer.readyline import parse_ready_line
from meshinfer.testing.checkpoints import demo_checkpoint
from meshinfer.testing.procs import ManagedProcess, meshinfer_argv, start_dht
from meshinfer.types import BlockRange
from meshinfer.wire.messages import Error, Hop, Open, Opened, Step, StepResult
from meshinfer.wire.tensor import decode_tensor, encode_tensor

PUSH = "/meshinfer/push/1"
HIDDEN = 128


def proc_stats(pid: int) -> dict[str, float]:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {"rss_mb": round(rss / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class Peer:
    """One identity: a client-mode node on its own loop thread."""

    def __init__(self, bootstrap: list[str]) -> None:
        self.loop = LoopThread(name=f"peer-{uuid.uuid4().hex[:4]}").start()
        self.node: PeerNode = self.loop.run(
            PeerNode.start(P2PConfig(initial_peers=tuple(bootstrap)), NodeSettings(client_mode=True)), 60)

    def run(self, coro: Any, timeout: float = 120.0) -> Any:
        return self.loop.run(coro, timeout)

    def close(self) -> None:
        try:
            self.run(self.node.close(), 30)
        finally:
            self.loop.stop()


async def open_session(node: PeerNode, srv: dict[str, Any], span: BlockRange, max_length: int,
                       tail: list[Hop] | None = None, prev: str | None = None) -> tuple[Any, str, Any]:
    stream = await node.open_stream(srv["peer_id"], SESSION_PROTOCOL, maddrs=srv["maddrs"], direct=srv["direct"])
    sid = uuid.uuid4().hex
    extra = {"prev_peer": prev} if "prev_peer" in Open.__struct_fields__ else {}
    reply = await _request(stream, Open(session_id=sid, model=srv["model_id"], span=span, max_length=max_length,
                                        dtype="float32", route_tail=tail or [], **extra))
    return stream, sid, reply


async def _request(stream: Any, msg: Any) -> Any:
    """The reply to ``msg``; an ``Error`` reply is returned, not raised."""
    try:
        return await stream.request(msg, timeout=60)
    except RemoteError as err:
        return Error(code=err.code, message=err.remote_message[:4096])


async def step(stream: Any, sid: str, step_id: int, position: int, x: torch.Tensor) -> Any:
    return await _request(stream, Step(session_id=sid, step_id=step_id, position=position, hidden=encode_tensor(x)))


def start(bootstrap: list[str], ckpt: str, blocks: str) -> tuple[ManagedProcess, dict[str, Any]]:
    proc = ManagedProcess(meshinfer_argv("serve", "--model", ckpt, "--blocks", blocks, "--initial-peers", *bootstrap,
                                         "--torch-threads", "1", "--stop-on-stdin-eof"), name=f"serve {blocks}")
    while (info := parse_ready_line(proc.read_line(180))) is None:
        pass
    return proc, info


def attack_sessions(out: dict[str, Any], a: dict[str, Any], atk: Peer, bootstrap: list[str], ckpt: str,
                    stats: Any) -> None:
    from meshinfer.client.model import DistributedModel
    from meshinfer.models.engine import LocalModel

    out["before"] = stats()
    t0 = time.perf_counter()

    async def flood() -> list[Any]:
        return await asyncio.gather(*(open_session(atk.node, a, BlockRange(0, 4), 1024) for _ in range(32)),
                                    return_exceptions=True)

    got = atk.run(flood())
    out["flood_s"] = round(time.perf_counter() - t0, 2)
    opened = [g for g in got if not isinstance(g, BaseException) and isinstance(g[2], Opened)]
    refused = [g[2] for g in got if not isinstance(g, BaseException) and isinstance(g[2], Error)]
    out["opened"], out["refused"] = len(opened), len(refused)
    out["refusal"] = refused[0].message if refused else None
    out["during"] = stats()
    ids = list(range(5, 25))
    want = LocalModel.from_pretrained(ckpt).generate(ids, 16)
    t0 = time.perf_counter()
    try:
        with DistributedModel.from_pretrained(ckpt, bootstrap, step_timeout=20.0) as model:
            got_ids = model.generate(ids, 16)
        out["honest_exact"] = list(got_ids) == list(want)
    except Exception as err:  # the old code: no route while the attacker holds every slot
        out["honest_exact"], out["honest_error"] = False, f"{type(err).__name__}: {err}"[:300]
    out["honest_s"] = round(time.perf_counter() - t0, 2)

    async def close_all() -> None:
        for stream, _, _ in opened:
            await stream.close()

    atk.run(close_all())
    time.sleep(1.0)
    out["after"] = stats()


def attack_hijack(out: dict[str, Any], a: dict[str, Any], b: dict[str, Any], vic: Peer, atk: Peer,
                  whole: Any) -> None:
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(3, HIDDEN, generator=gen), torch.randn(1, HIDDEN, generator=gen)]
    cache = whole.new_cache(16)
    with torch.inference_mode():
        want = [whole(x.unsqueeze(0), cache)[0].clone() for x in xs]

    async def main() -> dict[str, Any]:
        res: dict[str, Any] = {}
        sb, sid_b, _ = await open_session(vic.node, b, BlockRange(4, 8), 16, prev=a["peer_id"])
        hop = Hop(peer_id=b["peer_id"], span=BlockRange(4, 8), session_id=sid_b, maddrs=b["maddrs"],
                  direct=b["direct"])
        sa, sid_a, _ = await open_session(vic.node, a, BlockRange(0, 4), 16, tail=[hop])
        await sa.send(Step(session_id=sid_a, step_id=0, position=0, hidden=encode_tensor(xs[0])))
        await sa.recv(30)
        first = await sb.recv(30)
        res["victim_step0_exact"] = isinstance(first, StepResult) and torch.allclose(
            decode_tensor(first.hidden), want[0], atol=1e-5, rtol=0)
        if not res["victim_step0_exact"]:
            res["victim_step0_got"] = repr(first)[:200]
        push = await atk.node.open_stream(b["peer_id"], PUSH, maddrs=b["maddrs"], direct=b["direct"])
        await push.send(Step(session_id=sid_b, step_id=50, position=1, hidden=encode_tensor(torch.randn(1, HIDDEN))))
        try:
            reply = await push.recv(3)
            res["attacker_got"] = f"{type(reply).__name__}: {getattr(reply, 'message', '')}"[:200]
        except Exception as err:
            res["attacker_got"] = f"nothing ({type(err).__name__})"
        await asyncio.sleep(0.5)
        # (old code: the victim's own stream now carries the hijacked step's result)
        await sa.send(Step(session_id=sid_a, step_id=1, position=3, hidden=encode_tensor(xs[1])))
        await sa.recv(30)
        msgs = []
        while True:
            msg = await sb.recv(30)
            msgs.append(msg)
            if getattr(msg, "step_id", None) == 1:
                break
        last = msgs[-1]
        res["victim_saw"] = [f"{type(m).__name__}({getattr(m, 'step_id', '')})" for m in msgs]
        res["victim_step1_exact"] = isinstance(last, StepResult) and torch.allclose(
            decode_tensor(last.hidden), want[1], atol=1e-5, rtol=0)
        if isinstance(last, Error):
            res["victim_error"] = last.message[:200]
        for s in (sa, sb, push):
            await s.close()
        return res

    out.update(vic.run(main()))


def attack_nan(out: dict[str, Any], a: dict[str, Any], atk: Peer, first_span: Any) -> None:
    x = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(9))
    cache = first_span.new_cache(16)
    with torch.inference_mode():
        want = first_span(x.unsqueeze(0), cache)[0].clone()

    async def main() -> dict[str, Any]:
        stream, sid, _ = await open_session(atk.node, a, BlockRange(0, 4), 16)
        bad = torch.randn(2, HIDDEN)
        bad[0, 0] = float("nan")
        reply = await step(stream, sid, 0, 0, bad)
        res = {"nan_reply": f"{type(reply).__name__}: {getattr(reply, 'message', '')}"[:160]}
        if isinstance(reply, StepResult):
            res["nan_output_has_nan"] = bool(torch.isnan(decode_tensor(reply.hidden)).any())
        ok = await step(stream, sid, 1, 0, x)
        res["valid_step_after_exact"] = isinstance(ok, StepResult) and torch.allclose(
            decode_tensor(ok.hidden), want, atol=1e-5, rtol=0)
        await stream.close()
        return res

    out.update(atk.run(main()))


def greedy_worker(spec: dict[str, Any]) -> None:
    """The greedy peer, in a process of its own (a client process of its own: no shared GIL with the victim):
    ``sessions`` sessions, each keeping ``inflight`` 256-token prefills queued, until its stdin closes."""
    atk = Peer(spec["bootstrap"])
    a = spec["server"]
    stop = asyncio.Event()

    async def greedy_one() -> int:
        stream, sid, reply = await open_session(atk.node, a, BlockRange(0, 4), 512)
        if not isinstance(reply, Opened):
            return 0
        step_id, pending, done = 0, 0, 0
        x = encode_tensor(torch.randn(256, HIDDEN))
        while not stop.is_set():
            while pending < spec["inflight"]:
                await stream.send(Step(session_id=sid, step_id=step_id, position=0, hidden=x))
                step_id, pending = step_id + 1, pending + 1
            await stream.recv(60)
            pending, done = pending - 1, done + 1
        await stream.close()
        return done

    async def run() -> list[int]:
        tasks = [asyncio.ensure_future(greedy_one()) for _ in range(spec["sessions"])]
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        stop.set()
        return list(await asyncio.gather(*tasks, return_exceptions=True))  # type: ignore[arg-type]

    try:
        print(json.dumps({"steps": atk.run(run(), 600)}), flush=True)
    finally:
        atk.close()


def attack_greedy(out: dict[str, Any], a: dict[str, Any], vic: Peer, bootstrap: list[str], stats: Any,
                  sessions: int, inflight: int) -> None:
    import subprocess

    async def decode_latency(n: int) -> list[float]:
        stream, sid, _ = await open_session(vic.node, a, BlockRange(0, 4), n + 8)
        await step(stream, sid, 0, 0, torch.randn(4, HIDDEN))
        lat = []
        for i in range(n):
            t0 = time.perf_counter()
            reply = await step(stream, sid, i + 1, 4 + i, torch.randn(1, HIDDEN))
            assert isinstance(reply, StepResult), reply
            lat.append(time.perf_counter() - t0)
        await stream.close()
        return lat

    idle = vic.run(decode_latency(60))
    spec = {"bootstrap": bootstrap, "server": a, "sessions": sessions, "inflight": inflight}
    worker = subprocess.Popen([sys.executable, __file__, "--greedy-worker", json.dumps(spec)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and worker.stdin is not None
        assert worker.stdout.readline().strip() == "ready"
        time.sleep(3.0)
        out["during"] = stats()
        busy = vic.run(decode_latency(60))
        worker.stdin.close()
        out["greedy"] = json.loads(worker.stdout.readline())
        worker.wait(60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    idle += vic.run(decode_latency(60))  # idle again after: the machine is shared, its load drifts

    def summary(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {"median_ms": round(statistics.median(xs) * 1000, 2), "p90_ms": round(xs[int(0.9 * len(xs))] * 1000, 2)}

    out["idle"], out["loaded"] = summary(idle), summary(busy)
    out["ratio_median"] = round(out["loaded"]["median_ms"] / out["idle"]["median_ms"], 2)
    out["ratio_p90"] = round(out["loaded"]["p90_ms"] / out["idle"]["p90_ms"], 2)


def main() -> int:
    if sys.argv[1:2] == ["--greedy-worker"]:
        greedy_worker(json.loads(sys.argv[2]))
        return 0
    only = set(sys.argv[1:]) or {"sessions", "hijack", "nan", "greedy"}
    torch.set_num_threads(1)
    ckpt = str(demo_checkpoint())
    dht, bootstrap = start_dht(timeout=90)
    procs: list[ManagedProcess] = [dht]
    peers: list[Peer] = []
    report: dict[str, Any] = {"code": os.environ.get("PYTHONPATH", "")}
    try:
        (pa, a), (pb, b) = start(bootstrap, ckpt, "0:4"), start(bootstrap, ckpt, "4:8")
        procs += [pa, pb]
        vic, atk = Peer(bootstrap), Peer(bootstrap)
        peers += [vic, atk]
        cov = vic.run(read_coverage(vic.node, a["model_id"], 8, timeout=10))
        for srv in (a, b):
            srv["direct"] = list(cov.servers[srv["peer_id"]].direct_addresses)

        def stats() -> dict[str, Any]:
            return {"A": proc_stats(pa.pid), "B": proc_stats(pb.pid)}

        report["baseline"] = stats()
        ck = Checkpoint(ckpt)
        whole, first = ck.load_span(BlockRange(0, 8)), ck.load_span(BlockRange(0, 4))
        for name in ("sessions", "hijack", "nan", "greedy"):
            if name not in only:
                continue
            out: dict[str, Any] = {}
            report[name] = out
            t0 = time.perf_counter()
            if name == "sessions":
                attack_sessions(out, a, atk, bootstrap, ckpt, stats)
            elif name == "hijack":
                attack_hijack(out, a, b, vic, atk, whole)
            elif name == "nan":
                attack_nan(out, a, atk, first)
            else:
                attack_greedy(out, a, vic, bootstrap, stats, sessions=16, inflight=8)
            out["after"] = stats()
            out["wall_s"] = round(time.perf_counter() - t0, 2)
            print(json.dumps({name: out}), file=sys.stderr, flush=True)
        report["end"] = stats()
    finally:
        for p in peers:
            p.close()
        for proc in reversed(procs):
            proc.stop()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
