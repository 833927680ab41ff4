"""``meshinfer dashboard``: a live web page of a swarm, with its JSON and its Prometheus metrics.

Contract: parses and checks the flags (a bad value is a one-line ``ConfigError``, exit 2) and binds the HTTP
port before joining anything. Then it starts a client-mode peer (stores nothing for others) on a
background ``LoopThread`` through ``--initial-peers``, refreshed by a ``dashboard.poller.SwarmPoller`` every
``--interval`` s (round trips to servers measured from that peer unless ``--no-rtt``), and serves
``dashboard.app.create_app`` with uvicorn in this thread: ``/`` (the page), ``/api/swarm`` (JSON: the
``meshinfer swarm --json`` document plus round trips, totals and status), ``/health`` and ``/metrics``.
``--api-key``/``--api-key-file`` put the page, ``/api/swarm`` and ``/metrics`` behind a key (a browser signs
in once; ``/health`` stays open); beyond loopback with no key it warns at start. The HTTP limits
(``gateway.config.HttpLimits``: request head size, head and keep-alive timeouts) are flags too. A swarm that
cannot be reached does not stop it: the page shows the error and the poller keeps trying.
Once listening it prints, in one flushed write on stdout::

    ready {"url": "http://127.0.0.1:8080", "api": ".../api/swarm", "metrics_url": ".../metrics"}

(and a human line on stderr). SIGINT/SIGTERM, or the end of stdin with ``--stop-on-stdin-eof``, stop it; it
then leaves the swarm. Imports FastAPI and the network only inside ``run``.
"""

from __future__ import annotations

import argparse
from typing import Any

from meshinfer.cli.announce import serve_http
from meshinfer.cli.api import api_key_from_file, warn_if_exposed
from meshinfer.cli.args import add_command, add_stop_on_stdin_eof, require_initial_peers
from meshinfer.cli.common import add_config_flags, config_from_args, require
from meshinfer.config import P2PConfig, field_help


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub, "dashboard", run, help="serve a live web dashboard of a swarm: coverage, servers, round trips, metrics",
        description="Join a swarm as a read-only client and serve a web page showing, per model, which blocks "
                    "are covered and how well, and every server (span, state, throughput, cache left, version, "
                    "round trip), updated live; /api/swarm serves the same data as JSON, /metrics as Prometheus "
                    "text.",
    )
    parser.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR",
                        help="multiaddrs of any peers of the swarm (required)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port; 0 picks a free port (default: 8080)")
    parser.add_argument("--interval", type=float, default=2.0,
                        help="seconds between reads of the swarm (default: 2)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds one DHT read may take (default: 5)")
    parser.add_argument("--no-rtt", action="store_true", help="do not measure round trips to the servers")
    parser.add_argument("--identity", default=None, metavar="PATH",
                        help="private key file of the dashboard's peer (default: a fresh identity)")
    parser.add_argument("--swarm-key", default=None, metavar="FILE", help=field_help(P2PConfig, "swarm_key"))
    parser.add_argument("--swarm-allow", default=None, metavar="FILE", help=field_help(P2PConfig, "swarm_allow"))
    parser.add_argument("--p2p-host", default="127.0.0.1",
                        help="address the dashboard's peer listens on for libp2p (default: 127.0.0.1)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require this key to see the page, /api/swarm and /metrics (a browser signs in once; "
                             "scripts send 'Authorization: Bearer KEY'; /health stays open) (default: no key)")
    parser.add_argument("--api-key-file", default=None, metavar="PATH",
                        help="read the key from this file (first line) instead of --api-key")
    from meshinfer.gateway.config import HttpLimits

    add_config_flags(parser, HttpLimits, skip=("max_body_bytes", "body_timeout"))  # its one body: a 4 KiB login
    add_stop_on_stdin_eof(parser)


def check_args(args: argparse.Namespace) -> None:
    """One-line ``ConfigError`` for a bad flag (before any network or HTTP import)."""
    require_initial_peers(args.initial_peers)
    require(0 <= args.port <= 65535, f"--port must be in 0..65535, got {args.port}")
    require(args.interval > 0, f"--interval must be > 0 seconds, got {args.interval}")
    require(args.timeout > 0, f"--timeout must be > 0 seconds, got {args.timeout}")
    require(args.api_key is None or bool(args.api_key.strip()), "--api-key must not be empty")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    from meshinfer.gateway.config import HttpLimits

    api_key = api_key_from_file(args) or args.api_key
    limits = config_from_args(HttpLimits, args)
    warn_if_exposed(args.host, api_key, "the dashboard")
    from meshinfer.client.swarm import check_initial_peers

    config = P2PConfig(host=args.p2p_host, port=0, identity=args.identity,
                       initial_peers=check_initial_peers(args.initial_peers), swarm_key=args.swarm_key,
                       swarm_allow=args.swarm_allow)

    from meshinfer.dashboard.app import create_app
    from meshinfer.dashboard.poller import NodeSwarmReader, SwarmPoller
    from meshinfer.gateway.serving import ApiServer
    from meshinfer.loopthread import LoopThread

    async def connect() -> Any:
        return await NodeSwarmReader.join(config, timeout=args.timeout)

    poller = SwarmPoller(connect, interval=args.interval, rtt=not args.no_rtt)
    server = ApiServer(create_app(poller, api_key=api_key), args.host, args.port,
                       log_level="info" if args.verbose else "warning", limits=limits)
    runner = LoopThread("meshinfer-dashboard").start()
    try:
        poller.start(runner.loop)
        serve_http(server, _describe, stop_on_stdin_eof=args.stop_on_stdin_eof)
    finally:
        poller.stop()
        runner.stop()
    return 0


def _describe(url: str) -> tuple[dict[str, Any], str]:
    """The ready line's info and the human line, once the dashboard listens at ``url``."""
    return ({"url": url, "api": f"{url}/api/swarm", "metrics_url": f"{url}/metrics"},
            f"dashboard of the swarm at {url} (JSON at /api/swarm); Ctrl-C to stop")
