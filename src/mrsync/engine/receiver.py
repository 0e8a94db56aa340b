"""A target's side of the data plane, as a state machine without I/O.

The control stream tells the receiver which transfer comes next, its layout and which objects
this target wants (``start_transfer``). Datagrams are then fed in raw (``receive_datagram``);
the machine authenticates them, and returns what to do: write this page, this object is whole,
send this feedback datagram, the transfer is complete.

It keeps one byte per global page (1 = wanted and still missing), so that the ranges it lacks
come out of ``bytearray.find`` at C speed even for millions of pages, and a per-object count
of missing pages so that it can say the moment a file is whole.

Parity (``fec=True``): while a block has wanted pages missing, the receiver keeps every
symbol of that block it has seen (pages it does not want included: any K symbols decode a
K-page block). As soon as the sender has moved on to a later block, it reports per block how
many more symbols it needs (FEEDBACK with FLAG_BLOCKS), so parity for a block follows within a
round trip and the block's memory is released early. When K symbols are held, the block is
decoded and the missing pages are written. Should held blocks exceed ``max_buffered`` bytes,
further blocks fall back to plain page NACKs, so memory stays bounded whatever the loss; so
does a block that parity has not fixed after ``MAX_BLOCK_REPORTS`` reports (its repair
symbols are spent, or keep getting lost).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from mrsync.engine.fec import decode_block, max_repair
from mrsync.engine.layout import Layout
from mrsync.wire import (
    FLAG_BLOCKS,
    FLAG_COMPLETE,
    FLAG_MORE,
    Data,
    DecodeError,
    Parity,
    Poll,
    decode,
    decode_data,
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
    parity: int = 0  # repair symbols received
    blocks_decoded: int = 0
    pages_decoded: int = 0  # missing pages rebuilt from parity
    polls: int = 0
    feedback_sent: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


class Receiver:
    MAX_BLOCK_REPORTS = 4  # polls that found a block still unrepaired before page repair

    def __init__(
        self,
        *,
        receiver_id: int,
        key: bytes,
        session: int,
        report_every: int,
        max_ranges: int,
        max_feedback_datagrams: int = 8,
        max_buffered: int = 64 * 1024 * 1024,
    ) -> None:
        self.receiver_id = receiver_id
        self.stats = ReceiverStats()
        self._key = key
        self._session = session
        self._report_every = max(1, report_every)
        self._max_ranges = max(1, max_ranges)
        self._max_feedback_datagrams = max_feedback_datagrams
        self._max_buffered = max_buffered
        self.transfer: int | None = None
        self.layout: Layout | None = None
        self._missing_pages = bytearray()
        self._missing_in: dict[int, int] = {}  # object -> pages still missing
        self.missing = 0
        self.seq_seen = 0
        self.received = 0  # datagrams of the current transfer that arrived
        self._reported_seq = 0
        self._finished: set[int] = set()  # transfers this receiver completed
        # parity state
        self._fec = False
        self._block_missing: dict[int, int] = {}  # block -> wanted pages missing
        self._held: dict[int, dict[int, bytes]] = {}  # block -> esi -> symbol
        self._buffered = 0  # bytes held in _held
        self._page_mode: set[int] = set()  # blocks repaired by page NACKs only
        self._reports: dict[int, int] = {}  # block -> times its need was reported
        self._current_block = -1  # highest block seen: blocks before it are fully sent
        self._objects: dict[int, tuple[int, int, int]] = {}  # obj -> first, pages, last length
        self._page = 0
        self._block_pages = 1

    def start_transfer(
        self, transfer: int, layout: Layout, wanted: Iterable[int], *, fec: bool = False
    ) -> list[ReceiverAction]:
        """Begin a new transfer; returns ``TransferComplete`` at once if nothing is wanted."""
        self.transfer = transfer
        self.layout = layout
        self.seq_seen = 0
        self.received = 0
        self._reported_seq = 0
        self._fec = fec
        self._block_missing = {}
        self._held = {}
        self._buffered = 0
        self._page_mode = set()
        self._reports = {}
        self._current_block = -1
        missing = bytearray(layout.total_pages)
        self._missing_in = {}
        bp = layout.block_pages
        for obj in wanted:
            n = layout.pages_of(obj)
            if n == 0:
                continue
            first = layout.first_page[obj]
            missing[first : first + n] = b"\x01" * n
            self._missing_in[obj] = n
            # Wanted pages per block, one block boundary at a time.
            g, end = first, first + n
            while g < end:
                block = g // bp
                upto = min(end, (block + 1) * bp)
                self._block_missing[block] = self._block_missing.get(block, 0) + upto - g
                g = upto
        self._missing_pages = missing
        self.missing = sum(self._missing_in.values())
        self._page = layout.page_size
        self._block_pages = bp
        self._objects = {}
        for o in layout.objects:
            n = layout.pages_of(o)
            if n:
                self._objects[o] = (layout.first_page[o], n, layout.page_length(o, n - 1))
        if self.missing == 0:
            return [self._complete()]
        return []

    def receive_datagram(self, data: bytes | memoryview, now: float) -> list[ReceiverAction]:
        self.stats.datagrams += 1
        view = data if isinstance(data, memoryview) and data.itemsize == 1 else memoryview(data)
        fields = decode_data(view, self._key, self._session)
        if fields is not None:  # the common case, without building a packet object
            return self._on_data(*fields)
        try:
            pkt = decode(view, self._key, self._session)
        except DecodeError as exc:
            self.stats.dropped[exc.reason.value] += 1
            return []
        if isinstance(pkt, Data):  # (decode_data takes every valid DATA: not reached)
            return self._on_data(*pkt)
        if isinstance(pkt, Parity):
            return self._on_parity(pkt)
        if isinstance(pkt, Poll):
            return self._on_poll(pkt)
        self.stats.dropped["unexpected"] += 1
        return []

    # -- data -------------------------------------------------------------------------------

    def _on_data(
        self, transfer: int, seq: int, obj: int, page: int, payload: memoryview | bytes
    ) -> list[ReceiverAction]:
        # This runs for every datagram: checks are inlined against per-object facts computed
        # once in start_transfer (first global page, page count, length of the last page).
        info = self._objects.get(obj) if transfer == self.transfer else None
        if info is None:
            self.stats.dropped["stale" if transfer != self.transfer else "bad-page"] += 1
            return []
        first, npages, last_len = info
        if page >= npages or len(payload) != (last_len if page == npages - 1 else self._page):
            self.stats.dropped["bad-page"] += 1
            return []
        layout = self.layout
        assert layout is not None
        self.received += 1
        if seq > self.seq_seen:
            self.seq_seen = seq
        actions: list[ReceiverAction] = []
        g = first + page
        block = g // self._block_pages
        if self._fec:
            if block > self._current_block:
                self._new_block(block, actions)
            if self._block_missing.get(block) and block not in self._page_mode:
                self._hold(block, g - block * self._block_pages, payload)
        if self._missing_pages[g]:
            self._got_page(obj, page, g, payload, actions)
            if self.missing == 0:
                return actions
        elif obj in self._missing_in:
            self.stats.duplicates += 1
        else:
            self.stats.unwanted += 1
        held = self._held.get(block)
        if held is not None and len(held) >= layout.block_size(block):
            # Parity came before this page, which completes the set: decode the rest.
            self._decode(block, held, actions)
            if self.missing == 0:
                return actions
        if self.missing and self.seq_seen - self._reported_seq >= self._report_every:
            # Unsolicited progress: opens the sender's window before it has to ask.
            actions.append(SendFeedback(self._feedback(0, (), 0)))
        return actions

    def _got_page(
        self, obj: int, page: int, g: int, payload: memoryview | bytes,
        actions: list[ReceiverAction],
    ) -> None:
        """A wanted page arrived (or was decoded): write it, and settle what it completes."""
        layout = self.layout
        assert layout is not None
        self._missing_pages[g] = 0
        self.missing -= 1
        self.stats.pages_written += 1
        self.stats.bytes_written += len(payload)
        actions.append(WritePage(obj, page, page * layout.page_size, payload))
        left = self._missing_in[obj] - 1
        self._missing_in[obj] = left
        if left == 0:
            actions.append(ObjectComplete(obj))
        block = g // layout.block_pages
        still = self._block_missing[block] - 1
        self._block_missing[block] = still
        if still == 0:
            self._release(block)
        if self.missing == 0:
            actions.append(SendFeedback(self._feedback(0, (), FLAG_COMPLETE)))
            actions.append(self._complete())

    # -- parity -----------------------------------------------------------------------------

    def _on_parity(self, pkt: Parity) -> list[ReceiverAction]:
        layout = self.layout
        if pkt.transfer != self.transfer or layout is None:
            self.stats.dropped["stale"] += 1
            return []
        if pkt.block >= layout.total_blocks or len(pkt.payload) != layout.page_size:
            self.stats.dropped["bad-parity"] += 1
            return []
        self.received += 1
        self.stats.parity += 1
        if pkt.seq > self.seq_seen:
            self.seq_seen = pkt.seq
        actions: list[ReceiverAction] = []
        if not self._fec:
            return actions
        block = pkt.block
        if block > self._current_block:
            self._new_block(block, actions)
        if not self._block_missing.get(block) or block in self._page_mode:
            return actions  # nothing missing here (or repaired page by page): not for us
        held = self._hold(block, pkt.esi, pkt.payload)
        if held is not None and len(held) >= layout.block_size(block):
            self._decode(block, held, actions)
        return actions

    def _hold(self, block: int, esi: int, symbol: memoryview | bytes) -> dict[int, bytes] | None:
        held = self._held.get(block)
        if held is None:
            if self._buffered >= self._max_buffered:
                self._page_mode.add(block)  # memory is spent: this block goes page by page
                return None
            held = self._held[block] = {}
        if esi not in held:
            assert self.layout is not None
            size = self.layout.page_size
            data = bytes(symbol)
            if len(data) < size:  # the short last page of an object, as the encoder saw it
                data += bytes(size - len(data))
            held[esi] = data
            self._buffered += size
        return held

    def _release(self, block: int) -> None:
        held = self._held.pop(block, None)
        if held is not None and self.layout is not None:
            self._buffered -= len(held) * self.layout.page_size

    def _decode(self, block: int, held: dict[int, bytes], actions: list[ReceiverAction]) -> None:
        layout = self.layout
        assert layout is not None
        k = layout.block_size(block)
        pages = decode_block(k, held)
        self.stats.blocks_decoded += 1
        first = block * layout.block_pages
        for g in range(first, first + k):
            if self._missing_pages[g]:
                obj, page = layout.locate(g)
                data = pages[g - first][: layout.page_length(obj, page)]
                self.stats.pages_decoded += 1
                self._got_page(obj, page, g, data, actions)
                if self.missing == 0:
                    return
        self._release(block)

    def _new_block(self, block: int, actions: list[ReceiverAction]) -> None:
        """The sender has moved on to ``block``: every block before it has been sent in full,
        so say now, once, what those blocks still need. (Polls repeat what is still needed.)"""
        self._current_block = block
        needs = self._block_needs(before=block)
        if needs:
            actions.append(SendFeedback(self._feedback(0, needs[: self._max_ranges], FLAG_BLOCKS)))

    def _block_needs(self, before: int | None = None) -> list[tuple[int, int]]:
        """(block, symbols still needed) for the blocks parity is to repair: with ``before``,
        the blocks before it not reported yet; else (a poll) every such block. A block a poll
        has found unrepaired too often, or needing more than its code can give, goes back to
        page repair."""
        assert self.layout is not None
        needs = []
        for block, held in sorted(self._held.items()):
            if before is not None and block >= before:
                break
            k = self.layout.block_size(block)
            if not self._block_missing.get(block) or len(held) >= k:
                continue
            reports = self._reports.get(block)
            if before is not None:
                if reports is not None:
                    continue  # already said; the next poll repeats it if need be
                self._reports[block] = 0
            else:
                reports = (reports or 0) + 1
                if reports > self.MAX_BLOCK_REPORTS or k - len(held) > max_repair(k):
                    self._release(block)
                    self._page_mode.add(block)
                    continue
                self._reports[block] = reports
            needs.append((block, k - len(held)))
        return needs

    # -- polls ------------------------------------------------------------------------------

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
        limit = self._max_ranges * self._max_feedback_datagrams
        ranges = self._missing_ranges(limit)
        needs = self._block_needs() if self._fec else []
        step = self._max_ranges
        chunks = [ranges[i : i + step] for i in range(0, len(ranges), step)]
        more_left = len(ranges) >= limit
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            flags = FLAG_MORE if (not last or more_left) else 0
            actions.append(SendFeedback(self._feedback(pkt.poll, chunk, flags)))
        for i in range(0, len(needs), step):
            actions.append(SendFeedback(self._feedback(pkt.poll, needs[i : i + step],
                                                       FLAG_BLOCKS)))
        if not actions:  # nothing page-wise, nothing block-wise: still answer the poll
            actions.append(SendFeedback(self._feedback(pkt.poll, (), 0)))
        return actions

    def _missing_ranges(self, limit: int) -> list[tuple[int, int]]:
        """Missing wanted pages as (start, count), except pages of blocks that parity will
        repair (those are reported per block)."""
        ranges: list[tuple[int, int]] = []
        pages = self._missing_pages
        assert self.layout is not None
        bp = self.layout.block_pages
        held = self._held
        pos = pages.find(1)
        while pos != -1 and len(ranges) < limit:
            end = pages.find(0, pos)
            if end == -1:
                end = len(pages)
            while pos < end and len(ranges) < limit:
                block = pos // bp
                upto = min(end, (block + 1) * bp, pos + _U32_MAX)
                if block not in held:
                    ranges.append((pos, upto - pos))
                pos = upto
            pos = pages.find(1, end)
        return ranges

    def _feedback(self, poll: int, ranges: Iterable[tuple[int, int]], flags: int) -> bytes:
        assert self.transfer is not None
        return self._feedback_for(self.transfer, poll, ranges, flags)

    def _feedback_for(
        self, transfer: int, poll: int, ranges: Iterable[tuple[int, int]], flags: int
    ) -> bytes:
        current = transfer == self.transfer
        if current:
            self._reported_seq = self.seq_seen
        self.stats.feedback_sent += 1
        return encode_feedback(
            self._key, self._session, transfer, self.receiver_id, poll,
            self.seq_seen if current else 0, self.missing if current else 0,
            self.received if current else 0, flags, list(ranges),
        )  # fmt: skip

    def _complete(self) -> TransferComplete:
        assert self.transfer is not None
        self._finished.add(self.transfer)
        self._held = {}
        self._buffered = 0
        return TransferComplete(self.transfer)
