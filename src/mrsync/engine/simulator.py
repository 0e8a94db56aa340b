"""A deterministic simulation of one transfer: the real sender and receiver state machines,
a virtual clock, and a virtual network with independent random loss per receiver.

It is how we check the protocol at scales this machine cannot host: every datagram is really
encoded, authenticated and decoded, only the sockets and the clock are simulated. The master's
link is modelled as a serial line of ``link_rate`` bytes per second; every receiver gets each
datagram ``latency`` seconds later unless its own coin says it is lost; feedback travels back
the same way, with the same loss.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mrsync.engine.fec import PARITY_BLOCK_PAGES, BlockEncoder, supported
from mrsync.engine.layout import Layout
from mrsync.engine.rate import report_every_for
from mrsync.engine.receiver import (
    ObjectComplete,
    Receiver,
    SendFeedback,
    TransferComplete,
    WritePage,
)
from mrsync.engine.sender import (
    ReceiverLost,
    ReceiverSatOut,
    SendDatagram,
    Sender,
    SendPage,
    SendParity,
)
from mrsync.wire import DATA_OVERHEAD, encode_data, encode_parity, max_feedback_ranges

ContentFn = Callable[[int, int], bytes]  # (object, page) -> payload bytes


@dataclass
class SimReceiverResult:
    complete: bool
    pages_written: int
    mismatched_pages: int  # pages written with bytes other than the source's
    objects_completed: int
    missing: int


@dataclass
class SimResult:
    receivers: list[SimReceiverResult]
    duration: float  # virtual seconds
    data_bytes: int  # payload bytes of the first pass
    repair_bytes: int  # payload bytes resent as pages
    parity_bytes: int  # repair symbols
    wire_bytes: int  # every byte the master put on its link, headers included
    polls: int
    feedback_datagrams: int
    lost: list[int] = field(default_factory=list)
    bottleneck_drops: int = 0

    @property
    def repair_share(self) -> float:
        """Everything sent beyond the first pass, as a share of it."""
        return (self.repair_bytes + self.parity_bytes) / self.data_bytes if self.data_bytes else 0

    @property
    def all_identical(self) -> bool:
        return all(r.complete and r.mismatched_pages == 0 for r in self.receivers)


def simulate(
    *,
    objects: Sequence[tuple[int, int]],
    content: ContentFn,
    receivers: int,
    loss: float,
    seed: int,
    page_size: int = 1400,
    window: int = 512,
    link_rate: float = 25e6,
    latency: float = 0.0005,
    wanted: Callable[[int], Sequence[int]] | None = None,
    max_time: float = 3600.0,
    fec: bool = True,
    fec_ratio: float = 0.0,
    block_pages: int | None = None,
    bottleneck_rate: float | None = None,
    queue_bytes: int = 1_250_000,
    rate_control: bool = True,
) -> SimResult:
    rng = random.Random(seed)
    key = rng.randbytes(32)
    session = rng.getrandbits(32)
    fec = fec and supported(page_size)
    if block_pages is None:
        block_pages = PARITY_BLOCK_PAGES
    layout = Layout(objects, page_size, block_pages)
    transfer = 1
    t0 = 0.0
    sender = Sender(
        transfer=transfer, layout=layout, receivers=range(receivers), key=key, session=session,
        window=window, now=t0, fec_ratio=fec_ratio, rate_control=rate_control,
        datagram_bytes=page_size + DATA_OVERHEAD,
    )
    max_ranges = max_feedback_ranges(1400)
    machines = [
        Receiver(receiver_id=i, key=key, session=session,
                 report_every=report_every_for(receivers, window, page_size),
                 max_ranges=max_ranges)
        for i in range(receivers)
    ]
    results = [SimReceiverResult(False, 0, 0, 0, 0) for _ in range(receivers)]
    all_objects = [obj for obj, _ in objects]
    for i, machine in enumerate(machines):
        want = wanted(i) if wanted else all_objects
        for started in machine.start_transfer(transfer, layout, want, fec=fec):
            if isinstance(started, TransferComplete):
                results[i].complete = True
                sender.receiver_done(i)

    # Events: (time, tiebreak, destination, datagram); destination -1 is the sender.
    events: list[tuple[float, int, int, bytes]] = []
    tiebreak = itertools.count()
    now = t0
    link_free = t0
    bottleneck_free = t0
    bottleneck_drops = 0
    wire_bytes = 0
    feedback = 0
    lost: list[int] = []

    encoders: dict[int, BlockEncoder] = {}

    def parity_symbol(block: int, esi: int, due: int) -> bytes:
        encoder = encoders.get(block)
        if encoder is None:
            k = layout.block_size(block)
            first = block * layout.block_pages
            parts = []
            for g in range(first, first + k):
                page = content(*layout.locate(g))
                parts.append(page + bytes(page_size - len(page)))
            encoder = encoders[block] = BlockEncoder(parts)
        return encoder.symbol(esi, due)

    def deliver(machine_id: int, datagram: bytes, at: float) -> None:
        nonlocal feedback
        for action in machines[machine_id].receive_datagram(datagram, at):
            if isinstance(action, WritePage):
                r = results[machine_id]
                r.pages_written += 1
                if bytes(action.data) != content(action.obj, action.page):
                    r.mismatched_pages += 1
            elif isinstance(action, ObjectComplete):
                results[machine_id].objects_completed += 1
            elif isinstance(action, SendFeedback):
                feedback += 1
                if rng.random() >= loss:
                    heapq.heappush(events, (at + latency, next(tiebreak), -1, action.data))
            elif isinstance(action, TransferComplete):
                results[machine_id].complete = True

    while not sender.done and now < max_time:
        while events and events[0][0] <= now:
            at, _, dest, datagram = heapq.heappop(events)
            if dest < 0:
                sender.receive_datagram(datagram, at)
            else:
                deliver(dest, datagram, at)
        if sender.done:
            break
        actions = sender.poll(now, budget=1) if link_free <= now else []
        if not actions:
            # Sleep until the link is free (the sender is blocked on it), the sender's own
            # timer, or the next arrival, whichever is first.
            wake = link_free if link_free > now else sender.next_wakeup(now)
            if events:
                wake = min(wake, events[0][0])
            now = wake if wake > now else now + 1e-6
            continue
        for sent in actions:
            if isinstance(sent, ReceiverLost):
                lost.append(sent.receiver)
                continue
            if isinstance(sent, ReceiverSatOut):
                continue
            if isinstance(sent, SendPage):
                datagram = encode_data(key, session, transfer, sent.seq, sent.obj, sent.page,
                                       content(sent.obj, sent.page))
            elif isinstance(sent, SendParity):
                datagram = encode_parity(key, session, transfer, sent.seq, sent.block, sent.esi,
                                         parity_symbol(sent.block, sent.esi, sent.due))
            elif isinstance(sent, SendDatagram):
                datagram = sent.data
            else:  # pragma: no cover - exhaustive
                raise AssertionError(sent)
            size = len(datagram) + 28  # IPv4 + UDP headers
            wire_bytes += size
            link_free = max(link_free, now) + size / link_rate
            arrival = link_free
            if bottleneck_rate is not None:
                # A drop-tail queue in front of a slower link (a switch port, say).
                if (bottleneck_free - arrival) * bottleneck_rate > queue_bytes:
                    bottleneck_drops += 1
                    continue
                bottleneck_free = max(bottleneck_free, arrival) + size / bottleneck_rate
                arrival = bottleneck_free
            for dest in range(receivers):
                if rng.random() >= loss:
                    heapq.heappush(events, (arrival + latency, next(tiebreak), dest, datagram))

    for i, machine in enumerate(machines):
        results[i].missing = machine.missing
    return SimResult(
        receivers=results,
        duration=now - t0,
        data_bytes=sender.stats.bytes_sent,
        repair_bytes=sender.stats.bytes_resent,
        parity_bytes=sender.stats.parity_bytes,
        wire_bytes=wire_bytes,
        polls=sender.stats.polls_sent,
        feedback_datagrams=feedback,
        lost=lost,
        bottleneck_drops=bottleneck_drops,
    )


__all__ = ["DATA_OVERHEAD", "SimReceiverResult", "SimResult", "simulate"]
