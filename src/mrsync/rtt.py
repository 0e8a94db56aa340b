"""``mrsync-rtt``: test the network path to some hosts over the transport mrsync uses.

It starts the receiver on each host exactly as mrsync does (``mrsync --server`` through the
remote shell, or locally for ``localhost``), over the same control handshake, and multicasts
PAGES pages of random bytes to the group as one transfer of kind "rtt". The receivers throw the
pages away and answer every one at once (the master asks for a progress report after every
datagram), so the time from sending page *s* to the arrival of the report "highest seq seen =
*s*" is a round trip through the network and the receiver process, without any disk. Pages are
paced (one per millisecond by default, or ``--rate``) so that the times measure the path, not
a queue. After the last page the master polls; every receiver answers with the pages it never
got. No page is repaired: the count is the loss of the path.

Printed per host: pages missing (count and %), pages answered, RTT min / median / p99 / max,
the path MTU (the smaller of the two interfaces' MTUs) and a histogram of RTTs in 1 ms buckets
in the original rtt's format (row *k* counts round trips of *k* to *k*+1 ms); at the end the
page size mrsync would pick for these hosts.

The measuring is a small state machine without I/O (``RttProbe``); the I/O is mrsync's own
master loop (``RttJob`` is a ``Job`` that runs the probe instead of a file transfer).
"""

from __future__ import annotations

import argparse
import math
import os
import selectors
import socket
import sys
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from mrsync import __version__, exitcodes
from mrsync.cli import (
    Parser,
    add_group_options,
    add_route_options,
    add_shell_options,
    config_defaults,
    data_plane,
    parse_rate_arg,
)
from mrsync.control import StartTransfer
from mrsync.io.net import Batcher, interface_mtu, open_sender
from mrsync.job import (
    HANDSHAKE_TIMEOUT,
    Address,
    Job,
    JobOptions,
    Target,
    page_size_for_mtu,
)
from mrsync.remote.targets import TargetSpec, host_target
from mrsync.report import Reporter
from mrsync.wire import DATA_OVERHEAD, FLAG_COMPLETE, Feedback, encode_data, encode_poll

RTT_OBJECT = 0
DEFAULT_PAGES = 1000
DEFAULT_INTERVAL = 0.001  # seconds between pages without --rate
POLL_EVERY = 0.2  # seconds between final polls, until every host has answered one
FINAL_WAIT = 3.0  # seconds after the last page to wait for every host's answer
RANDOM_PAGES = 16  # distinct random pages, sent in turn
CONFIG_KEYS = ("rsh", "mrsync_path", "address", "port", "interface", "ttl")

# -- the measurement, without I/O -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendProbePage:
    """Multicast page ``page`` of the rtt object as DATA with this seq."""

    page: int
    seq: int


@dataclass(frozen=True, slots=True)
class SendPollDatagram:
    data: bytes


ProbeAction = SendProbePage | SendPollDatagram


@dataclass
class HostRtt:
    """What one receiver told us."""

    pages: int
    rtts: list[float] = field(default_factory=list)  # seconds, one per answered page
    missing: int | None = None  # pages it lacked when it answered the final poll
    failed: bool = False

    def __post_init__(self) -> None:
        self._answered = bytearray(self.pages + 1)  # by seq

    @property
    def answered(self) -> int:
        return len(self.rtts)

    def answer(self, seq: int, rtt: float) -> None:
        if 1 <= seq <= self.pages and not self._answered[seq]:
            self._answered[seq] = 1
            self.rtts.append(rtt)

    def histogram(self) -> list[tuple[int, int]]:
        """(k, round trips of k to k+1 ms), for the buckets that have any."""
        counts = Counter(int(r * 1000) for r in self.rtts)
        return sorted(counts.items())

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile of the round trips, in seconds."""
        ordered = sorted(self.rtts)
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        return ordered[rank - 1]


class RttProbe:
    """Sends ``pages`` pages one ``interval`` apart (seq = page + 1), records the time from
    sending each to the first report that the receiver has processed it, then polls until every
    receiver has said how many pages it lacks, or ``final_wait`` has passed."""

    def __init__(
        self,
        *,
        transfer: int,
        pages: int,
        receivers: Sequence[int],
        key: bytes,
        session: int,
        interval: float,
        now: float,
        poll_every: float = POLL_EVERY,
        final_wait: float = FINAL_WAIT,
    ) -> None:
        self.transfer = transfer
        self.pages = pages
        self.hosts = {rid: HostRtt(pages) for rid in receivers}
        self._key = key
        self._session = session
        self._interval = interval
        self._start = now
        self._next = 0  # next page to send
        self._send_times = array("d")
        self._poll = 0
        self._poll_at = math.inf
        self._poll_every = poll_every
        self._final_wait = final_wait
        self._deadline = math.inf
        self._expired = False

    @property
    def sending(self) -> bool:
        return self._next < self.pages

    @property
    def done(self) -> bool:
        if all(h.failed for h in self.hosts.values()):
            return True  # nobody left to measure
        if self.sending:
            return False
        return self._expired or all(h.failed or h.missing is not None
                                    for h in self.hosts.values())

    def next_wakeup(self, now: float) -> float:
        if self.done:
            return now + 0.25
        if self.sending:
            return self._start + self._next * self._interval
        return min(self._poll_at, self._deadline)

    def poll(self, now: float, budget: int = 64) -> list[ProbeAction]:
        actions: list[ProbeAction] = []
        while self.sending and len(actions) < budget:
            if now < self._start + self._next * self._interval:
                return actions
            self._send_times.append(now)
            self._next += 1
            actions.append(SendProbePage(self._next - 1, self._next))
            if not self.sending:
                # Datagrams travel in order: this poll reaches each receiver after the pages.
                self._poll_at = now
                self._deadline = now + self._final_wait
        if self.sending or self.done:
            return actions
        if now >= self._deadline:
            self._expired = True
            return actions
        if now >= self._poll_at:
            self._poll += 1
            self._poll_at = now + self._poll_every
            actions.append(SendPollDatagram(
                encode_poll(self._key, self._session, self.transfer, self._poll, self.pages)))
        return actions

    def receive_feedback(self, pkt: Feedback, now: float) -> None:
        host = self.hosts.get(pkt.receiver)
        if host is None or pkt.transfer != self.transfer or host.failed:
            return
        if pkt.poll:
            # The answer to a final poll (the receiver processed every page before it).
            if host.missing is None:
                host.missing = 0 if pkt.flags & FLAG_COMPLETE else pkt.missing
            return
        # Unsolicited: sent as the page with this seq was processed.
        seq = pkt.seq_seen
        if 1 <= seq <= len(self._send_times):
            host.answer(seq, now - self._send_times[seq - 1])
        if pkt.flags & FLAG_COMPLETE and host.missing is None:
            host.missing = 0

    def receiver_failed(self, receiver: int) -> None:
        host = self.hosts.get(receiver)
        if host is not None:
            host.failed = True


# -- the I/O: mrsync's own master loop ------------------------------------------------------


@dataclass
class _RttTarget(Target):
    @property
    def name(self) -> str:
        """A host as the operator named it."""
        spec = self.spec
        if spec.host is None:
            return "localhost"
        return f"{spec.user}@{spec.host}" if spec.user else spec.host


class RttJob(Job):
    """Starts the receivers as mrsync does, then runs an ``RttProbe`` over the group."""

    def __init__(
        self, options: JobOptions, reporter: Reporter, *, pages: int, interval: float
    ) -> None:
        super().__init__(options, reporter)
        self.targets = [_RttTarget(rid=t.rid, spec=t.spec) for t in self.targets]
        self.report_every = 1  # every page answered at once
        self.fec = False  # no parity: the loss is what we measure
        self.pages = pages
        self.interval = interval
        self.probe: RttProbe | None = None
        self._payloads = [os.urandom(self.page_size) for _ in range(RANDOM_PAGES)]
        ep = options.endpoint
        self._group: Address = (ep.group, ep.port) if ep.family == socket.AF_INET else (
            ep.group, ep.port, 0, socket.if_nametoindex(ep.interface))

    def measure(self) -> RttProbe | None:
        """Runs the whole test; None when no receiver came up."""
        self.sock = open_sender(self.options.endpoint, ttl=self.options.ttl)
        self.batcher = Batcher(self.sock)
        self.selector.register(self.sock, selectors.EVENT_READ, None)
        try:
            for t in self.targets:
                if t.spec.host is not None:
                    self.reporter.log(1, f"using {self.options.rsh!r} to start the receiver on "
                                         f"{t.spec.host}")
            self._start_targets()
            self._pump(lambda: all(t.hello or not t.alive for t in self.targets),
                       timeout=HANDSHAKE_TIMEOUT, what="starting")
            for t in self.targets:
                if t.alive and t.hello is not None:
                    self.reporter.log(1, f"{t.name}: receiver pid {t.hello.pid} on "
                                         f"{t.hello.hostname} ({t.hello.address})")
            alive = [t for t in self.targets if t.alive]
            if not alive:
                return None
            transfer = self._next_transfer()
            start = StartTransfer(transfer, "rtt", size=self.pages * self.page_size)
            for t in alive:
                self._send(t, start)
            self._pump(lambda: all(transfer in t.ready or not t.alive for t in self.targets),
                       timeout=HANDSHAKE_TIMEOUT, what="rtt")
            ready = [t.rid for t in self.targets if t.alive]
            if not ready:
                return None
            self.reporter.log(1, "sending data...")
            probe = self.probe = RttProbe(
                transfer=transfer, pages=self.pages, receivers=ready, key=self.key,
                session=self.session, interval=self.interval, now=time.monotonic(),
            )
            for t in self.targets:
                if not t.alive:
                    probe.receiver_failed(t.rid)
            self._pump(lambda: probe.done, timeout=None, what="rtt")
            return probe
        finally:
            self._stop_targets()
            self.sock.close()

    def _step_flows(self, now: float) -> float:
        probe, batch = self.probe, self.batcher
        if probe is None or batch is None:
            return 0.25
        for action in probe.poll(now):
            if isinstance(action, SendProbePage):
                payload = self._payloads[action.page % RANDOM_PAGES]
                batch.add(encode_data(self.key, self.session, probe.transfer, action.seq,
                                      RTT_OBJECT, action.page, payload), self._group)
            else:
                batch.add(action.data, self._group)
        batch.flush()
        return probe.next_wakeup(time.monotonic()) - now

    def _on_feedback(self, pkt: Feedback, now: float) -> None:
        if self.probe is not None:
            self.probe.receive_feedback(pkt, now)

    def _fail(self, t: Target, reason: str) -> None:
        super()._fail(t, reason)
        if self.probe is not None:
            self.probe.receiver_failed(t.rid)


# -- the command ----------------------------------------------------------------------------

DESCRIPTION = """\
Test the network path from this host to HOSTs the way mrsync uses it: start the receiver on
each host as mrsync does (through the remote shell, or locally for "localhost"), multicast
PAGES pages of random bytes over the group, one every millisecond (or at --rate), and report
per host the pages that never arrived, the round-trip times (min / median / p99 / max and a
histogram in 1 ms buckets: row k counts round trips of k to k+1 ms), the path MTU, and the
page size mrsync would pick. The receivers write nothing; no page is repaired.

  mrsync-rtt -e "ssh -p 2222" -n 2000 node1 node2 root@node3
  mrsync-rtt localhost               a receiver on this host, over loopback
"""

EPILOG = """\
exit status:
  0   every host answered (missing pages are reported, not an error)
  1   usage error
  12  no host answered
  20  interrupted
  23  some hosts did not answer (each is reported)
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mrsync-rtt", description=DESCRIPTION, epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hosts", nargs="+", metavar="HOST", help="host, user@host, or localhost")
    add_shell_options(p)
    add_group_options(p)
    add_route_options(p)
    p.add_argument("-n", "--pages", type=int, default=DEFAULT_PAGES, metavar="PAGES",
                   help=f"pages to send (default {DEFAULT_PAGES})")
    p.add_argument("-s", "--page-size", type=int, metavar="BYTES",
                   help="payload bytes per page (default: the page size mrsync would pick)")
    p.add_argument("--rate", type=parse_rate_arg, metavar="BITS",
                   help="send at this many bits per second, e.g. 50M (default: one page "
                        "every millisecond)")
    p.add_argument("-v", "--verbose", type=int, choices=(0, 1, 2), default=0, metavar="0|1|2",
                   help="0: the report only (default); 1: how the receivers start; 2: also what "
                        "they say on stderr")
    p.add_argument("--config", metavar="FILE",
                   help="defaults from this TOML file too, after /etc/mrsync.toml and "
                        "~/.config/mrsync.toml (keys rsh, mrsync_path, address, port, "
                        "interface, ttl apply here)")
    p.add_argument("--version", action="version", version=f"mrsync-rtt {__version__}")
    return p


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def host_report(t: Target, host: HostRtt | None, local_mtu: int) -> list[str]:
    name = t.name
    if t.failure is not None or host is None:
        return [f"== {name}: FAILED: {t.failure or 'no answer'}"]
    hello = t.hello
    where = f"{hello.address}, receiver pid {hello.pid}" if hello is not None else ""
    lines = [f"== {name} ({where})"]
    if host.missing is not None:
        missing, note = host.missing, ""
    else:
        missing = host.pages - host.answered
        note = " (no answer to the final poll: counted from the pages answered)"
    pct = 100 * missing / host.pages if host.pages else 0.0
    lines.append(f"Missing pages = {missing:10d} ({pct:5.2f}%) out of total pages = "
                 f"{host.pages}{note}")
    if host.rtts:
        lines.append(
            f"Answered pages = {host.answered}; rtt min {_ms(min(host.rtts))} / median "
            f"{_ms(host.percentile(50))} / p99 {_ms(host.percentile(99))} / max "
            f"{_ms(max(host.rtts))} ms")
    else:
        lines.append("Answered pages = 0")
    lost_answers = host.pages - missing - host.answered
    if host.missing is not None and lost_answers > 0:
        lines.append(f"({lost_answers} pages arrived but their answers did not)")
    remote_mtu = hello.mtu if hello is not None else 0
    path = min(local_mtu, remote_mtu) if remote_mtu else local_mtu
    there = f"{remote_mtu}" if remote_mtu else "unknown"
    lines.append(f"Path MTU = {path} (here {local_mtu}, there {there})")
    lines += ["rtt histogram", "msec counts", "---- --------"]
    lines += [f"{k:4d} {n:8d}" for k, n in host.histogram()]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    defaults = config_defaults(argv, parser.prog)
    if isinstance(defaults, int):
        return defaults
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in CONFIG_KEYS})
    args = parser.parse_args(argv)
    if args.pages < 1:
        parser.error("-n must be at least 1")
    specs: list[TargetSpec] = []
    for h in args.hosts:
        user, at, host = h.rpartition("@")
        if not host or host.count(":") == 1:  # (an IPv6 address has more)
            parser.error(f"{h!r}: give a host (host, user@host, localhost), not host:path")
        spec = host_target(f"{user}{at}{host.strip('[]')}", "")
        if spec in specs:
            parser.error(f"host {h!r} is given twice")
        specs.append(spec)
    family = socket.AF_INET6 if args.ipv6 else socket.AF_INET
    local_only = all(s.host is None for s in specs)
    try:
        endpoint, ttl = data_plane(family, args.address, args.port, args.interface, args.ttl,
                                   local_only=local_only)
        local_mtu = interface_mtu(endpoint.interface)
    except OSError as exc:
        print(f"mrsync-rtt: error: cannot choose the multicast interface: {exc}",
              file=sys.stderr)
        return exitcodes.USAGE
    mrsync_page = page_size_for_mtu(local_mtu, family)
    page_size = args.page_size or mrsync_page
    if not 1 <= page_size <= 65507 - DATA_OVERHEAD:
        parser.error(f"page size must be 1 to {65507 - DATA_OVERHEAD} bytes")
    interval = DEFAULT_INTERVAL
    if args.rate:
        interval = (page_size + DATA_OVERHEAD) * 8 / args.rate
    options = JobOptions(
        source="", targets=specs, endpoint=endpoint, ttl=ttl, page_size=page_size,
        rsh=args.rsh, mrsync_path=args.mrsync_path, parity=False, verbose=args.verbose,
    )
    reporter = Reporter(verbose=args.verbose, progress=False)
    job = RttJob(options, reporter, pages=args.pages, interval=interval)
    out = sys.stdout
    hosts = f"{len(specs)} host" + ("s" if len(specs) > 1 else "")
    print(f"mrsync-rtt: {args.pages} pages of {page_size} bytes to {hosts} over "
          f"{endpoint.group} port {endpoint.port} on {endpoint.interface} "
          f"({endpoint.address}), one every {interval * 1000:.2f} ms", file=out, flush=True)
    try:
        probe = job.measure()
    except KeyboardInterrupt:
        print("mrsync-rtt: interrupted", file=sys.stderr)
        return exitcodes.INTERRUPTED
    except OSError as exc:
        print(f"mrsync-rtt: error: {exc}", file=sys.stderr)
        return exitcodes.SESSION_FAILED
    min_mtu = local_mtu
    for t in job.targets:
        host = probe.hosts.get(t.rid) if probe is not None else None
        print("", file=out)
        for line in host_report(t, host, local_mtu):
            print(line, file=out)
        if t.alive and t.hello is not None and t.hello.mtu:
            min_mtu = min(min_mtu, t.hello.mtu)
    print("", file=out)
    advice = ""
    if min_mtu < local_mtu:
        advice = (f"; a host's MTU is smaller: use --page-size "
                  f"{page_size_for_mtu(min_mtu, family)} with these hosts")
    print(f"Page size mrsync would pick: {mrsync_page} bytes (MTU {local_mtu} on "
          f"{endpoint.interface}){advice}", file=out, flush=True)
    failed = [t for t in job.targets if t.failure is not None]
    if not failed:
        return exitcodes.OK
    return exitcodes.SESSION_FAILED if len(failed) == len(job.targets) else exitcodes.PARTIAL


if __name__ == "__main__":
    sys.exit(main())
