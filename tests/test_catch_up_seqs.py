"""The job numbers its unicast catch-up flows from ranges of their own: no GMAC nonce is reused.

DATA and PARITY datagrams carry an AES-GMAC whose nonce is the header's (transfer, seq), and a
nonce must never come with two different messages (wire/packets.py). The group flow numbers
its seqs from 1 up; each target that sat out is then caught up by a unicast flow of its own,
which must number its seqs from ``catch_up_first_seq(group's last seq, its receiver id)``.
tests/test_data_mac.py checks that function; this test checks that a real job uses it.

One real job, in this process, to three local targets over loopback multicast. Two of the
targets are stopped (SIGSTOP) just before the master sends the first datagram of the data
transfer and resumed just before it sends the first catch-up datagram: they sit out, their
socket buffers overflow (the tree is larger than a receive buffer can hold, 2 x 32 MiB of
kernel accounting, so they lose the tail of the transfer whatever the kernel), and each is
caught up by unicast. One of them already holds all files but the last, so the two catch-up
flows send different pages: flows that shared seqs would send different datagrams under one
nonce. The master's socket is wrapped so that every datagram it sends is decoded (MAC
checked) and recorded; nothing else in the job is replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import _ports, rsync_differences

from mrsync import exitcodes
from mrsync import job as job_module
from mrsync.engine.sender import CATCH_UP_SEQS, catch_up_first_seq
from mrsync.io.net import SOL_UDP, UDP_SEGMENT, loopback_endpoint, open_sender
from mrsync.job import Job, JobOptions, JobResult
from mrsync.remote.targets import TargetSpec
from mrsync.report import Reporter
from mrsync.wire import Data, DecodeError, Parity, Poll, decode

MiB = 1024 * 1024
FILES = 6
# 96 MiB in all: more than a stopped target's socket buffer can hold (SO_RCVBUF 32 MiB, which
# the kernel doubles), so that each stopped target surely loses the tail of the transfer,
# which its catch-up flow must then send. The last file alone is beyond what it can hold.
FILE_BYTES = 16 * MiB
STOPPED = (1, 2)  # receiver ids of the targets that sit out
HAS_ALL_BUT_LAST = 2  # this one already holds f0..f4 and needs only f5


@dataclass(frozen=True)
class Sent:
    """One datagram the master handed to the kernel."""

    dest: tuple[Any, ...]
    kind: str  # "data", "parity", "poll"
    transfer: int
    seq: int  # for a poll: the highest seq sent so far
    digest: bytes  # of the whole datagram


@dataclass
class Wire:
    """The master's socket, wrapped: every datagram sent through it is decoded and recorded,
    and ``on_datagram`` sees it before the kernel does. Everything else goes to the socket."""

    sock: socket.socket
    key: bytes
    session: int
    on_datagram: Any  # Callable[[Sent], None]
    sent: list[Sent] = field(default_factory=list)
    undecodable: int = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def _record(self, datagram: bytes, dest: tuple[Any, ...]) -> None:
        try:
            pkt = decode(datagram, self.key, self.session)
        except DecodeError:
            self.undecodable += 1
            return
        if isinstance(pkt, Data | Parity):
            kind = "data" if isinstance(pkt, Data) else "parity"
            seq = pkt.seq
        elif isinstance(pkt, Poll):
            kind, seq = "poll", pkt.seq
        else:
            kind, seq = type(pkt).__name__.lower(), 0
        sent = Sent(tuple(dest), kind, pkt.transfer, seq,
                    hashlib.blake2b(datagram, digest_size=16).digest())
        self.on_datagram(sent)
        self.sent.append(sent)

    def sendto(self, data: Any, *args: Any) -> int:
        self._record(bytes(data), tuple(args[-1]))
        n: int = self.sock.sendto(data, *args)
        return n

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0,
                address: Any = None) -> int:
        whole = b"".join(bytes(b) for b in buffers)
        size = len(whole)
        for level, kind, value in ancdata:
            if level == SOL_UDP and kind == UDP_SEGMENT:  # GSO: the kernel cuts it up
                size = int.from_bytes(value, "little")
        for at in range(0, len(whole), size):
            self._record(whole[at : at + size], tuple(address))
        n: int = self.sock.sendmsg(buffers, ancdata, flags, address)
        return n


@dataclass
class Run:
    job: Job
    result: JobResult
    wire: Wire
    src: Path
    dests: list[Path]
    group: tuple[str, int]
    stopped_at: int  # datagrams sent before the stop
    resumed_at: int  # and before the resumption


def _wait_stopped(pid: int) -> None:
    """SIGSTOP is asynchronous: wait until the process really is stopped."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.001)
    raise AssertionError(f"receiver {pid} did not stop")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    base = tmp_path_factory.mktemp("catchup")
    rng = random.Random(2024)
    src = base / "src"
    src.mkdir()
    for i in range(FILES):
        (src / f"f{i}").write_bytes(rng.randbytes(FILE_BYTES))
    dests = [base / f"t{i}" for i in range(3)]
    # One stopped target needs only the last file: its catch-up flow sends other pages than
    # the other stopped target's (which needs everything) would at the same seqs.
    dests[HAS_ALL_BUT_LAST].mkdir()
    for i in range(FILES - 1):
        shutil.copy2(src / f"f{i}", dests[HAS_ALL_BUT_LAST] / f"f{i}")

    port = next(_ports)
    options = JobOptions(
        source=f"{src}/", targets=[TargetSpec(None, None, str(d)) for d in dests],
        endpoint=loopback_endpoint(socket.AF_INET, None, port), sitout_lag=0.2,
    )
    job = Job(options, Reporter(verbose=0, progress=False))
    group = (options.endpoint.group, port)
    transfers: list[int] = []  # in the order their first DATA/PARITY went out
    pids: list[int] = []
    state = {"stopped_at": 0, "resumed_at": 0}  # datagrams sent before each, 0: not yet
    holder: list[Wire] = []

    def on_datagram(sent: Sent) -> None:
        if sent.kind in ("data", "parity") and sent.transfer not in transfers:
            transfers.append(sent.transfer)
        # The second transfer is the data (the first, the manifest): stop the two before
        # its first datagram leaves, so that they never keep up with it.
        if len(transfers) == 2 and not state["stopped_at"]:
            state["stopped_at"] = len(holder[0].sent)
            for rid in STOPPED:
                proc = job.targets[rid].proc
                assert proc is not None
                os.kill(proc.pid, signal.SIGSTOP)
                pids.append(proc.pid)
            for pid in pids:
                _wait_stopped(pid)
        # The first datagram to anywhere but the group opens the catch-up: resume them.
        if sent.dest[:2] != group and state["stopped_at"] and not state["resumed_at"]:
            state["resumed_at"] = len(holder[0].sent)
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    def recording_open_sender(*args: Any, **kwargs: Any) -> Any:
        wire = Wire(open_sender(*args, **kwargs), job.key, job.session, on_datagram)
        holder.append(wire)
        return wire

    started = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(job_module, "open_sender", recording_open_sender)
        try:
            result = job.run()
        finally:
            for pid in pids:  # whatever happened, leave no receiver stopped
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
    assert len(holder) == 1
    print(f"\njob: {time.monotonic() - started:.2f} s, {len(holder[0].sent)} datagrams")
    by_flow: dict[tuple[Any, ...], list[Sent]] = defaultdict(list)
    for s in holder[0].sent:
        if s.kind in ("data", "parity"):
            by_flow[(s.dest[:2], s.transfer)].append(s)
    for (dest, tr), flow in by_flow.items():
        kinds = [s.kind for s in flow]
        print(f"  transfer {tr} to {dest[0]}:{dest[1]}: {kinds.count('data')} data, "
              f"{kinds.count('parity')} parity, seqs {min(s.seq for s in flow)}.."
              f"{max(s.seq for s in flow)}")
    assert state["stopped_at"] and state["resumed_at"], state
    yield Run(job, result, holder[0], src, dests, group, **state)
    shutil.rmtree(base)  # 400 MB of trees: not left behind in pytest's kept temp dirs


def _data_transfer(run: Run) -> int:
    return max(s.transfer for s in run.wire.sent if s.kind in ("data", "parity"))


def _catch_up_dests(run: Run) -> dict[tuple[Any, ...], int]:
    """Each target's unicast address -> its receiver id."""
    out = {}
    for t in run.job.targets:
        assert t.hello is not None
        out[(t.hello.address, t.hello.data_port)] = t.rid
    return out


def _seqs_by_flow(run: Run) -> dict[tuple[tuple[Any, ...], int], list[int]]:
    """(destination, transfer) -> seqs of the DATA and PARITY datagrams sent there, in order."""
    flows: dict[tuple[tuple[Any, ...], int], list[int]] = defaultdict(list)
    for s in run.wire.sent:
        if s.kind in ("data", "parity"):
            flows[(s.dest[:2], s.transfer)].append(s.seq)
    return flows


def test_the_targets_end_identical(run: Run) -> None:
    assert run.result.exit_code() == exitcodes.OK, [t.failure for t in run.result.targets]
    for d in run.dests:
        assert rsync_differences(run.src, d) == ""
    written = []
    for t in run.result.targets:
        assert t.result is not None and not t.result.errors
        written.append(t.result.files_written)
    assert written == [FILES, FILES, 1]


def test_catch_up_flows_really_ran(run: Run) -> None:
    """(a) Not vacuous: both stopped targets sat out and were caught up by unicast flows
    that sent DATA (and maybe PARITY), while the group flow sent the data transfer."""
    assert run.wire.undecodable == 0  # every datagram the master sent is authentic
    assert 0 < run.stopped_at < run.resumed_at < len(run.wire.sent)
    targets = run.job.targets
    assert [t.sat_out for t in targets] == [False, True, True]
    assert [t.caught_up for t in targets] == [False, True, True]
    transfer = _data_transfer(run)
    flows = _seqs_by_flow(run)
    unicast = _catch_up_dests(run)
    caught_up = {unicast[dest] for dest, tr in flows if dest != run.group}
    assert caught_up == set(STOPPED), flows.keys()
    assert all(tr == transfer for dest, tr in flows if dest != run.group)
    for rid in STOPPED:
        dest = next(d for d, r in unicast.items() if r == rid)
        kinds = {s.kind for s in run.wire.sent if s.dest[:2] == dest}
        assert "data" in kinds and "poll" in kinds, (rid, kinds)
        # A stopped target's buffer could not hold the tail: much had to be caught up.
        assert len(flows[(dest, transfer)]) >= 100, (rid, len(flows[(dest, transfer)]))
    assert len(flows[(run.group, transfer)]) >= FILES * FILE_BYTES // run.job.page_size


def test_no_nonce_is_used_with_two_different_datagrams(run: Run) -> None:
    """(b) No (transfer, seq) of a DATA or PARITY datagram went out with two different
    datagrams, across the group flow and every catch-up flow of the session."""
    bodies: dict[tuple[int, int], set[bytes]] = defaultdict(set)
    where: dict[tuple[int, int], set[tuple[Any, ...]]] = defaultdict(set)
    for s in run.wire.sent:
        if s.kind in ("data", "parity"):
            bodies[(s.transfer, s.seq)].add(s.digest)
            where[(s.transfer, s.seq)].add(s.dest[:2])
    reused = {nonce: sorted(where[nonce]) for nonce, b in bodies.items() if len(b) > 1}
    assert not reused, (f"{len(reused)} nonces (transfer, seq) sealed two different "
                        f"datagrams, e.g. {sorted(reused.items())[:3]}")


def test_catch_up_seqs_start_at_their_own_ranges(run: Run) -> None:
    """(c) The group flow numbers from 1; each catch-up flow numbers from just past
    ``catch_up_first_seq(the group's last seq, its receiver id)`` and stays in that range."""
    flows = _seqs_by_flow(run)
    unicast = _catch_up_dests(run)
    group_last = {tr: max(seqs) for (dest, tr), seqs in flows.items() if dest == run.group}
    for tr, last in group_last.items():
        seqs = flows[(run.group, tr)]
        assert min(seqs) == 1 and last < CATCH_UP_SEQS, (tr, min(seqs), last)
        assert len(set(seqs)) == len(seqs), f"group flow of transfer {tr} repeats a seq"
    checked = 0
    for (dest, tr), seqs in flows.items():
        if dest == run.group:
            continue
        rid = unicast[dest]
        first = catch_up_first_seq(group_last[tr], rid)
        assert min(seqs) == first + 1, (
            f"catch-up flow to receiver {rid} (transfer {tr}) starts at seq {min(seqs)}, "
            f"not at catch_up_first_seq({group_last[tr]}, {rid}) + 1 = {first + 1}")
        assert max(seqs) <= first + CATCH_UP_SEQS, (rid, max(seqs), first)
        assert len(set(seqs)) == len(seqs), f"catch-up flow to {rid} repeats a seq"
        checked += 1
    assert checked == len(STOPPED)
