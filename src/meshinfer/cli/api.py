"""``meshinfer api``: serve an OpenAI-compatible HTTP API for a model whose blocks run in a swarm.

Contract: parses and validates the flags (``GatewayConfig``, and ``ClientConfig`` for the swarm client flags
such as ``--route-wait``; a bad value is a one-line ``ConfigError``, exit 2) before importing torch or the
network; ``--api-key-file`` reads the key from a file (keeps it out of the process list). ``--device`` (default
auto) is resolved on this machine next (a device it lacks is a one-line ``ConfigError``, before anything is
loaded or joined). Then it joins the swarm (``--initial-peers``; without them the peers found on this LAN by mDNS,
``cli.lan``: none found is a one-line error) with ``DistributedModel.from_pretrained(--model, --initial-peers,
config=...)`` (the config carries ``--device``: the embeddings and LM head compute there, in ``--dtype``, auto:
the device's default), builds the app (``gateway.app.create_app``) and serves it with uvicorn on the swarm client's
own loop (``model.loop``: tokens reach HTTP with no thread hand-off) while this thread waits and takes the signals.
Once listening it prints, in one flushed write on stdout::

    ready {"url": "http://127.0.0.1:8000", "base_url": "http://127.0.0.1:8000/v1", "model": NAME, ...}

(and a human line on stderr). Listening beyond loopback (``--host 0.0.0.0``) with no key prints a warning on
stderr first (``gateway.config.exposure_warning``). With a key, the dashboard at ``/`` and ``/metrics`` need it
too (a browser signs in once). SIGINT/SIGTERM, or the end of stdin with ``--stop-on-stdin-eof``, stop it:
open streams get a few seconds, then it leaves the swarm. Knows nothing of HTTP or of the swarm itself.

Several models share the first one's peer and loop (``DistributedModel.sibling``). ``--model auto`` (alone or after
explicit ``--model``s, which keep their names and come first) serves every model the swarm announces: alone, it
joins and waits up to ``--route-wait`` for the directory to list one (none: a one-line ``ConfigError`` naming the
peers asked, exit 2) and opens the first that opens; then ``gateway.autoload.AutoLoader`` opens the others (at most
``--auto-max-models`` auto-opened models, named by ``gateway.auto.served_name``) and re-reads the directory every
``--auto-refresh-s`` on the loop. The ready line's ``models`` lists the names served at that moment.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshinfer.cli.announce import serve_http
from meshinfer.cli.args import add_command, add_stop_on_stdin_eof
from meshinfer.cli.common import add_config_flags, config_from_args
from meshinfer.cli.generate import DTYPE_HELP, MODEL_HELP, add_client_flags, add_download_flag
from meshinfer.cli.lan import add_mdns_flags, lan_peers
from meshinfer.errors import ConfigError

if TYPE_CHECKING:
    from meshinfer.client.config import ClientConfig
    from meshinfer.client.model import DistributedModel
    from meshinfer.gateway.config import GatewayConfig

GATEWAY_PROMPT_CACHE_SESSIONS = 8
"""``--prompt-cache-sessions`` of ``meshinfer api`` when the flag is not given (the client's default is 0)."""


def register(sub: argparse._SubParsersAction) -> None:
    from meshinfer.gateway.auto import DEFAULT_AUTO_MAX_MODELS, DEFAULT_AUTO_REFRESH_S
    from meshinfer.gateway.config import GatewayConfig

    parser = add_command(
        sub, "api", run, help="serve an OpenAI-compatible API (chat, completions, streaming) for a model of a swarm",
        description="Serve /v1/models, /v1/chat/completions and /v1/completions (streaming or not) for the "
                    "model in --model, its blocks run by the swarm joined through --initial-peers. Any OpenAI "
                    "client works: point its base URL at http://HOST:PORT/v1. GET /health reports the swarm.",
    )
    parser.add_argument("--model", required=True, action="append", metavar="[NAME=]MODEL",
                        help=MODEL_HELP + "; its tokenizer and chat template are used. Repeat it to serve several "
                             "models of the swarm behind one gateway (requests pick one by 'model'); NAME= sets the "
                             "name clients use for that one (default: --served-model-name for the first, else the "
                             "model directory's name). 'auto': every model the swarm announces (fetched from its "
                             "seeders, named by its card or its id's first 12 hex characters), checked again every "
                             "--auto-refresh-s; explicit models come first")
    parser.add_argument("--auto-max-models", type=int, default=DEFAULT_AUTO_MAX_MODELS, metavar="N",
                        help="with --model auto: open at most this many of the swarm's models (the rest are listed "
                             f"as not loaded in /v1/models; default {DEFAULT_AUTO_MAX_MODELS})")
    parser.add_argument("--auto-refresh-s", type=float, default=DEFAULT_AUTO_REFRESH_S, metavar="S",
                        help="with --model auto: seconds between readings of the swarm's model directory, opening "
                             f"the models that appeared (default {DEFAULT_AUTO_REFRESH_S:g})")
    parser.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR",
                        help="multiaddrs of any peers of the swarm serving the model's blocks (default: the peers "
                             "found on this LAN by mDNS)")
    add_mdns_flags(parser)
    parser.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    parser.add_argument("--quant", default="auto", metavar="MODE",
                        help="which servers' weights routes use: none, int8 or int4, one mode per route "
                             "(default auto: the most precise mode that covers the model)")
    parser.add_argument("--head-quant", default="none", metavar="MODE",
                        help="how this machine holds the embeddings and LM head: none, int8 or int4 (default: none)")
    add_download_flag(parser)
    add_config_flags(parser, GatewayConfig)
    add_client_flags(parser, "swarm client")
    parser.add_argument("--api-key-file", default=None, metavar="PATH",
                        help="read the API key from this file (first line) instead of --api-key")
    add_stop_on_stdin_eof(parser)


def api_key_from_file(args: argparse.Namespace) -> str | None:
    """The key of ``--api-key-file`` (its first line), None without that flag; ConfigError for a bad file or
    when ``--api-key`` is given too."""
    if args.api_key_file is None:
        return None
    if getattr(args, "api_key", None) is not None:
        raise ConfigError("give either --api-key or --api-key-file, not both")
    try:
        lines = Path(args.api_key_file).expanduser().read_text().splitlines()
    except OSError as err:
        raise ConfigError(f"cannot read --api-key-file {args.api_key_file!r}: {err.strerror or err}") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise ConfigError(f"--api-key-file {args.api_key_file!r} is empty")
    return key


def warn_if_exposed(host: str, api_key: str | None, what: str) -> None:
    """Print the warning for a keyless server beyond loopback on stderr, if it applies."""
    from meshinfer.gateway.config import exposure_warning

    if (warning := exposure_warning(host, api_key, what)) is not None:
        print(warning, file=sys.stderr, flush=True)


def parse_model_flags(values: list[str], served_model_name: str | None) -> list[tuple[str | None, str]]:
    """``--model`` values as ``(name or None, model)``: ``NAME=MODEL`` names one (a left part with no ``/``);
    ``--served-model-name`` names the first when it has no ``NAME=``. ConfigError on a name used twice."""
    out: list[tuple[str | None, str]] = []
    for i, value in enumerate(values):
        name, sep, model = value.partition("=")
        if not sep or not name.strip() or "/" in name or not model.strip():
            name, model = "", value
        out.append((name.strip() or (served_model_name if i == 0 else None), model))
    names = [n for n, _ in out if n is not None]
    if len(set(names)) < len(names):
        raise ConfigError(f"--model: each served name may be given once, got {names}")
    return out


def _config(args: argparse.Namespace) -> GatewayConfig:
    from meshinfer.gateway.config import GatewayConfig

    key = api_key_from_file(args)
    overrides: dict[str, Any] = {"api_key": key} if key is not None else {}
    return config_from_args(GatewayConfig, args, **overrides)


def run(args: argparse.Namespace) -> int:
    from meshinfer.cli.generate import (
        check_device,
        check_dtype_flag,
        check_quant_flag,
        client_config,
        max_download_bytes,
        model_display_name,
        resolve_model_dir,
    )

    config = _config(args)
    warn_if_exposed(config.host, config.api_key, "the API (and its dashboard)")
    max_download = max_download_bytes(args)
    dtype = check_dtype_flag(args.dtype)
    quant = check_quant_flag(args)
    client = dataclasses.replace(client_config(args), max_download=max_download, head_quant=args.head_quant,
                                 quant=None if quant == "auto" else quant)
    if not hasattr(args, "prompt_cache_sessions"):  # a chat gateway: the next turn continues the last one's session
        client = dataclasses.replace(client, prompt_cache_sessions=GATEWAY_PROMPT_CACHE_SESSIONS)
    check_device(client)
    from meshinfer.gateway.auto import AUTO, check_auto_flags

    check_auto_flags(args.auto_max_models, args.auto_refresh_s)
    values = [v for v in args.model if v.strip().lower() != AUTO]
    auto = len(values) < len(args.model)
    wanted = parse_model_flags(values, config.served_model_name)
    dirs = [(name, model, resolve_model_dir(model)) for name, model in wanted]
    named = [(name or model_display_name(model, model_dir), model_dir) for name, model, model_dir in dirs]
    if len({n for n, _ in named}) < len(named):
        raise ConfigError(f"--model: two models have the same name ({[n for n, _ in named]}); name them: NAME=MODEL")

    from meshinfer.client.model import DistributedModel
    from meshinfer.dashboard.app import dashboard_router
    from meshinfer.dashboard.poller import NodeSwarmReader, SwarmPoller
    from meshinfer.gateway.app import Gateway, create_app
    from meshinfer.gateway.autoload import AutoLoader, announced
    from meshinfer.gateway.generation import SwarmGenerator
    from meshinfer.gateway.serving import ApiServer
    from meshinfer.loopthread import run_on

    args.initial_peers = list(lan_peers(args, required=True))
    if named:
        name, model_dir = named[0]
        model = DistributedModel.from_pretrained(model_dir, args.initial_peers, dtype=dtype, config=client,
                                                 model_name=name)
    else:
        model, name = open_first_auto(args.initial_peers, dtype, client, args.auto_max_models)
    others: dict[str, DistributedModel] = {}
    poller: SwarmPoller | None = None
    loader: AutoLoader | None = None
    try:
        for other_name, other_dir in named[1:]:  # siblings: the first's peer and loop, where the HTTP server runs
            others[other_name] = model.sibling(other_dir, dtype, model_name=other_name)
        for each in (model, *others.values()):
            each.tokenizer  # noqa: B018 - load it now: a broken tokenizer fails here, not on the first request
        app = create_app(SwarmGenerator(model), name, config,
                         more={n: SwarmGenerator(m) for n, m in others.items()})
        if auto:
            first: Gateway = app.state.gateway

            def open_model(model_id: str, served: str) -> Gateway:  # in a worker thread
                sibling = model.sibling(model_id, dtype, model_name=served)
                try:
                    sibling.tokenizer  # noqa: B018 - as above
                    return Gateway(SwarmGenerator(sibling), served, config, share=first)
                except BaseException:
                    sibling.close()
                    raise

            loader = AutoLoader(app.state.models, open_model, lambda: announced(model.view.node, client.dht_timeout),
                                loaded=[m.model_id for m in (model, *others.values())], opened=[] if named else [name],
                                max_models=args.auto_max_models, refresh_s=args.auto_refresh_s)
            run_on(model.loop, loader.refresh())  # the swarm's models now; then every --auto-refresh-s
            model.loop.call_soon_threadsafe(loader.start)

        async def connect() -> NodeSwarmReader:
            return NodeSwarmReader(model.view.node)  # shares the gateway's peer; never closes it

        poller = SwarmPoller(connect, gateway_audits=model.audits.as_dict).start(model.loop)
        app.include_router(dashboard_router(poller, include_health=False, include_metrics=False,  # the page at /
                                            api_key=config.api_key))
        server = ApiServer(app, config.host, config.port, log_level="info" if args.verbose else "warning",
                           limits=config.limits, loop=model.loop)

        def describe(url: str) -> tuple[dict[str, Any], str]:
            info = {"url": url, "base_url": f"{url}/v1", "model": name, "model_id": model.model_id,
                    "models": app.state.models.names, "api_key_required": config.api_key is not None}
            return info, f"serving {name} at {url}/v1 (OpenAI-compatible); Ctrl-C to stop"

        serve_http(server, describe, stop_on_stdin_eof=args.stop_on_stdin_eof)
    finally:
        if loader is not None:
            with contextlib.suppress(Exception):
                run_on(model.loop, loader.aclose(), timeout=10.0)
        if poller is not None:
            poller.stop()
        model.close()  # its siblings first, then the peer and the loop
    return 0


def open_first_auto(initial_peers: list[str], dtype: str, client: ClientConfig,
                    max_models: int) -> tuple[DistributedModel, str]:
    """``--model auto`` alone: join, wait up to ``--route-wait`` for the swarm to announce a model, and open the
    first one that opens (it then owns the peer and loop); a one-line ConfigError naming the peers asked when the
    swarm announces none, or when none opens."""
    from meshinfer.client.model import DistributedModel
    from meshinfer.errors import MeshinferError
    from meshinfer.gateway.auto import plan_auto, served_name
    from meshinfer.gateway.autoload import wait_announced

    runner, view = DistributedModel.join_swarm(initial_peers, client)
    try:
        listing = runner.run(wait_announced(view.node, client.route_wait, client.dht_timeout))
        asked = ", ".join(initial_peers) or "the peers found on this LAN"
        if not listing:
            raise ConfigError(f"--model auto: the swarm announces no model (asked {asked} for {client.route_wait:g} "
                              "s, --route-wait); start a server, wait longer or name the model: --model MODEL")
        failed: list[str] = []
        for candidate in plan_auto(listing, (), 0, max_models).open:
            name = served_name(candidate, ())
            try:
                model = DistributedModel.from_pretrained(candidate.model_id, (), dtype, config=client,
                                                         model_name=name, adopt=(runner, view))
                return model, name
            except MeshinferError as err:
                print(f"warning: --model auto: cannot open {candidate.model_id}: {err}", file=sys.stderr, flush=True)
                failed.append(candidate.model_id[:12])
        raise ConfigError(f"--model auto: none of the models the swarm announces could be opened ({', '.join(failed)}"
                          f"; asked {asked}); see the warnings above")
    except BaseException:
        with contextlib.suppress(Exception):
            runner.run(view.close(), timeout=client.close_timeout)
        runner.stop()
        raise
