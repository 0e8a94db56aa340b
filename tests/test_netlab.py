"""The network lab itself: reachability, isolation, multicast, loss, rate limit, cleanup.

Root only (namespaces, tc, nftables); skipped elsewhere. `make test` installs the tools."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from netlab import Host, Lab, cleanup_stale, missing_requirements
from netlab.lab import NETNS_ETC

_missing = missing_requirements()
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")

GROUP = "239.255.77.1"
GROUP6 = "ff15::77"
PORT = 47701
HEADERS = 8 + 20 + 14  # UDP, IPv4, Ethernet: what a datagram costs on the wire beyond its payload

# Receive datagrams until `idle` seconds pass without one (10 s for the first); print a
# summary as JSON. argv: bind address ("" for a group), port, group or "", local address or
# interface, idle seconds.
RECEIVER = r"""
import json, socket, sys, time
addr, port, group, local, idle = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], \
    float(sys.argv[5])
fam = socket.AF_INET6 if ":" in (group or addr) else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: no drops in the receiver
if group and fam == socket.AF_INET:
    s.bind((group, port))
    mreq = socket.inet_aton(group) + socket.inet_aton(local)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
elif group:
    s.bind((group, port))
    mreq = socket.inet_pton(fam, group) + socket.if_nametoindex(local).to_bytes(4, "little")
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
else:
    s.bind((addr, port))
print("ready", flush=True)
s.settimeout(10)
n = nbytes = 0
first = last = 0.0
sample = ""
while True:
    try:
        data = s.recv(65536)
    except TimeoutError:
        break
    last = time.monotonic()
    if not n:
        first, sample = last, data[:40].decode(errors="replace")
        s.settimeout(idle)
    n += 1
    nbytes += len(data)
print(json.dumps({"n": n, "bytes": nbytes, "duration": last - first, "sample": sample}))
"""

# Send `count` datagrams of `size` bytes to dst:port, as fast as possible. Multicast goes out
# of the interface with address `via` (IPv4) or named `via` (IPv6), TTL 1.
SENDER = r"""
import socket, sys
dst, port, count, size, via = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5]
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
if fam == socket.AF_INET:
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(via))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
else:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex(via))
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
for i in range(count):
    s.sendto(f"datagram {i:08d} ".encode().ljust(size, b"."), (dst, port))
"""


@pytest.fixture(scope="module", autouse=True)
def _no_stale_labs() -> Iterator[None]:
    cleanup_stale()  # leftovers of crashed runs; labs of running processes are left alone
    yield


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _start_receivers(
    lab: Lab, hosts: Sequence[Host], *, group: str = GROUP, idle: float = 0.5, v6: bool = False
) -> list[subprocess.Popen[str]]:
    procs = []
    for h in hosts:
        local = h.ifname if v6 else h.addr
        addr = "" if group else h.addr
        procs.append(lab.popen(
            h, [sys.executable, "-c", RECEIVER, addr, str(PORT), group, local, str(idle)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line == "ready\n", (line, p.stderr.read() if p.stderr else "")
    return procs


def _results(procs: Sequence[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    results = []
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    return results


def _stop(procs: Sequence[subprocess.Popen[str]]) -> None:
    """Stop receivers that wait for a first datagram that will not come."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=10)


def _send(lab: Lab, dst: str, count: int, size: int, via: str) -> None:
    lab.exec(lab.master, [sys.executable, "-c", SENDER, dst, str(PORT), str(count), str(size),
                          via], check=True, timeout=60)


def test_ping_and_no_way_out() -> None:
    before = Path("/proc/net/dev").read_text()  # the interfaces of the namespace we run in
    with Lab(2) as lab:
        assert Path("/proc/net/dev").read_text() == before  # nothing of the lab out here
        assert {lab.master.addr, *(t.addr for t in lab.targets)} == {
            "10.77.0.1", "10.77.0.10", "10.77.0.11"}
        for t in lab.targets:
            assert lab.ping(lab.master, t.addr)
        assert lab.ping(lab.targets[1], lab.targets[0].addr)
        assert not lab.ping(lab.master, "10.77.0.99", timeout=0.3)  # nobody there
        for h in lab.hosts:
            # Route lookups only; no packet is sent anywhere outside.
            for argv in (["route", "get", "8.8.8.8"], ["-6", "route", "get", "2001:db8::1"]):
                res = lab.exec(h, ["ip", *argv], capture_output=True, text=True)
                assert res.returncode != 0, res.stdout
                assert "unreachable" in res.stderr.lower(), res.stderr
            routes = lab.exec(h, ["ip", "route"], capture_output=True, text=True).stdout
            assert "default" not in routes
            assert "224.0.0.0/4 dev eth0" in routes
        # Names: every lab host resolves every other one from its hosts file.
        res = lab.exec(lab.targets[0], ["getent", "hosts", lab.hostname(lab.master)],
                       capture_output=True, text=True)
        assert res.stdout.split()[0] == lab.master.addr
        res = lab.exec(lab.master, ["cat", "/etc/resolv.conf"], capture_output=True, text=True)
        assert res.stdout == "nameserver 127.0.0.1\n"


def test_multicast_crosses_the_bridge() -> None:
    with Lab(2) as lab:
        procs = _start_receivers(lab, lab.targets)
        before = lab.master_tx_bytes()
        _send(lab, GROUP, 1, 1000, lab.master.addr)
        results = _results(procs)
        for r in results:
            assert r["n"] == 1 and r["bytes"] == 1000
            assert r["sample"].startswith("datagram 00000000")
        assert lab.master_tx_bytes() - before >= 1000 + HEADERS
        if Path("/proc/sys/net/bridge").is_dir():
            # The bridge forwards frames without running the IP firewall on them (br_netfilter
            # would charge every tool's sender for it, per port flooded).
            for table in ("iptables", "ip6tables", "arptables"):
                out = subprocess.run(
                    ["ip", "netns", "exec", lab.bridge_ns, "sysctl", "-n",
                     f"net.bridge.bridge-nf-call-{table}"],
                    capture_output=True, text=True, check=True).stdout
                assert out.strip() == "0", table


def test_each_datagram_crosses_on_its_own() -> None:
    """A UDP_SEGMENT (GSO) send must reach the target as separate packets, or one random
    drop there would take out a whole burst of datagrams."""
    gso = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.SOL_UDP, 103, 1400)  # UDP_SEGMENT\n"
        f"for _ in range(10): s.sendto(b'x' * 14000, ('10.77.0.10', {PORT}))\n"
    )
    with Lab(1) as lab:
        t = lab.targets[0]
        procs = _start_receivers(lab, [t], group="")
        before = lab.link_stats(t)["rx_packets"]
        lab.exec(lab.master, [sys.executable, "-c", gso], check=True, timeout=30)
        (r,) = _results(procs)
        assert r["n"] == 100
        assert lab.link_stats(t)["rx_packets"] - before >= 100


def test_random_loss() -> None:
    count = 2000
    with Lab(2, loss=0.2) as lab:
        procs = _start_receivers(lab, lab.targets)
        _send(lab, GROUP, count, 64, lab.master.addr)
        for t, r in zip(lab.targets, _results(procs), strict=True):
            assert 0.7 * count <= r["n"] <= 0.9 * count, r
            assert r["n"] + lab.loss_drops(t) == count  # every loss is the rule's

        # At run time: no loss on t0 any more, everything on t1.
        lab.set_loss(lab.targets[0], 0.0)
        lab.set_loss(lab.targets[1], 1.0)
        drops = lab.loss_drops(lab.targets[1])
        procs = _start_receivers(lab, lab.targets, idle=0.3)  # t1 must join to see them
        _send(lab, GROUP, 200, 64, lab.master.addr)
        assert _results(procs[:1])[0]["n"] == 200
        _stop(procs[1:])
        assert lab.loss_drops(lab.targets[1]) == drops + 200


def test_rate_limit() -> None:
    rate_mbit, size, total = 50, 1400, 6_000_000
    count = total // size
    with Lab(1, rate_mbit=rate_mbit) as lab:
        t = lab.targets[0]
        procs = _start_receivers(lab, [t], group="")
        before = lab.master_tx_bytes()
        start = time.monotonic()
        _send(lab, t.addr, count, size, lab.master.addr)
        (r,) = _results(procs)
        elapsed = time.monotonic() - start
        assert r["n"] >= 0.95 * count, r
        ideal = total * 8 / (rate_mbit * 1e6)  # 0.96 s
        assert r["duration"] >= 0.9 * ideal, r
        assert elapsed < 2.5 * ideal + 2, elapsed  # shaped to the rate, not far below it
        assert lab.master_tx_bytes() - before >= r["n"] * (size + HEADERS)


def test_ipv6_multicast_and_loss() -> None:
    with Lab(1, ipv6=True) as lab:
        t = lab.targets[0]
        assert t.addr6 is not None
        assert lab.ping(lab.master, t.addr6)
        procs = _start_receivers(lab, [t], group=GROUP6, v6=True, idle=0.3)
        _send(lab, GROUP6, 3, 500, lab.master.ifname)
        assert _results(procs)[0]["n"] == 3
        lab.set_loss(t, 1.0)
        procs = _start_receivers(lab, [t], group=GROUP6, v6=True, idle=0.3)
        _send(lab, GROUP6, 3, 500, lab.master.ifname)
        time.sleep(0.2)
        _stop(procs)
        assert lab.loss_drops(t) == 3


def test_cleanup_even_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab(2) as lab:
        names = list(lab.namespaces)
        assert set(names) <= _netns_names()
        t0 = lab.targets[0]
        stopped = lab.popen(t0, ["sleep", "300"])
        os.kill(stopped.pid, signal.SIGSTOP)
        res = lab.exec(t0, ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"],
                       capture_output=True, text=True, check=True)
        orphan = int(res.stdout)  # not our child: only the namespace sweep finds it
        raise RuntimeError("boom")
    assert not set(names) & _netns_names()
    assert not any((NETNS_ETC / n).exists() for n in names)
    assert stopped.returncode == -signal.SIGKILL
    assert not Path(f"/proc/{orphan}").exists() or "Z" in _proc_state(orphan)


def test_cleanup_stale_after_a_crash(tmp_path: Path) -> None:
    prefix = f"mrlz{os.getpid() % 10000}-"
    crash = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from netlab import Lab\n"
        f"lab = Lab(1, prefix={prefix!r})\n"
        "lab.popen(lab.targets[0], ['sleep', '300'])\n"
        "os._exit(0)  # no cleanup at all\n"
    )
    subprocess.run([sys.executable, "-c", crash], check=True, timeout=60)
    left = {n for n in _netns_names() if n.startswith(prefix)}
    assert left == {f"{prefix}br", f"{prefix}m", f"{prefix}t0"}
    with Lab(1) as live:  # a running lab is not stale
        removed = cleanup_stale("mrl*")
        assert set(removed) >= left
        assert not any(n in _netns_names() for n in left)
        assert set(live.namespaces) <= _netns_names()


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
