"""A target's side of the data plane, as a state machine without I/O.

The control stream tells the receiver which transfer comes next, its layout and which objects
this target wants (``start_transfer``). Datagrams are then fed in raw (``receive_datagram``);
the machine authenticates them, and returns what to do: write this page, this object is whole,
send this feedback datagram, the transfer is complete.

It keeps one byte per global page (1 = wanted and still missing), so that the ranges it lacks
come out of ``bytearray.find`` at C speed even for millions of pages, and a per-object count
of missing pages so that it can say the moment a file is whole.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from mrsync.engine.layout import Layout
from mrsync.wire import (
    FLAG_COMPLETE,
    FLAG_MORE,
    Data,
    DecodeError,
    Poll,
    decode,
    encode_feedback,
)

_U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class WritePage:
    obj: int
    page: int
    offset: int
    data: memoryview | bytes  # may point into the receive buffer: consume before the next call


@dataclass(frozen=True, slots=True)
class ObjectComplete:
    obj: int


@dataclass(frozen=True, slots=True)
class SendFeedback:
    data: bytes  # unicast to the master's feedback address


@dataclass(frozen=True, slots=True)
class TransferComplete:
    transfer: int


ReceiverAction = WritePage | ObjectComplete | SendFeedback | TransferComplete


@dataclass
class ReceiverStats:
    datagrams: int = 0
    pages_written: int = 0
    bytes_written: int = 0
    duplicates: int = 0  # pages we already had (repairs meant for others)
    unwanted: int = 0  # pages of objects this target does not need
    polls: int = 0
    feedback_sent: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


class Receiver:
    def __init__(
        self,
        *,
        receiver_id: int,
        key: bytes,
        session: int,
        report_every: int,
        max_ranges: int,
        max_feedback_datagrams: int = 8,
    ) -> None:
        self.receiver_id = receiver_id
        self.stats = ReceiverStats()
        self._key = key
        self._session = session
        self._report_every = max(1, report_every)
        self._max_ranges = max(1, max_ranges)
        self._max_feedback_datagrams = max_feedback_datagrams
        self.transfer: int | None = None
        self.layout: Layout | None = None
        self._missing_pages = bytearray()
        self._missing_in: dict[int, int] = {}  # object -> pages still missing
        self.missing = 0
        self.seq_seen = 0
        self._reported_seq = 0
        self._finished: set[int] = set()  # transfers this receiver completed

    def start_transfer(
        self, transfer: int, layout: Layout, wanted: Iterable[int]
    ) -> list[ReceiverAction]:
        """Begin a new transfer; returns ``TransferComplete`` at once if nothing is wanted."""
        self.transfer = transfer
        self.layout = layout
        self.seq_seen = 0
        self._reported_seq = 0
        missing = bytearray(layout.total_pages)
        self._missing_in = {}
        for obj in wanted:
            n = layout.pages_of(obj)
            if n == 0:
                continue
            first = layout.first_page[obj]
            missing[first : first + n] = b"\x01" * n
            self._missing_in[obj] = n
        self._missing_pages = missing
        self.missing = sum(self._missing_in.values())
        if self.missing == 0:
            return [self._complete()]
        return []

    def receive_datagram(self, data: bytes | memoryview, now: float) -> list[ReceiverAction]:
        self.stats.datagrams += 1
        try:
            pkt = decode(data, self._key, self._session)
        except DecodeError as exc:
            self.stats.dropped[exc.reason.value] += 1
            return []
        if isinstance(pkt, Data):
            return self._on_data(pkt)
        if isinstance(pkt, Poll):
            return self._on_poll(pkt)
        self.stats.dropped["unexpected"] += 1
        return []

    # -- internals --------------------------------------------------------------------------

    def _on_data(self, pkt: Data) -> list[ReceiverAction]:
        layout = self.layout
        if pkt.transfer != self.transfer or layout is None:
            self.stats.dropped["stale"] += 1
            return []
        first = layout.first_page.get(pkt.obj)
        if first is None or pkt.page >= layout.pages_of(pkt.obj):
            self.stats.dropped["bad-page"] += 1
            return []
        if len(pkt.payload) != layout.page_length(pkt.obj, pkt.page):
            self.stats.dropped["bad-length"] += 1
            return []
        if pkt.seq > self.seq_seen:
            self.seq_seen = pkt.seq
        actions: list[ReceiverAction] = []
        g = first + pkt.page
        if self._missing_pages[g]:
            self._missing_pages[g] = 0
            self.missing -= 1
            self.stats.pages_written += 1
            self.stats.bytes_written += len(pkt.payload)
            actions.append(WritePage(pkt.obj, pkt.page, pkt.page * layout.page_size, pkt.payload))
            left = self._missing_in[pkt.obj] - 1
            self._missing_in[pkt.obj] = left
            if left == 0:
                actions.append(ObjectComplete(pkt.obj))
            if self.missing == 0:
                actions.append(SendFeedback(self._feedback(0, (), FLAG_COMPLETE)))
                actions.append(self._complete())
                return actions
        elif pkt.obj in self._missing_in:
            self.stats.duplicates += 1
        else:
            self.stats.unwanted += 1
        if self.missing and self.seq_seen - self._reported_seq >= self._report_every:
            # Unsolicited progress: opens the sender's window before it has to ask.
            actions.append(SendFeedback(self._feedback(0, (), 0)))
        return actions

    def _on_poll(self, pkt: Poll) -> list[ReceiverAction]:
        self.stats.polls += 1
        if pkt.transfer in self._finished:
            return [SendFeedback(self._feedback_for(pkt.transfer, pkt.poll, (), FLAG_COMPLETE))]
        if pkt.transfer != self.transfer:
            self.stats.dropped["stale"] += 1
            return []
        # Datagrams travel in order, so everything sent before this poll has been processed
        # or is lost: what we still lack up to pkt.seq is really missing.
        if pkt.seq > self.seq_seen:
            self.seq_seen = pkt.seq
        actions: list[ReceiverAction] = []
        ranges = self._missing_ranges(self._max_ranges * self._max_feedback_datagrams)
        chunks = [ranges[i : i + self._max_ranges] for i in range(0, len(ranges), self._max_ranges)]
        more_left = len(ranges) == self._max_ranges * self._max_feedback_datagrams
        for i, chunk in enumerate(chunks or [[]]):
            last = i == len(chunks) - 1 or not chunks
            flags = FLAG_MORE if (not last or more_left) else 0
            actions.append(SendFeedback(self._feedback(pkt.poll, chunk, flags)))
        return actions

    def _missing_ranges(self, limit: int) -> list[tuple[int, int]]:
        ranges: list[tuple[int, int]] = []
        pages = self._missing_pages
        pos = pages.find(1)
        while pos != -1 and len(ranges) < limit:
            end = pages.find(0, pos)
            if end == -1:
                end = len(pages)
            while pos < end and len(ranges) < limit:
                count = min(end - pos, _U32_MAX)
                ranges.append((pos, count))
                pos += count
            pos = pages.find(1, end)
        return ranges

    def _feedback(self, poll: int, ranges: Iterable[tuple[int, int]], flags: int) -> bytes:
        assert self.transfer is not None
        return self._feedback_for(self.transfer, poll, ranges, flags)

    def _feedback_for(
        self, transfer: int, poll: int, ranges: Iterable[tuple[int, int]], flags: int
    ) -> bytes:
        self._reported_seq = self.seq_seen
        self.stats.feedback_sent += 1
        seq_seen = self.seq_seen if transfer == self.transfer else 0
        missing = self.missing if transfer == self.transfer else 0
        return encode_feedback(
            self._key, self._session, transfer, self.receiver_id, poll, seq_seen, missing,
            flags, list(ranges),
        )

    def _complete(self) -> TransferComplete:
        assert self.transfer is not None
        self._finished.add(self.transfer)
        return TransferComplete(self.transfer)
