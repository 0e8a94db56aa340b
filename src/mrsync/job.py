"""One sync: plan -> start targets -> manifest transfer -> data transfer -> catch-up -> report.

This is the master's thin I/O layer: it owns the processes, pipes and the UDP socket, feeds
their events to the ``Sender`` state machines and the per-target bookkeeping, and performs the
actions they return. The protocol decisions live in ``mrsync.engine``.

A *flow* is one sender machine with the place its datagrams go: the group for a transfer to
everyone, or one target's unicast address when that target sat out and is being caught up.
Several flows can run at once (catch-ups of several targets); feedback is authenticated once
here and handed to the flow that serves its receiver.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import selectors
import socket
import subprocess
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3

from mrsync import PROTOCOL_VERSION, exitcodes
from mrsync.control import (
    Bye,
    Digests,
    Failure,
    FileFailure,
    FrameReader,
    Hello,
    HelloOk,
    Message,
    Needs,
    ProtocolError,
    Ready,
    Result,
    StartTransfer,
    TransferDone,
    bitmap_from_ids,
    bitmap_has,
    frame,
    ids_from_bitmap,
)
from mrsync.engine.fec import PARITY_BLOCK_PAGES
from mrsync.engine.fec import supported as fec_supported
from mrsync.engine.layout import Layout, block_pages_for
from mrsync.engine.rate import report_every_for
from mrsync.engine.sender import (
    ReceiverLost,
    ReceiverSatOut,
    SendDatagram,
    Sender,
    SendPage,
    SendParity,
    SendRun,
    catch_up_first_seq,
)
from mrsync.io.net import IP_UDP_HEADERS, Batcher, Endpoint, interface_mtu, open_sender
from mrsync.io.source import BlobPages, FilePages, ParitySymbols
from mrsync.plan.manifest import Kind, Manifest, encode_manifest
from mrsync.plan.options import SyncOptions
from mrsync.plan.scan import check_source, hash_manifest, scan_source, source_root
from mrsync.remote.targets import TargetSpec, server_command, spawn_server
from mrsync.report import Reporter, TargetView
from mrsync.wire import (
    DATA_OVERHEAD,
    DecodeError,
    Feedback,
    decode,
    encode_data,
    encode_data_run,
    encode_parity,
)

MANIFEST_OBJECT = 0
HANDSHAKE_TIMEOUT = 30.0  # seconds for a target to start and answer
WINDOW_BYTES = 12 * 1024 * 1024  # in flight beyond the slowest target: a third of its buffer

Address = tuple[str, int] | tuple[str, int, int, int]
# How often the digests of files read to their end go to the targets: a file's last page
# and its digest then reach a target about together, in few control messages.
DIGESTS_EVERY = 0.01
# Digests follow the data on each target's control stream only while that stays small; past
# it (say 1,000 targets x 2,000 files) they are computed up front and multicast once, in the
# manifest, at the price of reading the source one more time.
DIGESTS_FOLLOW_MAX_BYTES = 64 * 1024 * 1024
_DIGEST_WIRE_BYTES = 40  # one file's digest and id in a Digests message (msgpack)


def _digest_bytes(manifest: Manifest) -> int:
    """Control-stream bytes of the digests one target would get, at most."""
    return _DIGEST_WIRE_BYTES * sum(
        1 for e in manifest.entries if e.kind == Kind.FILE and not e.digest and e.link < 0)


@dataclass
class JobOptions:
    source: str
    targets: list[TargetSpec]
    endpoint: Endpoint
    ttl: int = 0
    page_size: int | None = None
    rate: float | None = None  # payload bytes per second; None = no cap
    verbose: int = 0
    progress: bool = False
    sync: SyncOptions = field(default_factory=SyncOptions)
    rsh: str = "ssh"
    mrsync_path: str = "mrsync"
    sitout_lag: float | None = 2.0
    silence_timeout: float = 30.0
    parity: bool = True  # RaptorQ parity repair when the page size allows it
    fec_ratio: float = 0.0  # proactive parity per block, as a share of its pages
    rate_control: bool = True  # pace to the delivery rate the targets report


@dataclass
class Target:
    """The master's view of one target."""

    rid: int
    spec: TargetSpec
    proc: subprocess.Popen[bytes] | None = None
    reader: FrameReader = field(default_factory=FrameReader)
    # Control bytes its stdin did not take yet: a stalled target (or its remote shell) must
    # never block the master, which writes without waiting and sends the rest when it can.
    outbox: bytearray = field(default_factory=bytearray)
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=5))
    hello: HelloOk | None = None
    ready: set[int] = field(default_factory=set)
    needs: Needs | None = None
    done: set[int] = field(default_factory=set)
    result: Result | None = None
    failure: str | None = None
    sat_out: bool = False
    caught_up: bool = False
    wanted_pages: int = 0  # pages of the data transfer it wants (for progress)
    missing: int = -1  # of those, how many it last said it lacks (-1: not heard yet)
    seq_seen: int = 0  # its last report in the data transfer: highest seq seen,
    received: int = 0  # and datagrams received (the difference is what it lost)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def alive(self) -> bool:
        return self.failure is None


@dataclass
class Flow:
    sender: Sender
    source: BlobPages | FilePages
    dest: Address
    parity: ParitySymbols
    catch_up: bool = False  # a sat-out target's own unicast flow
    first_pass_logged: bool = False


@dataclass
class JobResult:
    targets: list[Target]
    manifest: Manifest
    union_files: int
    union_bytes: int
    elapsed: float
    sender_stats: dict[str, int]
    warnings: list[str]
    dry_run: bool = False
    source: str = ""
    page_size: int = 0

    @property
    def failed(self) -> list[Target]:
        return [t for t in self.targets if t.failure is not None]

    def identical(self, t: Target) -> bool:
        """The target ended identical (for a dry run: it answered)."""
        if t.failure is not None:
            return False
        return self.dry_run or (t.result is not None and not t.result.errors)

    def exit_code(self) -> int:
        good = sum(self.identical(t) for t in self.targets)
        if good == len(self.targets):
            return exitcodes.OK
        if all(t.failure is not None for t in self.targets):
            return exitcodes.SESSION_FAILED
        return exitcodes.PARTIAL

    @property
    def file_errors(self) -> list[tuple[Target, FileFailure]]:
        return [(t, e) for t in self.targets if t.result for e in t.result.errors]


def choose_page_size(endpoint: Endpoint) -> int:
    """The largest page whose datagram crosses the path without IP fragmentation, rounded down
    to a multiple of 4 KiB when it is that large (file-system friendly writes). Smaller pages
    are used whole: rounding 1,428 down to 1,424 would have cost 0.3 % of the link."""
    return page_size_for_mtu(interface_mtu(endpoint.interface), endpoint.family)


def page_size_for_mtu(mtu: int, family: int) -> int:
    """``choose_page_size`` for a given MTU (mrsync-rtt asks it for the path's)."""
    page = min(mtu, 65535) - IP_UDP_HEADERS[family] - DATA_OVERHEAD
    return page - page % 4096 if page >= 8192 else page


class Job:
    def __init__(
        self,
        options: JobOptions,
        reporter: Reporter,
        *,
        spawned: list[subprocess.Popen[bytes] | OSError] | None = None,
    ) -> None:
        """``spawned``: the targets' receivers, one per target in order, if the caller
        started them already (``remote.targets.spawn_server``); else ``run`` starts them."""
        self.options = options
        self.reporter = reporter
        if spawned is not None and len(spawned) != len(options.targets):
            raise ValueError("one spawned receiver per target")
        self._spawned = spawned
        self.session = secrets.randbits(32)
        self.key = secrets.token_bytes(32)
        self.page_size = options.page_size or choose_page_size(options.endpoint)
        self.max_datagram = self.page_size + DATA_OVERHEAD
        self.window = max(16, min(8192, WINDOW_BYTES // (self.max_datagram + 512)))
        self.block_pages = block_pages_for(self.page_size, PARITY_BLOCK_PAGES)
        self.fec = options.parity and fec_supported(self.page_size)
        self.targets = [Target(rid=i, spec=spec) for i, spec in enumerate(options.targets)]
        self.selector = selectors.DefaultSelector()
        self.sock: socket.socket | None = None
        self.batcher: Batcher | None = None
        self.flows: list[Flow] = []
        self.stats: Counter[str] = Counter()
        self._transfer = 0
        self._buf = bytearray(65536)
        # Receivers report progress every this many datagrams without being asked.
        self.report_every = report_every_for(len(options.targets), self.window, self.page_size)
        self._phase = "starting"  # starting, planning, data, finishing: for the progress view
        self._data_transfer = 0
        self._digests_due = 0.0  # when completed file digests go out next

    # -- the whole job ----------------------------------------------------------------------

    def run(self) -> JobResult:
        start = time.monotonic()
        warnings: list[str] = []
        check_source(self.options.source)  # a missing SRC fails before any host is contacted
        self.sock = open_sender(self.options.endpoint, ttl=self.options.ttl)
        self.batcher = Batcher(self.sock)
        self.selector.register(self.sock, selectors.EVENT_READ, None)
        union: list[int] = []
        self.reporter.watch(self.progress_view)
        try:
            # The targets start up (a remote shell, an interpreter) while SRC is scanned
            # here: neither waits for the other.
            self._start_targets()
            # Content digests are needed up front only to compare content (-c); otherwise
            # they are computed while the files are sent, and follow them.
            manifest = scan_source(self.options.source, warnings, options=self.options.sync,
                                   hash_files=self.options.sync.checksum)
            if manifest.digests_follow and _digest_bytes(manifest) * len(self.targets) > (
                    DIGESTS_FOLLOW_MAX_BYTES):
                # So many files and targets that sending each target its digests would cost
                # more than hashing up front and multicasting them once, in the manifest.
                manifest = hash_manifest(manifest, source_root(self.options.source), warnings)
            for w in warnings:
                self.reporter.warn(w)
            blob = encode_manifest(manifest)
            self._pump(lambda: all(t.hello or not t.alive for t in self.targets),
                       timeout=HANDSHAKE_TIMEOUT, what="starting")
            # Transfer 1: the manifest, to every target.
            self._phase = "planning"
            self._transfer_blob(blob)
            self._pump(lambda: all(t.needs or not t.alive for t in self.targets),
                       timeout=None, what="planning")
            if self.options.sync.dry_run:
                # Each target has said what it would change; nothing is sent or touched.
                for t in self.targets:
                    if t.needs is not None:
                        self.reporter.itemize(t.name, t.needs.itemized)
                return self._result(manifest, [], start, warnings)
            # Transfer 2: the union of what the targets lack, once, to all.
            wanted: set[int] = set()
            for t in self.targets:
                if t.alive and t.needs is not None:
                    wanted.update(ids_from_bitmap(t.needs.objects, len(manifest.entries)))
            union = sorted(i for i in wanted if manifest.entries[i].kind == Kind.FILE)
            self._transfer_files(manifest, union)
            self._phase = "finishing"
            self._pump(lambda: all(t.result or not t.alive for t in self.targets),
                       timeout=None, what="finishing")
        finally:
            self._stop_targets()
            self.sock.close()
        return self._result(manifest, union, start, warnings)

    def _result(
        self, manifest: Manifest, union: list[int], start: float, warnings: list[str]
    ) -> JobResult:
        return JobResult(
            targets=self.targets,
            manifest=manifest,
            union_files=len(union),
            union_bytes=sum(manifest.entries[i].size for i in union),
            elapsed=time.monotonic() - start,
            sender_stats=dict(self.stats),
            warnings=warnings,
            dry_run=self.options.sync.dry_run,
            source=self.options.source,
            page_size=self.page_size,
        )

    def _transfer_blob(self, blob: bytes) -> None:
        digest = blake3.blake3(blob).digest()
        layout = Layout([(MANIFEST_OBJECT, len(blob))], self.page_size, self.block_pages)
        start = StartTransfer(self._next_transfer(), "manifest", size=len(blob), digest=digest)
        self._run_transfer(start, layout, lambda: BlobPages(blob, self.page_size), "manifest")

    def _transfer_files(self, manifest: Manifest, union: list[int]) -> None:
        entries = manifest.entries
        layout = Layout([(i, entries[i].size) for i in union], self.page_size, self.block_pages)
        start = StartTransfer(self._next_transfer(), "data",
                              objects=bitmap_from_ids(union, len(entries)))
        root = source_root(self.options.source)
        sources: list[FilePages] = []

        def open_source() -> FilePages:
            # The first source serves the multicast flow, whose first pass reads every file
            # in order: it hashes them (the catch-up flows come after, digests all sent).
            owed = union if manifest.digests_follow and not sources else ()
            sources.append(FilePages(root, manifest, self.page_size, digest=owed))
            return sources[-1]

        union_set = set(union)
        for t in self.targets:
            if t.alive and t.needs is not None:
                bits = t.needs.objects
                t.wanted_pages = sum(layout.pages_of(i) for i in union_set if bitmap_has(bits, i))
        self._phase = "data"
        self._data_transfer = start.transfer
        self.reporter.begin_data(layout.bytes_total(), [t.name for t in self.targets if t.alive])
        self._run_transfer(start, layout, open_source, "data")
        for obj in sorted(set().union(*(s.short_reads for s in sources))):
            self.reporter.warn(
                f"{os.fsdecode(entries[obj].path)}: changed while being sent; targets refuse it"
            )

    def _next_transfer(self) -> int:
        self._transfer += 1
        return self._transfer

    def _run_transfer(
        self,
        start: StartTransfer,
        layout: Layout,
        open_source: Callable[[], BlobPages | FilePages],
        what: str,
    ) -> None:
        """Multicast one transfer to every live target, then catch up, by unicast, the
        targets that sat out."""
        transfer = start.transfer
        self.reporter.log(2, f"transfer {transfer} ({what}): {layout.total_pages} pages of "
                             f"{layout.page_size} bytes, blocks of {layout.block_pages}")
        for t in self.targets:
            if t.alive:
                self._send(t, start)
        self._pump(lambda: all(transfer in t.ready or not t.alive for t in self.targets),
                   timeout=HANDSHAKE_TIMEOUT, what=what)
        ep = self.options.endpoint
        group: Address = (ep.group, ep.port) if ep.family == socket.AF_INET else (
            ep.group, ep.port, 0, socket.if_nametoindex(ep.interface))
        sender = Sender(
            transfer=transfer, layout=layout, receivers=[t.rid for t in self.targets if t.alive],
            key=self.key, session=self.session, window=self.window, rate=self.options.rate,
            now=time.monotonic(), sitout_lag=self.options.sitout_lag,
            silence_timeout=self.options.silence_timeout,
            fec_ratio=self.options.fec_ratio if self.fec else 0.0,
            rate_control=self.options.rate_control,
            datagram_bytes=self.max_datagram + IP_UDP_HEADERS[ep.family],
        )
        for t in self.targets:
            if transfer in t.done:
                sender.receiver_done(t.rid)
        source = open_source()
        self._run_flows([Flow(sender, source, group, ParitySymbols(layout, source))], what)
        if isinstance(source, FilePages):
            # The group can end before its first pass does (every target that stayed with it
            # failed): the digests of files it did not read yet, for the targets that sat out.
            self._send_digests(transfer, source.finish_digests())
        self.reporter.log(2, f"transfer {transfer} ({what}) done")
        # Catch-up: each target that sat out gets what it still lacks, by unicast, with its
        # own sender, all at once. Each flow numbers its seqs from a range of its own past
        # the group's, so that no two datagrams of the session share a MAC nonce.
        behind = [t for t in self.targets
                  if t.alive and t.sat_out and transfer not in t.done and t.hello is not None]
        if behind:
            flows = []
            for t in behind:
                assert t.hello is not None
                self.reporter.target_state(t.name, "catching up")
                catchup = Sender(
                    transfer=transfer, layout=layout, receivers=[t.rid], key=self.key,
                    session=self.session, window=self.window, rate=self.options.rate,
                    now=time.monotonic(), sitout_lag=None,
                    silence_timeout=self.options.silence_timeout,
                    first_seq=catch_up_first_seq(sender.last_seq, t.rid), repair_only=True,
                    rate_control=self.options.rate_control,
                    datagram_bytes=self.max_datagram + IP_UDP_HEADERS[ep.family],
                )
                addr: Address = (t.hello.address, t.hello.data_port) if (
                    ep.family == socket.AF_INET) else (t.hello.address, t.hello.data_port, 0, 0)
                source = open_source()
                flows.append(Flow(catchup, source, addr, ParitySymbols(layout, source),
                                  catch_up=True))
            self._run_flows(flows, f"{what} catch-up")
            for t in behind:
                if t.alive:
                    t.caught_up = True
                    self.reporter.target_state(t.name, "caught up")

    def _run_flows(self, flows: list[Flow], what: str) -> None:
        self.flows = flows
        try:
            self._pump(lambda: all(f.sender.done for f in flows), timeout=None, what=what)
        finally:
            self.flows = []
            for flow in flows:
                flow.source.close()
                self._add_stats(flow.sender)

    def _add_stats(self, sender: Sender) -> None:
        s = sender.stats
        self.stats.update(
            pages_sent=s.pages_sent, pages_resent=s.pages_resent, bytes_sent=s.bytes_sent,
            bytes_resent=s.bytes_resent, polls=s.polls_sent, feedback=s.feedback,
            parity_sent=s.parity_sent, parity_bytes=s.parity_bytes,
        )
        for reason, count in s.dropped.items():
            self.stats[f"dropped_{reason}"] += count

    # -- the event loop ---------------------------------------------------------------------

    def _pump(self, until: Callable[[], bool], *, timeout: float | None, what: str) -> None:
        """Run the event loop until ``until()`` holds. With ``timeout``, targets that have not
        got there by then are failed; without, only a dead target or a sender's silence
        timeout fails one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not until():
            now = time.monotonic()
            wait = self._step_flows(now)
            if deadline is not None:
                if now >= deadline:
                    self._fail_laggards(until, f"no answer within {timeout:.0f} s ({what})")
                    return
                wait = min(wait, deadline - now)
            for key, _ in self.selector.select(max(0.0, wait)):
                if key.fileobj is self.sock:
                    self._drain_feedback()
                elif isinstance(key.data, tuple):
                    if key.data[0] == "stdin":
                        self._flush_control(key.data[1])
                    else:
                        self._read_stderr(key.data[1])
                else:
                    assert isinstance(key.data, Target)
                    self._read_control(key.data)
            self.reporter.tick()

    def _step_flows(self, now: float) -> float:
        """Let every flow send what is due; returns how long the loop may sleep."""
        wait = 0.25
        for flow in self.flows:
            self._step(flow, now)
            if not (flow.first_pass_logged or flow.catch_up) and flow.sender.first_pass_done:
                flow.first_pass_logged = True  # what follows is repair: say when it began
                self.reporter.log(2, f"transfer {flow.sender.transfer}: every page sent once")
                if isinstance(flow.source, FilePages):
                    self._send_digests(flow.sender.transfer, flow.source.finish_digests())
            elif isinstance(flow.source, FilePages) and now >= self._digests_due:
                self._send_digests(flow.sender.transfer, flow.source.take_digests())
                self._digests_due = now + DIGESTS_EVERY
            # Measured from after the step: sleeping as long as the step took would halve
            # the send rate.
            after = time.monotonic()
            wait = min(wait, flow.sender.next_wakeup(after) - after)
        return wait

    def _send_digests(self, transfer: int, digests: list[tuple[int, bytes]]) -> None:
        """The digests of files just read to the end, each to the live targets that want
        that file."""
        if not digests:
            return
        for t in self.targets:
            if not t.alive or t.needs is None:
                continue
            bits = t.needs.objects
            mine = [(obj, d) for obj, d in digests if bitmap_has(bits, obj)]
            if mine:
                self._send(t, Digests(transfer, [obj for obj, _ in mine], [d for _, d in mine]))

    def _fail_laggards(self, until: Callable[[], bool], reason: str) -> None:
        for t in self.targets:
            if t.alive and not until():
                self._fail(t, reason)

    def _step(self, flow: Flow, now: float) -> None:
        assert self.batcher is not None
        sender = flow.sender
        batch = self.batcher
        dest = flow.dest
        wire = 0
        for action in sender.poll(now, budget=64, runs=True):
            if isinstance(action, SendRun):
                # The first pass, page after page: read, sealed and sent in one piece each.
                layout = sender.layout
                end = action.page + action.count - 1  # only an object's last page is short
                length = (action.count - 1) * layout.page_size + layout.page_length(
                    action.obj, end)
                payload = flow.source.read(action.obj, action.page, length)
                datagrams = encode_data_run(self.key, self.session, sender.transfer,
                                            action.seq, action.obj, action.page, payload,
                                            layout.page_size)
                batch.add_run(datagrams, layout.page_size + DATA_OVERHEAD, dest)
                wire += len(datagrams)
                self.reporter.sent(length, False)
            elif isinstance(action, SendPage):
                length = sender.layout.page_length(action.obj, action.page)
                payload = flow.source.read(action.obj, action.page, length)
                datagram = encode_data(self.key, self.session, sender.transfer, action.seq,
                                       action.obj, action.page, payload)
                batch.add(datagram, dest)
                wire += len(datagram)
                self.reporter.sent(length, action.repair)
            elif isinstance(action, SendParity):
                symbol = flow.parity.symbol(action.block, action.esi, action.due)
                datagram = encode_parity(self.key, self.session, sender.transfer, action.seq,
                                         action.block, action.esi, symbol)
                batch.add(datagram, dest)
                wire += len(datagram)
                self.reporter.sent(len(symbol), True, parity=True)
            elif isinstance(action, SendDatagram):
                batch.add(action.data, dest)
                wire += len(action.data)
            elif isinstance(action, ReceiverSatOut):
                t = self.targets[action.receiver]
                t.sat_out = True
                self.reporter.target_state(
                    t.name, f"sitting out ({action.lag:.1f} s behind); caught up afterwards")
            elif isinstance(action, ReceiverLost):
                self._fail(self.targets[action.receiver], action.reason)
        batch.flush()
        self.stats["wire_bytes"] += wire

    def _drain_feedback(self) -> None:
        assert self.sock is not None
        view = memoryview(self._buf)
        while True:
            try:
                n = self.sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            try:
                pkt = decode(view[:n], self.key, self.session)
            except DecodeError as exc:
                self.stats[f"dropped_{exc.reason.value}"] += 1
                continue
            if not isinstance(pkt, Feedback):
                self.stats["dropped_unexpected"] += 1
                continue
            self._on_feedback(pkt, time.monotonic())

    def _on_feedback(self, pkt: Feedback, now: float) -> None:
        """An authenticated FEEDBACK: to the flow that serves its receiver."""
        if pkt.transfer == self._data_transfer and 0 <= pkt.receiver < len(self.targets):
            t = self.targets[pkt.receiver]
            if pkt.received >= t.received:  # (0 in answers after it completed)
                t.seq_seen, t.received = pkt.seq_seen, pkt.received
        for flow in self.flows:
            if flow.sender.serves(pkt.receiver):
                flow.sender.receive_feedback(pkt, now)
                return

    # -- targets ----------------------------------------------------------------------------

    def _start_targets(self) -> None:
        assert self.sock is not None
        ep = self.options.endpoint
        host, port = self.sock.getsockname()[:2]
        local_only = all(t.spec.host is None for t in self.targets)
        spawned = self._spawned or [
            spawn_server(t.spec, self.options.rsh, self.options.mrsync_path) for t in self.targets
        ]
        for t, proc in zip(self.targets, spawned, strict=True):
            if isinstance(proc, OSError):
                argv = server_command(t.spec, self.options.rsh, self.options.mrsync_path)
                self._fail(t, f"cannot run {argv[0]}: {proc.strerror}")
                continue
            t.proc = proc
            assert t.proc.stdout is not None and t.proc.stderr is not None
            assert t.proc.stdin is not None
            os.set_blocking(t.proc.stdout.fileno(), False)
            os.set_blocking(t.proc.stderr.fileno(), False)
            os.set_blocking(t.proc.stdin.fileno(), False)
            self.selector.register(t.proc.stdout, selectors.EVENT_READ, t)
            self.selector.register(t.proc.stderr, selectors.EVENT_READ, ("stderr", t))
            self._send(
                t,
                Hello(
                    version=PROTOCOL_VERSION, session=self.session, key=self.key,
                    receiver_id=t.rid, dest=os.fsencode(t.spec.path), group=ep.group,
                    port=ep.port, family=ep.family,
                    # Local receivers join on loopback; remote ones on whatever interface
                    # their route to us goes through.
                    interface=ep.interface if local_only or t.spec.host is None else "",
                    feedback_host=host, feedback_port=port, page_size=self.page_size,
                    block_pages=self.block_pages, fec=self.fec,
                    report_every=self.report_every, max_datagram=self.max_datagram,
                    verbose=self.options.verbose, options=self.options.sync,
                ),
            )

    def progress_view(self) -> list[TargetView]:
        """Where every target stands, for the live display (called a few times a second)."""
        serving: dict[int, tuple[Sender, int]] = {}
        if self._phase == "data":
            for flow in self.flows:
                for rid, missing in flow.sender.receiver_missing().items():
                    serving[rid] = (flow.sender, missing)
        views = []
        for t in self.targets:
            got = serving.get(t.rid)
            if got is not None and got[1] >= 0:
                t.missing = got[1]
            wanted = t.needs.size if t.needs is not None else 0
            finished = self._data_transfer in t.done or t.result is not None
            if t.failure is not None:
                state = "failed"
            elif finished and self._data_transfer:
                state = "caught up" if t.caught_up else "done"
            elif t.hello is None:
                state = "starting"
                wanted = -1
            elif t.needs is None or self._phase == "planning":
                state = "planning"
                wanted = -1
            elif t.sat_out:
                sitting = got is None or t.rid in got[0].sat_out
                state = "sitting out" if sitting else "catching up"
            elif got is not None:
                state = "repairing" if got[0].first_pass_done else "receiving"
            else:
                state = "waiting"
            if wanted < 0:
                done = 0
            elif finished:
                done = wanted
            elif t.missing >= 0 and t.wanted_pages:
                done = wanted * max(0, t.wanted_pages - t.missing) // t.wanted_pages
            else:
                done = 0
            lost = 100 * (t.seq_seen - t.received) / t.seq_seen if t.seq_seen else None
            views.append(TargetView(t.name, t.spec.host, state, wanted, done, t.missing, lost))
        return views

    def _send(self, t: Target, message: Message) -> None:
        if not t.alive or t.proc is None or t.proc.stdin is None:
            return
        t.outbox += frame(message)
        self._flush_control(t)

    def _flush_control(self, t: Target) -> None:
        """Write what the target's stdin takes now; wait for it to take the rest (selector)."""
        assert t.proc is not None and t.proc.stdin is not None
        stdin = t.proc.stdin
        try:
            while t.outbox:
                n = os.write(stdin.fileno(), t.outbox)
                del t.outbox[:n]
        except BlockingIOError:
            pass
        except OSError as exc:
            t.outbox.clear()
            self._fail(t, self._death_notice(t, f"control stream broken: {exc.strerror or exc}"))
        waiting = self._waits_to_write(t)
        if t.outbox and not waiting and t.alive:
            self.selector.register(stdin, selectors.EVENT_WRITE, ("stdin", t))
        elif (not t.outbox or not t.alive) and waiting:
            self.selector.unregister(stdin)

    def _waits_to_write(self, t: Target) -> bool:
        assert t.proc is not None and t.proc.stdin is not None
        try:
            self.selector.get_key(t.proc.stdin)
        except (KeyError, ValueError):
            return False
        return True

    def _read_stderr(self, t: Target) -> None:
        """A receiver's (or its remote shell's) stderr: kept for the failure message, shown
        at -v 2."""
        assert t.proc is not None and t.proc.stderr is not None
        try:
            data = os.read(t.proc.stderr.fileno(), 65536)
        except BlockingIOError:
            return
        if not data:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(t.proc.stderr)
            return
        for line in data.decode(errors="backslashreplace").splitlines():
            if line.strip():
                t.stderr_tail.append(line.strip())
                self.reporter.log(2, f"{t.name}: {line}")

    def _death_notice(self, t: Target, what: str) -> str:
        """Why a receiver (or its remote shell) went away, in its own last words."""
        assert t.proc is not None
        try:
            code: int | None = t.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code = None
        if t.proc.stderr is not None and not t.proc.stderr.closed:
            self._read_stderr(t)
        status = f" (exit status {code})" if code is not None else ""
        said = f": {t.stderr_tail[-1]}" if t.stderr_tail else ""
        return f"{what}{status}{said}"

    def _read_control(self, t: Target) -> None:
        assert t.proc is not None and t.proc.stdout is not None
        try:
            data = os.read(t.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        if not data:
            self.selector.unregister(t.proc.stdout)
            if t.alive and t.result is None:
                self._fail(t, self._death_notice(t, "receiver exited before finishing"))
            return
        try:
            messages = t.reader.feed(data)
        except ProtocolError as exc:
            self._fail(t, str(exc))
            return
        for message in messages:
            self._on_message(t, message)

    def _on_message(self, t: Target, message: Message) -> None:
        if isinstance(message, HelloOk):
            if message.version != PROTOCOL_VERSION:
                self._fail(t, f"speaks protocol version {message.version}; this mrsync speaks "
                              f"{PROTOCOL_VERSION}")
                return
            t.hello = message
        elif isinstance(message, Ready):
            t.ready.add(message.transfer)
        elif isinstance(message, Needs):
            t.needs = message
            self.reporter.log(1, f"{t.name}: needs {message.files} files, {message.size} bytes"
                                 f", {message.deletions} deletions")
        elif isinstance(message, TransferDone):
            t.done.add(message.transfer)
            for flow in self.flows:
                if flow.sender.transfer == message.transfer:
                    flow.sender.receiver_done(t.rid)
            if self._transfer > 1 and message.transfer == self._transfer:
                self.reporter.target_done(t.name)
        elif isinstance(message, Result):
            t.result = message
        elif isinstance(message, Failure):
            self._fail(t, message.message)
        else:
            self._fail(t, f"unexpected {type(message).__name__} on the control stream")

    def _fail(self, t: Target, reason: str) -> None:
        if t.failure is not None:
            return
        t.failure = reason
        self.reporter.target_failed(t.name, reason)
        for flow in self.flows:
            flow.sender.receiver_failed(t.rid)
        if t.proc is not None and t.proc.poll() is None:
            # Do not leave a receiver (or its remote shell) running behind a failed target.
            with contextlib.suppress(OSError):
                t.proc.kill()

    def _stop_targets(self) -> None:
        deadline = time.monotonic() + 10
        for t in self.targets:
            if t.proc is None:
                continue
            if t.proc.poll() is None:
                self._send(t, Bye())
                # What the target has not taken yet, Bye included, for a few seconds at most:
                # a target that never reads again is killed below.
                while t.outbox and t.alive and time.monotonic() < deadline:
                    assert t.proc.stdin is not None
                    select.select([], [t.proc.stdin], [], 0.05)
                    self._flush_control(t)
            if t.proc.stdin is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(t.proc.stdin)
                with contextlib.suppress(OSError):
                    t.proc.stdin.close()
        for t in self.targets:
            if t.proc is None:
                continue
            try:
                t.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                t.proc.kill()
                t.proc.wait()
                self._fail(t, "receiver did not exit; killed")
            for stream in (t.proc.stdout, t.proc.stderr):
                if stream is not None:
                    with contextlib.suppress(KeyError, ValueError):
                        self.selector.unregister(stream)
                    stream.close()
