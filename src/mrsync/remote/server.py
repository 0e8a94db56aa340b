"""``mrsync --server``: the target side. Runs with its control stream on stdin/stdout, joins the
group, and drives a ``Receiver`` state machine and a ``FileStore`` from one event loop.

Nothing but control frames may reach stdout: fd 1 is kept for the stream and Python's
``sys.stdout`` is pointed at stderr, so a stray print cannot corrupt the protocol.
"""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import socket
import sys
import time

import blake3

from mrsync import PROTOCOL_VERSION
from mrsync.control import (
    Bye,
    Digests,
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
from mrsync.control import Failure as ControlFailure
from mrsync.engine.layout import Layout
from mrsync.engine.receiver import (
    ObjectComplete,
    Receiver,
    ReceiverAction,
    SendFeedback,
    TransferComplete,
    WritePage,
    WritePages,
)
from mrsync.io.batchrecv import BatchReceiver
from mrsync.io.net import (
    Endpoint,
    address_of,
    interface_mtu,
    member_endpoint,
    open_member,
    open_unicast,
)
from mrsync.io.store import FileStore, StoreError
from mrsync.plan.compare import compare, validate_manifest
from mrsync.plan.manifest import Manifest, decode_manifest
from mrsync.wire import max_feedback_ranges

MANIFEST_OBJECT = 0
RTT_OBJECT = 0
DATA_BATCH_PAUSE = 0.002  # seconds a target waits after each batch; its feedback is that late


class _Fatal(Exception):
    pass


class TargetSession:
    def __init__(self, hello: Hello, control_out: int) -> None:
        self.hello = hello
        self._out = control_out
        if hello.interface:
            self.endpoint = Endpoint(hello.family, hello.group, hello.port, hello.interface,
                                     address_of(hello.family, hello.interface))
        else:
            self.endpoint = member_endpoint(hello.family, hello.group, hello.port,
                                            hello.feedback_host)
        self.sock, self.rcvbuf = open_member(self.endpoint)
        self.unicast = open_unicast(self.endpoint)
        self.feedback_addr: tuple[str, int] | tuple[str, int, int, int] = (
            (hello.feedback_host, hello.feedback_port)
            if hello.family == socket.AF_INET
            else (hello.feedback_host, hello.feedback_port, 0, 0)
        )
        self.machine = Receiver(
            receiver_id=hello.receiver_id,
            key=hello.key,
            session=hello.session,
            report_every=hello.report_every,
            max_ranges=max_feedback_ranges(hello.max_datagram),
        )
        self.dest = os.fsdecode(hello.dest)
        self.kind = ""
        self.manifest: Manifest | None = None
        self.manifest_size = 0
        self.manifest_digest = b""
        self.blob = bytearray()
        self.needed: list[int] = []
        self.store: FileStore | None = None
        self.deleted = 0
        self.finished = False
        self.batch: BatchReceiver | None = None
        # Digests that follow the data (Manifest.digests_follow): those that came, the files
        # whose pages are all written but whose digest has not come yet, and the data
        # transfer whose end waits for those.
        self.digests: dict[int, bytes] = {}
        self.unverified: set[int] = set()
        self.finish_waits: int | None = None

    def send(self, message: Message) -> None:
        data = frame(message)
        while data:
            n = os.write(self._out, data)
            data = data[n:]

    # -- control plane ----------------------------------------------------------------------

    def on_control(self, message: Message) -> bool:
        """Returns False when the session is over."""
        if isinstance(message, StartTransfer):
            self.start_transfer(message)
        elif isinstance(message, Digests):
            self.on_digests(message)
        elif isinstance(message, Bye):
            return False
        else:
            raise _Fatal(f"unexpected control message {type(message).__name__}")
        return True

    def start_transfer(self, msg: StartTransfer) -> None:
        page_size = self.hello.page_size
        if msg.kind == "manifest":
            self.kind = "manifest"
            self.manifest_size, self.manifest_digest = msg.size, msg.digest
            self.blob = bytearray(msg.size)
            layout = Layout([(MANIFEST_OBJECT, msg.size)], page_size, self.hello.block_pages)
            actions = self.machine.start_transfer(msg.transfer, layout, [MANIFEST_OBJECT],
                                                  fec=self.hello.fec)
        elif msg.kind == "data":
            if self.manifest is None:
                raise _Fatal("data transfer before the manifest")
            self.kind = "data"
            entries = self.manifest.entries
            union = ids_from_bitmap(msg.objects, len(entries))
            layout = Layout([(i, entries[i].size) for i in union], page_size,
                            self.hello.block_pages)
            missing = set(self.needed) - set(union)
            if missing:
                raise _Fatal(f"master will not send {len(missing)} needed files")
            actions = self.machine.start_transfer(msg.transfer, layout, self.needed,
                                                  fec=self.hello.fec)
        elif msg.kind == "rtt":
            # mrsync-rtt: pages of random bytes, each answered as it arrives (the master asked
            # for report_every=1), written nowhere: the round trip is network and process only.
            self.kind = "rtt"
            layout = Layout([(RTT_OBJECT, msg.size)], page_size, self.hello.block_pages)
            actions = self.machine.start_transfer(msg.transfer, layout, [RTT_OBJECT], fec=False)
        else:
            raise _Fatal(f"unknown transfer kind {msg.kind!r}")
        self.send(Ready(msg.transfer))
        self.perform(actions)

    # -- data plane -------------------------------------------------------------------------

    def perform(self, actions: list[ReceiverAction]) -> None:
        for action in actions:
            if isinstance(action, WritePages):
                if self.kind == "data":
                    assert self.store is not None
                    self.store.write_pages(action.obj, action.offset, action.data)
                elif self.kind == "manifest":
                    at = action.offset
                    for page in action.data:
                        self.blob[at : at + len(page)] = page
                        at += len(page)
            elif isinstance(action, WritePage):
                if self.kind == "manifest":
                    end = action.offset + len(action.data)
                    self.blob[action.offset : end] = action.data
                elif self.kind == "data":
                    assert self.store is not None
                    self.store.write(action.obj, action.offset, action.data)
            elif isinstance(action, SendFeedback):
                # A feedback datagram that cannot be sent is just loss: the master polls again.
                with contextlib.suppress(OSError):
                    self.unicast.sendto(action.data, self.feedback_addr)
            elif isinstance(action, ObjectComplete):
                if self.kind == "data":
                    self.finish_file(action.obj)
            elif isinstance(action, TransferComplete):
                if self.kind == "manifest":
                    self.plan()
                elif self.kind == "rtt":
                    self.send(TransferDone(action.transfer))
                elif self.unverified:
                    self.finish_waits = action.transfer  # until their digests come
                else:
                    self.finish(action.transfer)

    def plan(self) -> None:
        if blake3.blake3(bytes(self.blob)).digest() != self.manifest_digest:
            raise _Fatal("manifest digest mismatch")
        try:
            manifest = decode_manifest(bytes(self.blob))
            validate_manifest(manifest)
        except Exception as exc:
            raise _Fatal(f"refusing manifest: {exc}") from exc
        self.manifest = manifest
        self.blob = bytearray()
        options = self.hello.options
        needs = compare(manifest, self.dest, options)
        self.needed = sorted(needs.data)
        entries = manifest.entries
        report = Needs(
            objects=bitmap_from_ids(self.needed, len(entries)),
            files=len(self.needed),
            size=sum(entries[i].size for i in self.needed),
            deletions=len(needs.delete),
            itemized=needs.itemized if options.dry_run or self.hello.verbose >= 2 else [],
        )
        if options.dry_run:
            self.send(report)  # and touch nothing; the master ends the session
            return
        try:
            self.store = FileStore(self.dest, manifest, options=options)
            self.store.plan(needs.data, needs.keep)
            self.store.prepare()
            # Deleting before the data arrives frees space for it (rsync's --delete-before).
            self.store.delete(needs.delete)
            self.deleted = len(needs.delete)
        except (StoreError, ValueError) as exc:
            raise _Fatal(str(exc)) from exc
        self.send(report)

    def on_digests(self, msg: Digests) -> None:
        if self.manifest is None or not self.manifest.digests_follow:
            raise _Fatal("digests the manifest did not announce")
        if len(msg.files) != len(msg.digests):
            raise _Fatal("malformed Digests message")
        n = len(self.manifest.entries)
        for obj, digest in zip(msg.files, msg.digests, strict=True):
            if not 0 <= obj < n:
                raise _Fatal(f"digest for unknown file {obj}")
            self.digests[obj] = digest
            if obj in self.unverified:
                self.unverified.discard(obj)
                self.finish_file(obj)
        if self.finish_waits is not None and not self.unverified:
            transfer, self.finish_waits = self.finish_waits, None
            self.finish(transfer)

    def finish_file(self, obj: int) -> None:
        """All of a file's pages are written: put it in place once its digest is known."""
        assert self.store is not None and self.manifest is not None
        if not self.manifest.digests_follow or self.manifest.entries[obj].digest:
            self.store.finish_file(obj)
        elif obj in self.digests:
            # b"" (the master's read came up short) matches no content: the file is refused.
            self.store.finish_file(obj, self.digests[obj])
        else:
            self.unverified.add(obj)

    def finish(self, transfer: int) -> None:
        assert self.store is not None and self.manifest is not None
        entries = self.manifest.entries
        self.store.finish_tree()
        self.send(TransferDone(transfer))
        stats = self.machine.stats
        counters = {f"dropped_{k}": v for k, v in stats.dropped.items()}
        counters.update(
            parity=stats.parity,
            blocks_decoded=stats.blocks_decoded,
            pages_decoded=stats.pages_decoded,
            datagrams=stats.datagrams,
            duplicates=stats.duplicates,
            unwanted=stats.unwanted,
            polls=stats.polls,
            feedback_sent=stats.feedback_sent,
            rcvbuf=self.rcvbuf,
            receive_calls=self.batch.calls if self.batch else 0,
            # data datagrams it received, and the highest seq it saw: what it missed is the
            # difference (--stats, --json)
            received=self.machine.received,
            seq_seen=self.machine.seq_seen,
            **_cpu_ms(),
        )
        self.send(
            Result(
                files_written=sum(not self.store.is_failed(i) for i in self.needed),
                # content of the files put in place (the manifest's bytes are not counted)
                bytes_written=sum(entries[i].size for i in self.needed
                                  if not self.store.is_failed(i)),
                deleted=self.deleted,
                errors=[FileFailure(e.path, e.reason) for e in self.store.errors],
                counters=counters,
            )
        )
        self.finished = True

    def drain(self, batch: BatchReceiver) -> None:
        receive = self.machine.receive_batch
        while True:
            n = batch.receive()
            if n == 0:
                return
            actions = receive(batch.view, batch.slot, batch.lengths, n)
            if actions:
                self.perform(actions)  # before the next receive reuses the buffer
            if n < batch.slots:
                return

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        self.sock.close()
        self.unicast.close()


def _mtu(interface: str) -> int:
    try:
        return interface_mtu(interface)
    except (OSError, ValueError):
        return 0


def _cpu_ms() -> dict[str, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_user_ms": int(usage.ru_utime * 1000), "cpu_sys_ms": int(usage.ru_stime * 1000)}


def run_server() -> int:
    control_in = sys.stdin.buffer.fileno()
    control_out = os.dup(sys.stdout.buffer.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    reader = FrameReader()
    session: TargetSession | None = None

    def fail(message: str) -> int:
        with contextlib.suppress(OSError):
            os.write(control_out, frame(ControlFailure(message)))
        print(f"mrsync --server: {message}", file=sys.stderr)
        return 12

    try:
        hello = _read_hello(control_in, reader)
        if hello.version != PROTOCOL_VERSION:
            return fail(
                f"protocol version {hello.version} not supported (this side speaks "
                f"{PROTOCOL_VERSION})"
            )
        session = TargetSession(hello, control_out)
        session.send(HelloOk(PROTOCOL_VERSION, socket.gethostname(), os.getpid(),
                             session.endpoint.address, session.unicast.getsockname()[1],
                             mtu=_mtu(session.endpoint.interface)))
        return _loop(session, control_in, reader)
    except _Fatal as exc:
        return fail(str(exc))
    except ProtocolError as exc:
        return fail(str(exc))
    except Exception as exc:  # report, rather than vanish, on a bug
        import traceback  # only here: a target's start-up is paid once per target per run

        traceback.print_exc()
        return fail(f"internal error: {exc!r}")
    finally:
        if session is not None:
            session.close()


def _read_hello(fd: int, reader: FrameReader) -> Hello:
    while True:
        data = os.read(fd, 65536)
        if not data:
            raise _Fatal("control stream closed before the session began")
        messages = reader.feed(data)
        if messages:
            first = messages[0]
            if not isinstance(first, Hello) or len(messages) > 1:
                raise _Fatal("the session must begin with Hello")
            return first


def _loop(session: TargetSession, control_in: int, reader: FrameReader) -> int:
    selector = selectors.DefaultSelector()
    selector.register(control_in, selectors.EVENT_READ, "control")
    # The receiver machine takes no clock: it acts on what arrives, never on time.
    slot = min(65536, session.hello.max_datagram + 64)
    session.batch = BatchReceiver(session.sock, slot=slot)
    selector.register(session.sock, selectors.EVENT_READ, session.batch)
    selector.register(session.unicast, selectors.EVENT_READ,
                      BatchReceiver(session.unicast, slot=slot, slots=8))
    while True:
        for key, _ in selector.select(timeout=5.0):
            if key.data != "control":
                session.drain(key.data)
                if session.kind == "data" and key.data is session.batch:
                    # Let datagrams gather (the socket buffer holds seconds of them): a
                    # batch of ~40 costs little more than a batch of 5, and the wakeups saved
                    # are CPU the other processes of a busy host get. Not for mrsync-rtt,
                    # whose answers must be immediate.
                    time.sleep(DATA_BATCH_PAUSE)
                continue
            data = os.read(control_in, 65536)
            if not data:
                # The master is gone: nothing more will come. Temp files are removed on close.
                return 0 if session.finished else 12
            for message in reader.feed(data):
                if not session.on_control(message):
                    return 0
