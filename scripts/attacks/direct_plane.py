"""Attacks on a server's direct data plane, with real processes on 127.0.0.1 (issue 17, findings 3, 6, 9).

Starts a one-server swarm of the demo model (a ``meshinfer dht`` and a ``meshinfer serve`` with every
block), then, as a stranger with self-made keys:

- ``buffer``: N connections each complete the handshake and send F frames of 1 MiB of a message never
  finished (F x 1 MiB each); the server's RSS before, at its peak and after, frames taken, seconds until
  the server closed each connection;
- ``tls``: R rounds of C TCP connect/close cycles on the TLS port (20 at a time); RSS after each round;
- ``slowloris``: S sockets each on the TLS port (silent), the plain port (2 bytes of a hello) and
  authenticated streams that send 3 bytes of a frame and stall: how many the server closed within W s;

and after each, a greedy generation through the swarm compared token by token with the local model.
Prints one JSON object. Run with the code under test on PYTHONPATH::

    PYTHONPATH=src python scripts/attacks/direct_plane.py --attacks buffer,tls,slowloris

Stops everything it started by PID (``LocalSwarm.stop``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import threading
import time
from typing import Any

MIB = 1024 * 1024


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Peak:
    """Samples a process's RSS every 50 ms in a thread; ``max`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.max, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max = max(self.max, rss_mb(self.pid))
            time.sleep(0.05)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def buffer_attack(peer_id: str, address: str, conns: int, frames: int) -> dict[str, Any]:
    from meshinfer.p2p import SESSION_PROTOCOL
    from meshinfer.p2p.direct import DirectPlane
    from meshinfer.p2p.identity import Identity
    from meshinfer.p2p.stream import DEFAULT_SETTINGS
    from meshinfer.wire.framing import HEADER, MAGIC

    frame = HEADER.pack(MAGIC, 0, MIB) + b"\x00" * MIB  # never the last frame

    async def one() -> dict[str, Any]:
        plane = DirectPlane(Identity.generate())  # a self-made key
        stream = await plane.dial(peer_id, address, SESSION_PROTOCOL, settings=DEFAULT_SETTINGS, timeout=10)
        started, sent = time.monotonic(), 0
        try:
            for _ in range(frames):
                await stream.write_raw(frame)
                sent += 1
            reply = "held open"
            try:  # the server keeps the message: wait up to 10 s for it to give up
                await stream.recv_bytes(timeout=10.0)
                reply = "reply"
            except Exception as err:
                reply = type(err).__name__
        except Exception as err:
            reply = f"closed while sending: {type(err).__name__}"
        closed_after = time.monotonic() - started
        await stream.close()
        return {"frames_sent": sent, "outcome": reply, "seconds": round(closed_after, 2)}

    return {"connections": await asyncio.gather(*(one() for _ in range(conns)))}


async def tls_cycles(host: str, port: int, count: int) -> None:
    sem = asyncio.Semaphore(20)

    async def one() -> None:
        async with sem:
            try:
                _, writer = await asyncio.open_connection(host, port)
                writer.close()
                await writer.wait_closed()
            except OSError:
                pass

    await asyncio.gather(*(one() for _ in range(count)))


async def slowloris(peer_id: str, tls: tuple[str, int], plain: tuple[str, int], plain_addr: str, n: int,
                    wait: float) -> dict[str, Any]:
    from meshinfer.p2p import SESSION_PROTOCOL
    from meshinfer.p2p.direct import DirectPlane
    from meshinfer.p2p.identity import Identity
    from meshinfer.p2p.stream import DEFAULT_SETTINGS

    async def raw(host: str, port: int, data: bytes) -> float | str | None:
        reader, writer = await asyncio.open_connection(host, port)
        started = time.monotonic()
        writer.write(data)
        try:
            async with asyncio.timeout(wait):
                while await reader.read(4096):
                    pass
            return time.monotonic() - started
        except TimeoutError:
            return None
        except OSError:
            return time.monotonic() - started
        finally:
            writer.close()

    keys = [Identity.generate() for _ in range(n)]  # before any dial: key generation blocks the loop

    async def stalled(key: Identity) -> float | str | None:
        try:
            stream = await DirectPlane(key).dial(peer_id, plain_addr, SESSION_PROTOCOL,
                                                 settings=DEFAULT_SETTINGS, timeout=10)
        except Exception as err:
            return f"dial failed: {str(err)[:80]}"
        started = time.monotonic()
        await stream.write_raw(b"\xe7\x00\x00")  # 3 of the 6 header bytes, then nothing
        try:
            while True:
                await stream.recv_bytes(timeout=wait)  # an Error reply, then the end of the stream
        except Exception as err:
            return None if "timeout" in str(err) and time.monotonic() - started >= wait else \
                time.monotonic() - started
        finally:
            await stream.close()

    kinds = {"tls_silent": [raw(*tls, b"") for _ in range(n)],
             "plain_partial_hello": [raw(*plain, b"\x00\x00") for _ in range(n)],
             "stream_partial_frame": [stalled(key) for key in keys]}
    out: dict[str, Any] = {}
    for kind, coros in kinds.items():
        times = await asyncio.gather(*coros)
        closed = [t for t in times if isinstance(t, float)]
        out[kind] = {"sockets": n, "closed_by_server": len(closed),
                     "max_seconds_to_close": round(max(closed), 1) if closed else None,
                     "failed": sorted({t for t in times if isinstance(t, str)})}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", default="buffer,tls,slowloris")
    parser.add_argument("--conns", type=int, default=6)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=3000)
    parser.add_argument("--sockets", type=int, default=40)
    parser.add_argument("--wait", type=float, default=15.0)
    parser.add_argument("--new-tokens", type=int, default=12)
    args = parser.parse_args()

    from meshinfer.client.model import DistributedModel
    from meshinfer.models.engine import LocalModel
    from meshinfer.testing.checkpoints import demo_checkpoint, demo_config
    from meshinfer.testing.swarm import LocalSwarm

    path = demo_checkpoint()
    blocks = demo_config()["num_hidden_layers"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        tls_port = s.getsockname()[1]
    local = LocalModel.from_pretrained(path)
    prompt = [5, 17, 42, 99, 7, 3]
    expected = local.generate(prompt, args.new_tokens, stop_token_ids=())
    result: dict[str, Any] = {"attacks": {}}
    with LocalSwarm(path, [(0, blocks)], server_args=["--direct-port", str(tls_port)]) as swarm:
        server = swarm.servers[0]
        pid = server.pid
        with DistributedModel.from_pretrained(path, swarm.initial_peers) as client:
            def exact() -> bool:
                return client.generate(prompt, args.new_tokens, stop_token_ids=()) == expected

            result["exact_before"] = exact()
            record = client.plan()[0].record
            plain_addr = next(a for a in record.direct_addresses if not a.endswith("/tls"))
            plain = ("127.0.0.1", int(plain_addr.split("/")[4]))
            time.sleep(1.0)
            result["server_rss_mb_start"] = round(rss_mb(pid), 1)
            result["server_fds_start"] = fds(pid)
            for attack in args.attacks.split(","):
                before = rss_mb(pid)
                started = time.monotonic()
                with Peak(pid) as peak:
                    if attack == "buffer":
                        out = asyncio.run(buffer_attack(server.peer_id, f"/ip4/127.0.0.1/tcp/{tls_port}/tls",
                                                        args.conns, args.frames))
                    elif attack == "tls":
                        out = {"rss_mb_after_round": []}
                        for _ in range(args.rounds):
                            asyncio.run(tls_cycles("127.0.0.1", tls_port, args.cycles))
                            time.sleep(1.0)
                            out["rss_mb_after_round"].append(round(rss_mb(pid), 1))
                    else:
                        out = asyncio.run(slowloris(server.peer_id, ("127.0.0.1", tls_port), plain, plain_addr,
                                                    args.sockets, args.wait))
                out["seconds"] = round(time.monotonic() - started, 1)
                time.sleep(3.0)
                out.update(rss_mb_before=round(before, 1), rss_mb_peak=round(peak.max, 1),
                           rss_mb_after=round(rss_mb(pid), 1), fds_after=fds(pid), exact_after=exact())
                result["attacks"][attack] = out
                print(json.dumps({attack: out}), flush=True)
            result["server_rss_mb_end"] = round(rss_mb(pid), 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
