"""Real networks on one machine for tests: Linux network namespaces joined by a bridge (a LAN).

Contract: ``NetnsLan(n)`` (a context manager) makes ``n`` host namespaces plus one hub namespace holding a
bridge; each host gets a veth pair (``eth0`` inside, its other end a bridge port in the hub), address
``10.77.<subnet>.<i+1>/24``, multicast on, a route for 224.0.0.0/4 (mDNS) and ``lo`` up; the bridge has
multicast snooping off so that multicast floods to every port. Everything lives in namespaces whose names are
unique per instance (``mi<pid><random>-...``), so nothing touches the host's own network and parallel tests do
not collide. ``popen(i, argv)`` starts a ``ManagedProcess`` inside host ``i`` (``ip netns exec`` execs the
command: the PID is the command's) and ``run(i, argv)`` runs one to completion. ``close()`` (also on an error
in ``__enter__`` or the ``with`` body) stops the processes it started, by PID, then deletes its namespaces (the
veths and the bridge go with them); it never touches anything it did not make.

``unavailable_reason()`` says exactly what this machine lacks (``ip`` from iproute2, root, network namespaces,
veth or bridge support), or None: tests skip with that reason.

NAT: ``add_natted_host()`` (after start) adds a router namespace with one leg on the bridge (``wan``, address
``10.77.<subnet>.<250 - k>``) and one to a new host namespace (``192.168.<100 + k>.2/24``, default route via the
router), IPv4 forwarding on and iptables masquerading out of ``wan``: the host reaches the LAN, nobody on the LAN
can open a connection to it (the LAN has no route to its network, and the router forwards only replies). It
returns the host's index for ``popen``/``run``/``addresses``. ``nat_unavailable_reason()`` adds what NAT needs
(``iptables``; the kernel's nat table, probed in a throwaway namespace). Runs commands only; imports no network
code.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence

from meshinfer.testing.procs import ManagedProcess

SUBNET_PREFIX = "10.77"


def _run(argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def unavailable_reason() -> str | None:
    """Why namespaced LANs cannot be made here (the exact missing feature), or None when they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing: install iproute2 (scripts/dev.sh setup does, as root)"
    if os.geteuid() != 0:
        return f"creating network namespaces needs root (this test runs as uid {os.geteuid()})"
    probe = f"miprobe{os.getpid()}{secrets.token_hex(2)}"
    try:
        done = _run(["ip", "netns", "add", probe])
        if done.returncode != 0:
            return f"network namespaces are not supported here: `ip netns add` failed: {done.stderr.strip()[:200]}"
        done = _run(["ip", "-n", probe, "link", "add", "br0", "type", "bridge"])
        if done.returncode != 0:
            return f"bridge interfaces are not supported here: {done.stderr.strip()[:200]}"
        done = _run(["ip", "-n", probe, "link", "add", "va", "type", "veth", "peer", "name", "vb"])
        if done.returncode != 0:
            return f"veth pairs are not supported here: {done.stderr.strip()[:200]}"
    finally:
        _run(["ip", "netns", "del", probe])
    return None


def nat_unavailable_reason() -> str | None:
    """Why a NATed host cannot be made here (the exact missing feature), or None when it can."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    if shutil.which("iptables") is None:
        return "the `iptables` command is missing: install iptables (scripts/dev.sh setup does, as root)"
    probe = f"minatprobe{os.getpid()}{secrets.token_hex(2)}"
    try:
        done = _run(["ip", "netns", "add", probe])
        if done.returncode != 0:
            return f"network namespaces are not supported here: {done.stderr.strip()[:200]}"
        checks = [
            (["sysctl", "-qw", "net.ipv4.ip_forward=1"], "IPv4 forwarding cannot be turned on in a namespace"),
            (["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "MASQUERADE"],
             "the kernel lacks NAT masquerading (iptables -t nat ... -j MASQUERADE failed)"),
            (["iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED", "-j", "ACCEPT"],
             "the kernel lacks connection tracking (iptables -m conntrack failed)"),
        ]
        for argv, what in checks:
            done = _run(["ip", "netns", "exec", probe, *argv])
            if done.returncode != 0:
                return f"{what}: {done.stderr.strip()[:200]}"
    finally:
        _run(["ip", "netns", "del", probe])
    return None


class NetnsError(RuntimeError):
    """A namespace command failed (names the command and its stderr)."""


class NetnsLan:
    """``n`` hosts on one bridged LAN, each in its own network namespace."""

    def __init__(self, n: int, *, subnet: int = 0, prefix: str = SUBNET_PREFIX) -> None:
        if not 1 <= n <= 200 or not 0 <= subnet <= 255:
            raise ValueError(f"NetnsLan needs 1..200 hosts and a subnet in 0..255, got {n}, {subnet}")
        self.n = n
        self.tag = f"mi{os.getpid() % 100000}{secrets.token_hex(3)}"
        self.hub = f"{self.tag}-hub"
        self.hosts = [f"{self.tag}-h{i}" for i in range(n)]
        self.prefix = prefix
        """The first two octets of the LAN's addresses (a public-looking prefix makes libp2p treat it as the
        internet: it keeps only public relay addresses)."""
        self.addresses = [f"{prefix}.{subnet}.{i + 1}" for i in range(n)]
        """The IPv4 address of each host (on its ``eth0``)."""
        self.subnet = subnet
        self.routers: list[str] = []
        """Router namespaces of NATed hosts (``add_natted_host``)."""
        self._made: list[str] = []
        self._procs: list[ManagedProcess] = []

    # --- plumbing ----------------------------------------------------------------------------

    def _ip(self, *args: str) -> None:
        done = _run(["ip", *args])
        if done.returncode != 0:
            raise NetnsError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()[:300]}")

    def _add_ns(self, name: str) -> None:
        self._ip("netns", "add", name)
        self._made.append(name)
        self._ip("-n", name, "link", "set", "lo", "up")

    def start(self) -> NetnsLan:
        try:
            self._add_ns(self.hub)
            self._ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            self._ip("-n", self.hub, "link", "set", "br0", "up")
            for i, (host, addr) in enumerate(zip(self.hosts, self.addresses, strict=True)):
                self._add_ns(host)
                port = f"p{i}"
                self._ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host)
                self._ip("-n", self.hub, "link", "set", port, "master", "br0")
                self._ip("-n", self.hub, "link", "set", port, "up")
                self._ip("-n", host, "addr", "add", f"{addr}/24", "dev", "eth0")
                self._ip("-n", host, "link", "set", "eth0", "multicast", "on")
                self._ip("-n", host, "link", "set", "eth0", "up")
                self._ip("-n", host, "route", "add", "224.0.0.0/4", "dev", "eth0")
        except BaseException:
            self.close()
            raise
        return self

    def add_natted_host(self) -> int:
        """A new host behind its own masquerading router on the LAN; returns its index (see the module doc)."""
        k = len(self.routers)
        if k >= 50:
            raise ValueError("at most 50 NATed hosts per LAN")
        router, host = f"{self.tag}-r{k}", f"{self.tag}-n{k}"
        inner = f"192.168.{100 + k}"
        try:
            self._add_ns(router)
            self.routers.append(router)
            self._add_ns(host)
            self.hosts.append(host)
            self.addresses.append(f"{inner}.2")
            port = f"w{k}"
            self._ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "wan", "netns", router)
            self._ip("-n", self.hub, "link", "set", port, "master", "br0")
            self._ip("-n", self.hub, "link", "set", port, "up")
            self._ip("-n", router, "addr", "add", f"{self.prefix}.{self.subnet}.{250 - k}/24", "dev", "wan")
            self._ip("-n", router, "link", "set", "wan", "up")
            self._ip("-n", router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", host)
            self._ip("-n", router, "addr", "add", f"{inner}.1/24", "dev", "lan")
            self._ip("-n", router, "link", "set", "lan", "up")
            self._ip("-n", host, "addr", "add", f"{inner}.2/24", "dev", "eth0")
            self._ip("-n", host, "link", "set", "eth0", "up")
            self._ip("-n", host, "route", "add", "default", "via", f"{inner}.1")
            self._exec(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self._exec(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE")
            # only replies come in: nothing on the LAN may open a connection to the NATed side
            self._exec(router, "iptables", "-A", "FORWARD", "-i", "wan", "-m", "conntrack", "!", "--ctstate",
                       "ESTABLISHED,RELATED", "-j", "DROP")
        except BaseException:
            self.close()
            raise
        return len(self.hosts) - 1

    def _exec(self, ns: str, *argv: str) -> None:
        done = _run(["ip", "netns", "exec", ns, *argv])
        if done.returncode != 0:
            raise NetnsError(f"`{' '.join(argv)}` in {ns} failed: {done.stderr.strip()[:300]}")

    # --- processes ---------------------------------------------------------------------------

    def argv(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside host ``i``."""
        return ["ip", "netns", "exec", self.hosts[i], *argv]

    def popen(self, i: int, argv: Sequence[str], *, env: dict[str, str] | None = None,
              name: str | None = None) -> ManagedProcess:
        """Start ``argv`` in host ``i`` (stopped by ``close`` unless stopped before)."""
        proc = ManagedProcess(self.argv(i, argv), env=env, name=name or f"{self.hosts[i]}:{os.path.basename(argv[0])}")
        self._procs.append(proc)
        return proc

    def run(self, i: int, argv: Sequence[str], *, timeout: float = 120.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in host ``i`` to completion (killed after ``timeout`` s)."""
        return subprocess.run(self.argv(i, argv), capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)

    # --- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop what this LAN started (by PID) and delete its namespaces (idempotent, never raises)."""
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                proc.stop(timeout=15.0)
        self._procs.clear()
        for name in reversed(self._made):
            _run(["ip", "netns", "del", name])
        self._made.clear()

    def remaining(self) -> list[str]:
        """This LAN's namespaces that still exist (empty after ``close``)."""
        listed = _run(["ip", "netns", "list"]).stdout.split()
        return [n for n in [self.hub, *self.hosts, *self.routers] if n in listed]

    def __enter__(self) -> NetnsLan:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
