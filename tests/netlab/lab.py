"""A LAN of network namespaces on one machine, for tests and benchmarks that need real links.

Topology (every name below lives only inside namespaces this module creates)::

    {prefix}br   bridge br0 (multicast snooping off), one port v<idx> per host ("vm", "v0", ...)
    {prefix}m    master: eth0 10.77.0.1/24         [fd77::1/64]
    {prefix}t<i> target i: eth0 10.77.0.<10+i>/24   [fd77::<10+i>/64]

Both ends of every veth pair are created from inside the bridge namespace (`ip -n BR link add
v0 type veth peer name eth0 netns T0`), so no lab interface ever exists in the namespace the
caller runs in, and no host interface is ever attached to the lab. Hosts get a connected /24,
a multicast route (224.0.0.0/4 dev eth0; IPv6 gets ff00::/8 in table local from the kernel)
and no default route: an address outside the lab has no route at all.

The bridge namespace has bridge-nf-call-{iptables,ip6tables,arptables} = 0 (where the host has
br_netfilter loaded): frames are switched, not passed through IP netfilter hooks on the way.

Per host, eth0 has segmentation and receive offloads off (tso, gso, gro, tx-udp-segmentation),
so every datagram and TCP segment crosses the bridge as a packet of its own, as on a wire.
With the defaults a UDP_SEGMENT (GSO) send of 10 x 1,400 bytes crosses as one 14 KB packet:
the target's nftables input hook then sees (and drops) ten datagrams at once, which is burst
loss, not random loss. Turning off tx-udp-segmentation alone fixes UDP; tso/gso off does the
same for TCP (rsync) so that loss rules on all IP traffic hit single segments.

The master's eth0 always has a root qdisc, whose "Sent N bytes" counter is `master_tx_bytes`:
unlike the device's tx counter it counts a GSO packet as its segments with their headers, i.e.
wire bytes. Without a rate it is `pfifo limit 10000` (no shaping, no AQM drops; a veth never
queues). With `rate_mbit` it is tbf, measured steadier than htb at 200 Mbit/s with 1,400-byte
datagrams (50 ms windows: tbf 199.5-202.4, htb 181-210 Mbit/s): `tbf rate R burst B latency
50ms` with B = max(16 KiB, 1 ms of tokens at R) (25 KB at 200 Mbit/s): a timer wake-up late by
up to 1 ms costs no rate, and bursts stay below 1 ms of link time. `latency 50ms` sets the
queue to R*50ms + B (1.25 MB at 200 Mbit/s), like a switch buffer; a blocking UDP sender is
paced by its own socket send buffer long before that fills (no drops seen at 200 Mbit/s).

Random loss on a host is one nftables rule (table inet mrlab, so IPv4 and IPv6): packets that
arrive on eth0 (never lo) are dropped with probability `loss`, UDP only unless asked for all
IP, counted by the named counter "lossdrops" (`lab.loss_drops(host)`).

Each namespace gets /etc/netns/NAME/{hosts,resolv.conf} (`ip netns exec` bind-mounts them over
/etc): every lab host by name (`lab.hostname(host)`, the namespace name) and a resolver at
127.0.0.1, where nothing listens, so a reverse lookup fails at once instead of stalling.

Cleanup (`close`, the with-block's exit, atexit as a last resort, `cleanup_stale` after a
crash) kills every process left in the namespaces, deletes them and the /etc/netns entries.
"""

from __future__ import annotations

import atexit
import contextlib
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NamedTuple

__all__ = [
    "RSH",
    "Host",
    "Lab",
    "LabError",
    "cleanup_stale",
    "missing_requirements",
]

#: what stands in for ssh: `mrsync --rsh "ip netns exec"` then runs `ip netns exec HOST cmd`
RSH = "ip netns exec"

SUBNET = "10.77.0"  # the lab's /24; exists only inside lab namespaces
SUBNET6 = "fd77:"  # fd77::/64, likewise
NETNS_ETC = Path("/etc/netns")
OWNER_DIR = Path("/run/mrlab")  # {prefix}.owner: "PID STARTTIME" of the process that owns a lab
NETNS_RUN = Path("/run/netns")
MAX_TARGETS = 200
BRIDGE = "br0"
IFNAME = "eth0"
NO_RATE_QDISC = ["pfifo", "limit", "10000"]
TBF_LATENCY = "50ms"
MIN_BURST = 16384  # bytes

_OFFLOADS = ["tso", "off", "gso", "off", "gro", "off", "tx-udp-segmentation", "off"]
_NAME_RE = re.compile(r"^(?P<prefix>.+?)(?:br|m|t\d+)$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")


class LabError(RuntimeError):
    """A command that builds or inspects the lab failed."""


class Host(NamedTuple):
    name: str  # the namespace name, also the host's name in the lab's hosts files
    addr: str  # IPv4 address on eth0
    addr6: str | None  # IPv6 address on eth0 (ipv6=True), else None
    ifname: str = IFNAME


def missing_requirements() -> str | None:
    """Why a lab cannot be built here (not root, tools missing), or None if it can."""
    if os.geteuid() != 0:
        return "the network lab needs root"
    missing = [t for t in ("ip", "tc", "nft", "ethtool", "sysctl") if shutil.which(t) is None]
    if missing:
        return f"the network lab needs {', '.join(missing)} (scripts/test-deps.sh installs them)"
    return None


def _run(
    argv: Sequence[str], *, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, timeout=60, check=False
    )
    if check and res.returncode != 0:
        detail = (res.stderr or res.stdout).strip()
        if input:
            detail += f"\n--- input ---\n{input}"
        raise LabError(f"{' '.join(argv)} failed ({res.returncode}): {detail}")
    return res


def _netns_list() -> list[str]:
    res = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime


def _owner_alive(prefix: str) -> bool:
    try:
        pid_s, start = (OWNER_DIR / f"{prefix}.owner").read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return False
    return _start_time(pid) == start


def _kill_netns_processes(names: Sequence[str], timeout: float = 3.0) -> None:
    """SIGKILL every process whose network namespace is one of `names`; wait until gone."""
    pids: set[int] = set()
    for name in names:
        res = _run(["ip", "netns", "pids", name], check=False)
        pids.update(int(p) for p in res.stdout.split() if p.isdigit())
    pids.discard(os.getpid())
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        for pid in list(pids):
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                state = "gone"
            if state in ("gone", "Z", "X"):  # a zombie has left its namespace behind
                pids.discard(pid)
        if pids:
            time.sleep(0.02)


def _remove_namespaces(names: Sequence[str]) -> None:
    _kill_netns_processes(names)
    existing = set(_netns_list())
    doomed = [n for n in names if n in existing]
    if doomed:
        _run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {n}\n" for n in doomed),
             check=False)
    for name in names:
        shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


def cleanup_stale(prefix_glob: str = "mrl*", *, force: bool = False) -> list[str]:
    """Remove what crashed earlier labs left behind: namespaces (with their processes) and
    /etc/netns entries whose names match `prefix_glob` and look like lab hosts. Labs whose
    owning process still runs are left alone unless `force`. Returns the names removed."""
    candidates = set(_netns_list())
    if NETNS_ETC.is_dir():
        candidates.update(p.name for p in NETNS_ETC.iterdir())
    stale: list[str] = []
    prefixes: set[str] = set()
    for name in sorted(candidates):
        m = _NAME_RE.match(name)
        if not m or not fnmatch.fnmatchcase(name, prefix_glob):
            continue
        if not force and _owner_alive(m["prefix"]):
            continue
        stale.append(name)
        prefixes.add(m["prefix"])
    if stale:
        _remove_namespaces(stale)
    if OWNER_DIR.is_dir():
        for f in OWNER_DIR.glob("*.owner"):
            prefix = f.name[: -len(".owner")]
            if prefix in prefixes or (
                fnmatch.fnmatchcase(prefix + "m", prefix_glob) and not _owner_alive(prefix)
            ):
                f.unlink(missing_ok=True)
    return stale


_open_labs: list[Lab] = []


@atexit.register
def _close_open_labs() -> None:
    for lab in list(_open_labs):
        lab.close()


class Lab:
    """A master and `n_targets` targets on one bridge; see the module docstring.

    Built by the constructor; `close()` (or leaving the with-block, even by an exception)
    removes everything. Processes started with `popen` are killed at close, and so is every
    other process still inside a lab namespace (stopped ones too).
    """

    master: Host
    targets: list[Host]

    def __init__(
        self,
        n_targets: int,
        *,
        rate_mbit: float | None = None,
        loss: float = 0.0,
        prefix: str | None = None,
        ipv6: bool = False,
    ) -> None:
        if not 1 <= n_targets <= MAX_TARGETS:
            raise ValueError(f"n_targets must be 1..{MAX_TARGETS}, not {n_targets}")
        if not 0.0 <= loss <= 1.0:
            raise ValueError(f"loss must be within 0..1, not {loss}")
        if rate_mbit is not None and rate_mbit <= 0:
            raise ValueError(f"rate_mbit must be positive, not {rate_mbit}")
        reason = missing_requirements()
        if reason:
            raise LabError(reason)
        self.ipv6 = ipv6
        self.closed = False
        self._procs: list[subprocess.Popen[Any]] = []
        self._tx_offset = 0  # Sent bytes of root qdiscs replaced by one of another kind
        self._qdisc_kind = ""
        self.rate_mbit: float | None = None
        self.prefix = self._choose_prefix(prefix)
        self.bridge_ns = f"{self.prefix}br"
        self.master = self._host(f"{self.prefix}m", 1)
        self.targets = [self._host(f"{self.prefix}t{i}", 10 + i) for i in range(n_targets)]
        self.namespaces = [self.bridge_ns, *(h.name for h in self.hosts)]
        _open_labs.append(self)
        try:
            self._build()
            self.set_rate(rate_mbit)
            if loss > 0:
                for t in self.targets:
                    self.set_loss(t, loss)
        except BaseException:
            self.close()
            raise

    # --- construction -------------------------------------------------------------------------

    def _host(self, name: str, octet: int) -> Host:
        return Host(name, f"{SUBNET}.{octet}", f"{SUBNET6}:{octet}" if self.ipv6 else None)

    @staticmethod
    def _choose_prefix(prefix: str | None) -> str:
        existing = _netns_list()
        if prefix is not None:
            if not _PREFIX_RE.match(prefix):
                raise ValueError(f"bad lab prefix {prefix!r}")
            if any(n.startswith(prefix) for n in existing):
                raise LabError(f"namespaces named {prefix}* exist already (cleanup_stale?)")
            chosen = prefix
        else:
            base = f"mrl{os.getpid() % 10000}"
            for suffix in ["", *"abcdefghijklmnopqrstuvwxyz"]:
                chosen = f"{base}{suffix}-"
                if not any(n.startswith(chosen) for n in existing):
                    break
            else:
                raise LabError(f"no free lab prefix {base}?- left")
        OWNER_DIR.mkdir(parents=True, exist_ok=True)
        (OWNER_DIR / f"{chosen}.owner").write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
        return chosen

    @property
    def hosts(self) -> list[Host]:
        return [self.master, *self.targets]

    def _build(self) -> None:
        # /etc/netns first: `ip netns exec` bind-mounts whatever is there when it starts.
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        lines += [f"{h.addr}\t{h.name}" for h in self.hosts]
        lines += [f"{h.addr6}\t{h.name}" for h in self.hosts if h.addr6]
        hosts_text = "\n".join(lines) + "\n"
        for ns in self.namespaces:
            d = NETNS_ETC / ns
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text(hosts_text)
            (d / "resolv.conf").write_text("nameserver 127.0.0.1\n")

        _run(["ip", "-batch", "-"], input="".join(f"netns add {ns}\n" for ns in self.namespaces))

        # Sysctls before the interfaces exist, so that eth0 inherits them from "default".
        # The bridge is pure layer 2: no IPv6 of its own (no RS/MLD/ND noise on the lab).
        no_v6 = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        self._sysctl(self.bridge_ns, no_v6)
        # A switch forwards frames; it does not run the host's IP firewall on them. With the
        # br_netfilter module loaded (Docker loads it), every bridged datagram went through
        # the bridge namespace's (empty) IP hooks, once per port it was flooded to, in the
        # sender's own system call: a fifth of the master's CPU at 1 Gbit/s, whatever tool.
        if Path("/proc/sys/net/bridge").is_dir():
            _run(["ip", "netns", "exec", self.bridge_ns, "sysctl", "-q", "-w",
                  *(f"net.bridge.bridge-nf-call-{t}=0"
                    for t in ("iptables", "ip6tables", "arptables"))], check=False)
        for h in self.hosts:
            if self.ipv6:  # usable at once: no duplicate address detection, no solicitations
                self._sysctl(h.name, [
                    f"net.ipv6.conf.{c}.{k}={v}"
                    for c in ("all", "default")
                    for k, v in (("accept_dad", 0), ("dad_transmits", 0),
                                 ("router_solicitations", 0))
                ])
            else:  # no IPv6 at all, so the master's qdisc counts only what the test sends
                self._sysctl(h.name, no_v6)

        br = [
            "link set lo up",
            f"link add {BRIDGE} type bridge stp_state 0 mcast_snooping 0",
        ]
        for h in self.hosts:
            port = self._port(h)
            br += [
                f"link add {port} type veth peer name {IFNAME} netns {h.name}",
                f"link set {port} master {BRIDGE} up",
            ]
        br.append(f"link set {BRIDGE} up")
        _run(["ip", "-n", self.bridge_ns, "-batch", "-"], input="\n".join(br) + "\n")

        for h in self.hosts:
            cmds = ["link set lo up", f"addr add {h.addr}/24 brd + dev {IFNAME}"]
            if h.addr6:
                cmds.append(f"addr add {h.addr6}/64 dev {IFNAME} nodad")
            cmds += [f"link set {IFNAME} up", f"route add 224.0.0.0/4 dev {IFNAME}"]
            _run(["ip", "-n", h.name, "-batch", "-"], input="\n".join(cmds) + "\n")
            _run(["ip", "netns", "exec", h.name, "ethtool", "-K", IFNAME, *_OFFLOADS])
            if h.addr6:  # the kernel adds it when eth0 comes up; make sure
                res = _run(["ip", "-n", h.name, "-6", "route", "show", "table", "local",
                            "ff00::/8", "dev", IFNAME])
                if not res.stdout.strip():
                    _run(["ip", "-n", h.name, "-6", "route", "add", "multicast", "ff00::/8",
                          "dev", IFNAME, "table", "local"])

    def _port(self, host: Host) -> str:
        return "vm" if host == self.master else f"v{self.targets.index(host)}"

    @staticmethod
    def _sysctl(ns: str, settings: Sequence[str]) -> None:
        _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings])

    # --- running things in the lab ------------------------------------------------------------

    @staticmethod
    def argv(host: Host, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """The command line that runs `argv` on `host`."""
        return ["ip", "netns", "exec", host.name, *(os.fspath(a) for a in argv)]

    def exec(
        self, host: Host, argv: Sequence[str | os.PathLike[str]], **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """subprocess.run(argv) on `host`; keyword arguments go to subprocess.run."""
        return subprocess.run(self.argv(host, argv), **kwargs)

    def popen(
        self, host: Host, argv: Sequence[str | os.PathLike[str]], **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """subprocess.Popen(argv) on `host`. The pid is the program's own (`ip netns exec`
        execs it), so signals (SIGSTOP, ...) reach it directly. Killed at close."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(host, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def hostname(self, host: Host) -> str:
        """The name by which every lab host finds `host` (in the lab's hosts files)."""
        return host.name

    def ping(self, src: Host, dst: str, timeout: float = 2.0) -> bool:
        """One ICMP echo from `src` to address `dst` (IPv4 or IPv6); True if it was answered.
        Done with a raw socket in Python, so that iputils is not needed."""
        res = self.exec(src, [sys.executable, "-c", _PING, dst, str(timeout)],
                        capture_output=True, text=True, timeout=timeout + 10)
        return res.returncode == 0

    # --- link conditions ----------------------------------------------------------------------

    def set_rate(self, rate_mbit: float | None) -> None:
        """Shape the master's egress to `rate_mbit` (tbf), or lift the limit (None)."""
        if rate_mbit is None:
            qdisc = NO_RATE_QDISC
        else:
            burst = max(MIN_BURST, round(rate_mbit * 1e6 / 8 / 1000))
            qdisc = ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst),
                     "latency", TBF_LATENCY]
        if self._qdisc_kind and self._qdisc_kind != qdisc[0]:
            self._tx_offset += self._qdisc_sent()  # a new kind of qdisc starts from 0
        _run(["tc", "-n", self.master.name, "qdisc", "replace", "dev", IFNAME, "root", *qdisc])
        self._qdisc_kind = qdisc[0]
        self.rate_mbit = rate_mbit

    def set_loss(self, host: Host, loss: float, *, udp_only: bool = True) -> None:
        """Drop packets arriving at `host` on eth0 with probability `loss` (0 removes the
        rule): UDP only, or all IP traffic (e.g. rsync's TCP) with udp_only=False."""
        if not 0.0 <= loss <= 1.0:
            raise ValueError(f"loss must be within 0..1, not {loss}")
        script = [
            "add table inet mrlab",
            "add counter inet mrlab lossdrops",
            "add chain inet mrlab input { type filter hook input priority 0; policy accept; }",
            "flush chain inet mrlab input",
        ]
        threshold = round(loss * 10000)
        if threshold > 0:
            proto = "meta l4proto udp " if udp_only else ""
            # numgen gives 0..9999, and nft rejects a "< 10000" that every value matches
            chance = f"numgen random mod 10000 < {threshold} " if threshold < 10000 else ""
            script.append(
                f'add rule inet mrlab input iifname "{IFNAME}" {proto}{chance}'
                'counter name "lossdrops" drop'
            )
        _run(["ip", "netns", "exec", host.name, "nft", "-f", "-"], input="\n".join(script) + "\n")

    def loss_drops(self, host: Host) -> int:
        """Packets dropped at `host` by `set_loss` rules so far (0 if it never had one)."""
        res = _run(["ip", "netns", "exec", host.name, "nft", "list", "counter", "inet", "mrlab",
                    "lossdrops"], check=False)
        m = re.search(r"packets (\d+)", res.stdout)
        return int(m[1]) if m and res.returncode == 0 else 0

    # --- counters -----------------------------------------------------------------------------

    def _qdisc_sent(self) -> int:
        out = _run(["tc", "-n", self.master.name, "-s", "qdisc", "show", "dev", IFNAME]).stdout
        m = re.search(r"^qdisc \S+ \S+ root .*?\n\s*Sent (\d+) bytes", out, re.M | re.S)
        if not m:
            raise LabError(f"no root qdisc counters on the master's {IFNAME}:\n{out}")
        return int(m[1])

    def master_tx_bytes(self) -> int:
        """Bytes the master has put on its link (Ethernet frames, as counted by its root
        qdisc when they leave it; queued ones are not counted yet)."""
        return self._tx_offset + self._qdisc_sent()

    def link_stats(self, host: Host) -> dict[str, int]:
        """The device counters of `host`'s eth0 as rx_bytes, rx_packets, rx_dropped, tx_bytes,
        ... A GSO packet counts once here, with one set of headers (see master_tx_bytes)."""
        out = _run(["ip", "-n", host.name, "-j", "-s", "link", "show", "dev", IFNAME]).stdout
        stats = json.loads(out)[0]["stats64"]
        return {f"{d}_{k}": int(v) for d in ("rx", "tx") for k, v in stats[d].items()}

    # --- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Kill everything in the lab, delete its namespaces and files. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            for f in (proc.stdin, proc.stdout, proc.stderr):
                _close_quietly(f)
        _remove_namespaces(self.namespaces)
        (OWNER_DIR / f"{self.prefix}.owner").unlink(missing_ok=True)
        if self in _open_labs:
            _open_labs.remove(self)

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Lab({len(self.targets)}, prefix={self.prefix!r}, rate_mbit={self.rate_mbit},"
                f" ipv6={self.ipv6}{', closed' if self.closed else ''})")


def _close_quietly(f: IO[Any] | None) -> None:
    if f is not None:
        with contextlib.suppress(OSError):
            f.close()


_PING = r"""
import os, select, socket, struct, sys, time
dst, timeout = sys.argv[1], float(sys.argv[2])
v6 = ":" in dst
if v6:
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    kind, reply = 128, 129
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    kind, reply = 8, 0
ident = os.getpid() & 0xFFFF
payload = b"mrlab-ping"
def csum(b):
    b += b"\0" * (len(b) & 1)
    t = sum(struct.unpack(f"!{len(b) // 2}H", b))
    t = (t >> 16) + (t & 0xFFFF)
    return ~(t + (t >> 16)) & 0xFFFF
head = struct.pack("!BBHHH", kind, 0, 0, ident, 1)
if not v6:  # the kernel fills in the ICMPv6 checksum itself
    head = struct.pack("!BBHHH", kind, 0, csum(head + payload), ident, 1)
s.sendto(head + payload, (dst, 0))
end = time.monotonic() + timeout
while (left := end - time.monotonic()) > 0:
    if not select.select([s], [], [], left)[0]:
        break
    data = s.recv(2048)
    if not v6:
        data = data[(data[0] & 0x0F) * 4:]
    t, _, _, i, seq = struct.unpack("!BBHHH", data[:8])
    if t == reply and i == ident and seq == 1:
        sys.exit(0)
sys.exit(1)
"""
