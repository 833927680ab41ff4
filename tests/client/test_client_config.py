"""``ClientConfig``: defaults equal to the client's old hard-coded values, validation with one-line errors, and the
flags of ``meshinfer generate``/``chat``/``api`` round-tripping into it (pure: no process, no network)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pytest

from meshinfer.cli.common import config_from_args
from meshinfer.cli.generate import add_client_flags, client_config
from meshinfer.cli.main import build_parser
from meshinfer.client.config import CLI_SKIP, DEFAULT_CLIENT_CONFIG, DEFAULT_COHORTS, ClientConfig
from meshinfer.errors import ConfigError
from meshinfer.gateway.config import GatewayConfig

OLD_DEFAULTS: dict[str, Any] = {
    # DistributedModel.from_pretrained / __init__ keyword defaults before ClientConfig
    "device": "auto", "host": "127.0.0.1", "dht_timeout": 5.0, "route_wait": 3.0, "step_timeout": 60.0,
    "push": True, "failover": True, "cohorts": 2, "max_download": None, "quant": None, "head_quant": "none",
    # InferenceSession keyword defaults
    "open_timeout": 15.0, "max_chunk_tokens": 2048, "max_failovers": 8, "min_stall": 3.0,
    # timeouts hard-coded in from_pretrained / close
    "join_timeout": 60.0, "fetch_timeout": 3600.0, "close_timeout": 15.0,
    # issue 17: routes on measured figures, spread over equivalent servers, refuted records banned
    "spread": True, "prior_cap": 1.5, "refuted_ban": 60.0,
    # issue 19: servers are audited by default (shadow sessions; client.audit)
    "audit": True, "audit_every": 16, "audit_fraction": 1.0, "audit_in_flight": 4,
    "audit_report": True,  # issue 19: a confirmed lie is published as a signed report (client.audit_reports)
    # issue 19: reports checked every minute, the audit tally published (client.upkeep)
    "report_check_s": 60.0, "publish_audits": True,
    # issue 22: generations go through the split route unless sealed to a full node is asked for
    "sealed": False, "sealed_relay": "",
    # issue 23: clients sign usage receipts for the servers' work, with a new key unless --identity is given
    "identity": None, "receipts": True,
    # issue 22: a public swarm unless --swarm-key names a private swarm's key file
    "swarm_key": None, "swarm_allow": None,
    # issue 21: speculative decoding on by default (client.speculative), drafts of up to 6 tokens
    "speculate": True, "draft_tokens": 6,
    "speculate_busy_sessions": 4,  # session 25: busier, drafts only from 3-token repeats
    "private_blocks": 0,  # issue 22: a private split is opt-in (client.private_split)
    # issue 24: prompt-cache reuse across turns is opt-in (client.prefix_cache)
    "prompt_cache_sessions": 0, "prompt_cache_ttl": 60.0, "prompt_cache_headroom": 512,
}
# issue 18: the device became "auto" (the first GPU, else the CPU: "cpu" on a machine without one, as before)


def test_defaults_are_the_old_values() -> None:
    assert dataclasses.asdict(ClientConfig()) == OLD_DEFAULTS
    assert DEFAULT_CLIENT_CONFIG == ClientConfig()
    assert DEFAULT_COHORTS == 2


def test_every_field_has_help() -> None:
    for f in dataclasses.fields(ClientConfig):
        assert len(f.metadata.get("help", "")) > 20, f.name


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ClientConfig().push = False  # type: ignore[misc]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dht_timeout": 0.0}, "--dht-timeout must be > 0 seconds, got 0"),
    ({"step_timeout": -1.0}, "--step-timeout must be > 0"),
    ({"open_timeout": float("nan")}, "--open-timeout must be > 0"),
    ({"join_timeout": 0.0}, "--join-timeout must be > 0"),
    ({"fetch_timeout": 0.0}, "--fetch-timeout must be > 0"),
    ({"close_timeout": 0.0}, "--close-timeout must be > 0"),
    ({"min_stall": 0.0}, "--min-stall must be > 0"),
    ({"route_wait": -0.5}, "--route-wait must be >= 0 seconds, got -0.5"),
    ({"report_check_s": -1.0}, "--report-check-s must be >= 0 seconds (0: off), got -1"),
    ({"report_check_s": float("nan")}, "--report-check-s must be >= 0"),
    ({"max_failovers": -1}, "--max-failovers must be >= 0, got -1"),
    ({"max_chunk_tokens": 0}, "--max-chunk-tokens must be > 0, got 0"),
    ({"cohorts": 0}, "--cohorts must be >= 1, got 0"),
    ({"draft_tokens": 0}, "--draft-tokens must be in 1..32, got 0"),
    ({"speculate_busy_sessions": -1}, "--speculate-busy-sessions must be >= 0"),
    ({"max_download": 0.0}, "max_download must be > 0 bytes/s"),
    ({"quant": "int3"}, "unknown quant mode 'int3'"),
    ({"head_quant": "fp8"}, "unknown quant mode 'fp8'"),
    ({"device": " "}, "device must not be empty"),
    ({"device": "tpu"}, "--device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    ({"device": "cpu:1"}, "--device must be auto, cpu, cuda, cuda:N or mps"),
    ({"host": ""}, "host must not be empty"),
    ({"prior_cap": 0.5}, "--prior-cap must be >= 1, got 0.5"),
    ({"refuted_ban": 0.0}, "--refuted-ban must be > 0 seconds and finite, got 0"),
    ({"audit_every": 0}, "--audit-every must be >= 1 token, got 0"),
    ({"audit_fraction": 1.5}, "--audit-fraction must be between 0 and 1, got 1.5"),
    ({"audit_fraction": float("nan")}, "--audit-fraction must be between 0 and 1, got nan"),
    ({"audit_in_flight": 0}, "--audit-in-flight must be >= 1, got 0"),
    ({"prompt_cache_sessions": -1}, "--prompt-cache-sessions must be >= 0 (0: off), got -1"),
    ({"prompt_cache_ttl": 0.0}, "--prompt-cache-ttl must be > 0 seconds and finite, got 0"),
    ({"prompt_cache_headroom": -1}, "--prompt-cache-headroom must be >= 0 tokens, got -1"),
])
def test_bad_values_are_one_line_config_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as err:
        ClientConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_edge_values_are_accepted_and_quant_is_canonical() -> None:
    config = ClientConfig(route_wait=0.0, max_failovers=0, cohorts=1, max_download=1.0, quant=" INT8 ",
                          head_quant="Int4")
    assert (config.route_wait, config.max_failovers, config.quant, config.head_quant) == (0.0, 0, "int8", "int4")


def test_overrides_replace_fields_and_unknown_names_are_type_errors() -> None:
    base = ClientConfig(push=False)
    assert dataclasses.replace(base, route_wait=0.5) == ClientConfig(push=False, route_wait=0.5)
    with pytest.raises(TypeError):
        dataclasses.replace(base, route_weight=0.5)
    with pytest.raises(ConfigError, match="--cohorts"):
        dataclasses.replace(base, cohorts=0)


def test_from_pretrained_refuses_unknown_and_bad_options_before_joining() -> None:
    from meshinfer.client.model import DistributedModel

    with pytest.raises(TypeError):
        DistributedModel.from_pretrained("nowhere", ["/ip4/127.0.0.1/tcp/1/p2p/x"], route_weight=0.5)
    with pytest.raises(ConfigError, match="--route-wait"):
        DistributedModel.from_pretrained("nowhere", ["/ip4/127.0.0.1/tcp/1/p2p/x"], route_wait=-1.0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_client_flags(parser)
    return parser


def test_flags_default_to_the_config_defaults() -> None:
    assert client_config(_parser().parse_args([])) == ClientConfig()


def test_flags_round_trip() -> None:
    argv = ["--route-wait", "0.5", "--step-timeout", "7", "--no-push", "--no-failover", "--max-failovers", "2",
            "--min-stall", "1.5", "--max-chunk-tokens", "256", "--cohorts", "3", "--dht-timeout", "2",
            "--open-timeout", "4", "--join-timeout", "30", "--fetch-timeout", "100", "--close-timeout", "5"]
    want = ClientConfig(route_wait=0.5, step_timeout=7.0, push=False, failover=False, max_failovers=2,
                        min_stall=1.5, max_chunk_tokens=256, cohorts=3, dht_timeout=2.0, open_timeout=4.0,
                        join_timeout=30.0, fetch_timeout=100.0, close_timeout=5.0)
    assert client_config(_parser().parse_args(argv)) == want
    assert client_config(_parser().parse_args(["--push"])).push is True


def test_skipped_fields_have_no_flags_and_bad_flags_are_config_errors() -> None:
    flags = {opt for action in _parser()._actions for opt in action.option_strings}
    for name in CLI_SKIP:
        assert "--" + name.replace("_", "-") not in flags
    with pytest.raises(ConfigError, match="--cohorts must be >= 1"):
        client_config(_parser().parse_args(["--cohorts", "0"]))


def test_commands_take_the_client_flags_beside_their_own() -> None:
    parser = build_parser()
    args = parser.parse_args(["generate", "--model", "tiny", "--prompt", "hi", "--quant", "int8", "--max-download",
                              "2", "--route-wait", "0.25", "--no-push"])
    assert (args.quant, args.max_download) == ("int8", 2.0)
    assert client_config(args) == ClientConfig(route_wait=0.25, push=False)
    args = parser.parse_args(["chat", "--model", "tiny", "--cohorts", "4"])
    assert client_config(args) == ClientConfig(cohorts=4)
    args = parser.parse_args(["api", "--model", "tiny", "--initial-peers", "/ip4/1.2.3.4/tcp/1/p2p/x",
                              "--host", "0.0.0.0", "--port", "0", "--step-timeout", "9"])
    assert config_from_args(GatewayConfig, args).host == "0.0.0.0"  # --host stays the gateway's
    assert client_config(args) == ClientConfig(step_timeout=9.0)



def test_sealed_flags() -> None:
    """Issue 22: ``--sealed-relay`` needs ``--sealed`` and a peer id or ``auto``; ``--sealed`` needs a swarm."""
    from pathlib import Path

    from meshinfer.cli.generate import open_generator

    assert ClientConfig(sealed=True, sealed_relay=" auto ").sealed_relay == "auto"
    assert ClientConfig(sealed=True, sealed_relay="QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N").sealed_relay
    with pytest.raises(ConfigError, match="add --sealed"):
        ClientConfig(sealed_relay="auto")
    assert ClientConfig(sealed=True, sealed_relay="/ip4/127.0.0.1/tcp/5/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wX")
    with pytest.raises(ConfigError, match="peer id, a multiaddr"):
        ClientConfig(sealed=True, sealed_relay="/ip4/1.2.3.4")
    with pytest.raises(ConfigError, match="--initial-peers"):
        open_generator(Path("unused"), "float32", (), client=ClientConfig(sealed=True))
