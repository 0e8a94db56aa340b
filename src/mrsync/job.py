"""One sync: plan -> start targets -> manifest transfer -> data transfer -> report.

This is the master's thin I/O layer: it owns the processes, pipes and the UDP socket, feeds
their events to the ``Sender`` state machine and the per-target bookkeeping, and performs the
actions they return. The protocol decisions live in ``mrsync.engine``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3

from mrsync import PROTOCOL_VERSION, exitcodes
from mrsync.control import (
    Bye,
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
    frame,
    ids_from_bitmap,
)
from mrsync.engine.layout import Layout
from mrsync.engine.sender import ReceiverLost, SendDatagram, Sender, SendPage
from mrsync.io.net import IP_UDP_HEADERS, Endpoint, interface_mtu, open_sender
from mrsync.io.source import BlobPages, FilePages
from mrsync.plan.manifest import Kind, Manifest, encode_manifest
from mrsync.plan.options import SyncOptions
from mrsync.plan.scan import scan_source, source_root
from mrsync.report import Reporter
from mrsync.wire import DATA_OVERHEAD, encode_data

MANIFEST_OBJECT = 0
HANDSHAKE_TIMEOUT = 30.0  # seconds for a target to start and answer
WINDOW_BYTES = 12 * 1024 * 1024  # in flight beyond the slowest target: a third of its buffer


@dataclass
class JobOptions:
    source: str
    dests: list[str]
    endpoint: Endpoint
    ttl: int = 0
    page_size: int | None = None
    rate: float | None = None  # payload bytes per second; None = no cap
    verbose: int = 0
    progress: bool = False
    sync: SyncOptions = field(default_factory=SyncOptions)


@dataclass
class Target:
    """The master's view of one target."""

    rid: int
    name: str
    dest: str
    proc: subprocess.Popen[bytes] | None = None
    reader: FrameReader = field(default_factory=FrameReader)
    hello: HelloOk | None = None
    ready: set[int] = field(default_factory=set)
    needs: Needs | None = None
    done: set[int] = field(default_factory=set)
    result: Result | None = None
    failure: str | None = None

    @property
    def alive(self) -> bool:
        return self.failure is None


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
    to a multiple of 4 KiB when it is that large (file-system friendly writes)."""
    name = endpoint.interface if endpoint.family == socket.AF_INET6 else "lo"
    mtu = min(interface_mtu(name), 65535)
    page = mtu - IP_UDP_HEADERS[endpoint.family] - DATA_OVERHEAD
    return page - page % 4096 if page >= 8192 else page - page % 8


class Job:
    def __init__(self, options: JobOptions, reporter: Reporter) -> None:
        self.options = options
        self.reporter = reporter
        self.session = secrets.randbits(64)
        self.key = secrets.token_bytes(32)
        self.page_size = options.page_size or choose_page_size(options.endpoint)
        self.max_datagram = self.page_size + DATA_OVERHEAD
        self.window = max(16, min(1024, WINDOW_BYTES // (self.max_datagram + 512)))
        self.targets = [
            Target(rid=i, name=dest, dest=dest) for i, dest in enumerate(options.dests)
        ]
        self.selector = selectors.DefaultSelector()
        self.sock: socket.socket | None = None
        self.sender: Sender | None = None
        self._transfer = 0
        self._buf = bytearray(65536)
        self._wire_bytes = 0  # UDP payload bytes multicast to the group, all transfers

    # -- the whole job ----------------------------------------------------------------------

    def run(self) -> JobResult:
        start = time.monotonic()
        warnings: list[str] = []
        manifest = scan_source(self.options.source, warnings, options=self.options.sync)
        for w in warnings:
            self.reporter.warn(w)
        blob = encode_manifest(manifest)
        self.sock = open_sender(self.options.endpoint, ttl=self.options.ttl)
        self.selector.register(self.sock, selectors.EVENT_READ, None)
        sender_stats: dict[str, int] = {}
        union: list[int] = []
        try:
            self._start_targets()
            self._pump(lambda: all(t.hello or not t.alive for t in self.targets),
                       timeout=HANDSHAKE_TIMEOUT, what="start")
            # Transfer 1: the manifest, to every target.
            self._transfer_blob(blob, sender_stats)
            self._pump(lambda: all(t.needs or not t.alive for t in self.targets),
                       timeout=None, what="plan")
            if self.options.sync.dry_run:
                # Each target has said what it would change; nothing is sent or touched.
                for t in self.targets:
                    if t.needs is not None:
                        self.reporter.itemize(t.name, t.needs.itemized)
                return self._result(manifest, [], start, sender_stats, warnings)
            # Transfer 2: the union of what the targets lack, once, to all.
            wanted: set[int] = set()
            for t in self.targets:
                if t.alive and t.needs is not None:
                    wanted.update(ids_from_bitmap(t.needs.objects, len(manifest.entries)))
            union = sorted(i for i in wanted if manifest.entries[i].kind == Kind.FILE)
            self._transfer_files(manifest, union, sender_stats)
            self._pump(lambda: all(t.result or not t.alive for t in self.targets),
                       timeout=None, what="finish")
        finally:
            self._stop_targets()
            self.sock.close()
        return self._result(manifest, union, start, sender_stats, warnings)

    def _result(
        self,
        manifest: Manifest,
        union: list[int],
        start: float,
        sender_stats: dict[str, int],
        warnings: list[str],
    ) -> JobResult:
        return JobResult(
            targets=self.targets,
            manifest=manifest,
            union_files=len(union),
            union_bytes=sum(manifest.entries[i].size for i in union),
            elapsed=time.monotonic() - start,
            sender_stats=sender_stats,
            warnings=warnings,
            dry_run=self.options.sync.dry_run,
        )

    def _transfer_blob(self, blob: bytes, stats: dict[str, int]) -> None:
        digest = blake3.blake3(blob).digest()
        layout = Layout([(MANIFEST_OBJECT, len(blob))], self.page_size)
        start = StartTransfer(self._next_transfer(), "manifest", size=len(blob), digest=digest)
        self._run_transfer(start, layout, BlobPages(blob, self.page_size), stats, "manifest")

    def _transfer_files(self, manifest: Manifest, union: list[int], stats: dict[str, int]) -> None:
        entries = manifest.entries
        layout = Layout([(i, entries[i].size) for i in union], self.page_size)
        start = StartTransfer(self._next_transfer(), "data",
                              objects=bitmap_from_ids(union, len(entries)))
        source = FilePages(source_root(self.options.source), manifest, self.page_size)
        self.reporter.begin_data(layout.bytes_total(), [t.name for t in self.targets if t.alive])
        self._run_transfer(start, layout, source, stats, "data")
        for obj in sorted(source.short_reads):
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
        source: BlobPages | FilePages,
        stats: dict[str, int],
        what: str,
    ) -> None:
        transfer = start.transfer
        for t in self.targets:
            if t.alive:
                self._send(t, start)
        self._pump(lambda: all(transfer in t.ready or not t.alive for t in self.targets),
                   timeout=HANDSHAKE_TIMEOUT, what=what)
        sender = Sender(
            transfer=transfer,
            layout=layout,
            receivers=[t.rid for t in self.targets if t.alive],
            key=self.key,
            session=self.session,
            window=self.window,
            rate=self.options.rate,
            now=time.monotonic(),
        )
        for t in self.targets:
            if transfer in t.done:
                sender.receiver_done(t.rid)
        self.sender = sender
        try:
            self._pump(lambda: sender.done, timeout=None, what=what, source=source)
        finally:
            self.sender = None
            source.close()
        s = sender.stats
        for name, value in (
            ("pages_sent", s.pages_sent), ("pages_resent", s.pages_resent),
            ("bytes_sent", s.bytes_sent), ("bytes_resent", s.bytes_resent),
            ("polls", s.polls_sent), ("feedback", s.feedback),
        ):
            stats[name] = stats.get(name, 0) + value
        stats["wire_bytes"] = self._wire_bytes
        for reason, count in s.dropped.items():
            stats[f"dropped_{reason}"] = stats.get(f"dropped_{reason}", 0) + count

    # -- the event loop ---------------------------------------------------------------------

    def _pump(
        self,
        until: Callable[[], bool],
        *,
        timeout: float | None,
        what: str,
        source: BlobPages | FilePages | None = None,
    ) -> None:
        """Run the event loop until ``until()`` holds. With ``timeout``, targets that have not
        got there by then are failed; without, only a dead target or the sender's silence
        timeout fails one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        assert self.sock is not None
        dest = (self.options.endpoint.group, self.options.endpoint.port)
        while not until():
            now = time.monotonic()
            wait = 0.25
            sender = self.sender
            if sender is not None and source is not None:
                for action in sender.poll(now, budget=64):
                    if isinstance(action, SendPage):
                        length = sender.layout.page_length(action.obj, action.page)
                        payload = source.read(action.obj, action.page, length)
                        datagram = encode_data(self.key, self.session, sender.transfer,
                                               action.seq, action.obj, action.page, payload)
                        self.sock.sendto(datagram, dest)
                        self._wire_bytes += len(datagram)
                        self.reporter.sent(length, action.repair)
                    elif isinstance(action, SendDatagram):
                        self.sock.sendto(action.data, dest)
                        self._wire_bytes += len(action.data)
                    elif isinstance(action, ReceiverLost):
                        self._fail(self.targets[action.receiver], action.reason)
                wait = max(0.0, min(wait, sender.next_wakeup(time.monotonic()) - now))
            if deadline is not None:
                if now >= deadline:
                    for t in self.targets:
                        if t.alive and not until():
                            self._fail(t, f"no answer within {timeout:.0f} s ({what})")
                    return
                wait = min(wait, deadline - now)
            for key, _ in self.selector.select(wait):
                if key.fileobj is self.sock:
                    self._drain_feedback()
                else:
                    assert isinstance(key.data, Target)
                    self._read_control(key.data)
            self.reporter.tick()

    def _drain_feedback(self) -> None:
        assert self.sock is not None
        view = memoryview(self._buf)
        while True:
            try:
                n = self.sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            if self.sender is not None:
                self.sender.receive_datagram(view[:n], time.monotonic())

    # -- targets ----------------------------------------------------------------------------

    def _start_targets(self) -> None:
        ep = self.options.endpoint
        host, port = self.sock.getsockname()[:2] if self.sock else ("", 0)
        for t in self.targets:
            try:
                t.proc = subprocess.Popen(
                    [sys.executable, "-m", "mrsync", "--server"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    close_fds=True,
                )
            except OSError as exc:
                self._fail(t, f"cannot start receiver: {exc.strerror}")
                continue
            assert t.proc.stdout is not None
            os.set_blocking(t.proc.stdout.fileno(), False)
            self.selector.register(t.proc.stdout, selectors.EVENT_READ, t)
            self._send(
                t,
                Hello(
                    version=PROTOCOL_VERSION, session=self.session, key=self.key,
                    receiver_id=t.rid, dest=os.fsencode(t.dest), group=ep.group, port=ep.port,
                    family=ep.family, interface=ep.interface, feedback_host=host,
                    feedback_port=port, page_size=self.page_size,
                    report_every=max(1, self.window // 4), max_datagram=self.max_datagram,
                    verbose=self.options.verbose,
                    options=self.options.sync,
                ),
            )

    def _send(self, t: Target, message: Message) -> None:
        if not t.alive or t.proc is None or t.proc.stdin is None:
            return
        try:
            t.proc.stdin.write(frame(message))
            t.proc.stdin.flush()
        except OSError as exc:
            self._fail(t, f"control stream broken: {exc.strerror or exc}")

    def _read_control(self, t: Target) -> None:
        assert t.proc is not None and t.proc.stdout is not None
        try:
            data = os.read(t.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        if not data:
            self.selector.unregister(t.proc.stdout)
            if t.alive and t.result is None:
                code = t.proc.wait()
                self._fail(t, f"receiver exited (status {code}) before finishing")
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
                self._fail(t, f"speaks protocol {message.version}, we speak {PROTOCOL_VERSION}")
                return
            t.hello = message
        elif isinstance(message, Ready):
            t.ready.add(message.transfer)
        elif isinstance(message, Needs):
            t.needs = message
            self.reporter.log(1, f"{t.name}: needs {message.files} files, {message.size} bytes")
        elif isinstance(message, TransferDone):
            t.done.add(message.transfer)
            if self.sender is not None and self.sender.transfer == message.transfer:
                self.sender.receiver_done(t.rid)
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
        if self.sender is not None:
            self.sender.receiver_failed(t.rid)

    def _stop_targets(self) -> None:
        for t in self.targets:
            if t.proc is None:
                continue
            if t.proc.poll() is None:
                self._send(t, Bye())
            if t.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    t.proc.stdin.close()
        deadline = time.monotonic() + 10
        for t in self.targets:
            if t.proc is None:
                continue
            try:
                t.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                t.proc.kill()
                t.proc.wait()
                self._fail(t, "receiver did not exit; killed")
            if t.proc.stdout is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(t.proc.stdout)
                t.proc.stdout.close()
