"""A target's side of the data plane, as a state machine without I/O.

The control stream tells the receiver which transfer comes next, its layout and which objects
this target wants (``start_transfer``). Datagrams are then fed in raw (``receive_datagram``);
the machine authenticates them, and returns what to do: write this page, this object is whole,
send this feedback datagram, the transfer is complete.

It keeps one byte per global page (1 = wanted and still missing), so that the ranges it lacks
come out of ``bytearray.find`` at C speed even for millions of pages, and a per-object count
of missing pages so that it can say the moment a file is whole. These, and the per-block
counts, live in flat arrays indexed by object and by block, so that the compiled batch path
(``receive_batch`` with ``mrsync._speedups``) can work on the very same state: it takes the
common DATA datagram, and hands anything else, in order, to the Python path below.

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

from array import array
from collections import Counter
from collections.abc import Iterable

import msgspec

from mrsync.engine.fec import max_repair, recover_block
from mrsync.engine.layout import Layout
from mrsync.speedups import speedups as _speedups  # the compiled batch path, or None
from mrsync.wire import (
    FLAG_BLOCKS,
    FLAG_COMPLETE,
    FLAG_MORE,
    Data,
    DecodeError,
    Parity,
    Poll,
    data_mac,
    decode,
    decode_data,
    encode_feedback,
)

_U32_MAX = 0xFFFFFFFF


class WritePage(msgspec.Struct, frozen=True, gc=False):
    obj: int
    page: int
    offset: int
    data: memoryview | bytes  # may point into the receive buffer: consume before the next call


class WritePages(msgspec.Struct, frozen=True, gc=False):
    """Consecutive pages of one object, the first at ``offset``: what the batch path finds in
    one batch, written with one call instead of an action per page."""

    obj: int
    offset: int
    data: list[memoryview]  # views into the receive buffer: consume before the next call


class ObjectComplete(msgspec.Struct, frozen=True, gc=False):
    obj: int


class SendFeedback(msgspec.Struct, frozen=True, gc=False):
    data: bytes  # unicast to the master's feedback address


class TransferComplete(msgspec.Struct, frozen=True, gc=False):
    transfer: int


ReceiverAction = WritePage | WritePages | ObjectComplete | SendFeedback | TransferComplete


class ReceiverStats(msgspec.Struct):
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
    dropped: Counter[str] = msgspec.field(default_factory=Counter)


EARLY_REPORT_FLOOR = 16  # datagrams: the most frequent progress reports (a transfer's start)


class Receiver:
    MAX_BLOCK_REPORTS = 4  # polls that found a block still unrepaired before page repair
    # A need said when the sender moved on is said again this many blocks later if the block is
    # still short (its parity was lost too, or came short): otherwise it would wait for the
    # poll at the end of the pass, and the repair of a whole pass's worth of such blocks with
    # it (measured: 1.2 s of parity after a 256 MiB pass at 2 % loss).
    RESAY_AFTER_BLOCKS = 4

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
        self._data_mac = data_mac(key)  # the compiled path's authenticator, made once
        self._session = session
        self._report_every = max(1, report_every)
        self._max_ranges = max(1, max_ranges)
        self._max_feedback_datagrams = max_feedback_datagrams
        self._max_buffered = max_buffered
        self.transfer: int | None = None
        self.layout: Layout | None = None
        self._missing_pages = bytearray()
        # Per object id (manifest index): first global page, pages, length of the last page,
        # 1 if this target wants it, its wanted pages still missing.
        self._first = array("Q")
        self._npages = array("I")
        self._last_len = array("I")
        self._wanted = bytearray()
        self._obj_missing = array("I")
        self.missing = 0
        self.seq_seen = 0
        self.received = 0  # datagrams of the current transfer that arrived
        self._reported_seq = 0
        self._finished: set[int] = set()  # transfers this receiver completed
        # parity state
        self._fec = False
        self._block_missing = array("I")  # block -> wanted pages missing
        # block -> its symbols as they arrive: [1 if parity is held][K flags][K pages]; the
        # flat layout lets the compiled path copy pages in. Parity symbols: _parity_held.
        self._held: dict[int, bytearray] = {}
        self._parity_held: dict[int, dict[int, bytes]] = {}
        self._buffered = 0  # bytes of the buffers in _held
        self._page_mode: set[int] = set()  # blocks repaired by page NACKs only
        self._reports: dict[int, int] = {}  # block -> times its need was reported
        self._said_at: dict[int, int] = {}  # block -> current block when its need was said
        self._current_block = -1  # highest block seen: blocks before it are fully sent
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
        self._held = {}
        self._parity_held = {}
        self._buffered = 0
        self._page_mode = set()
        self._reports = {}
        self._said_at = {}
        self._current_block = -1
        missing = bytearray(layout.total_pages)
        bp = layout.block_pages
        nobj = max(layout.objects, default=-1) + 1
        self._first = array("Q", bytes(8 * nobj))
        self._npages = array("I", bytes(4 * nobj))
        self._last_len = array("I", bytes(4 * nobj))
        self._wanted = bytearray(nobj)
        self._obj_missing = array("I", bytes(4 * nobj))
        self._block_missing = array("I", bytes(4 * layout.total_blocks))
        # Per-object facts, from the layout's tables directly: thousands of small files make
        # these loops a target's start of a transfer, on eight targets at once on the lab.
        ps, sizes, firsts = layout.page_size, layout.sizes, layout.first_page
        first_of, npages, last_len = self._first, self._npages, self._last_len
        for o in layout.objects:
            size = sizes[o]
            if size:
                n = -(-size // ps)
                first_of[o] = firsts[o]
                npages[o] = n
                last_len[o] = size - (n - 1) * ps
        total = 0
        wanted_flags, obj_missing = self._wanted, self._obj_missing
        block_missing = self._block_missing
        for obj in wanted:
            n = -(-sizes[obj] // ps)  # (an object outside the layout is a KeyError, as ever)
            if n == 0 or wanted_flags[obj]:
                continue
            first = first_of[obj]
            end = first + n
            missing[first:end] = b"\x01" * n
            wanted_flags[obj] = 1
            obj_missing[obj] = n
            total += n
            # Wanted pages per block, one block boundary at a time.
            g = first
            while g < end:
                block = g // bp
                upto = min(end, (block + 1) * bp)
                block_missing[block] += upto - g
                g = upto
        self.missing = total
        self._missing_pages = missing
        self._page = layout.page_size
        self._block_pages = bp
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

    def receive_batch(
        self, view: memoryview, slot: int, lengths: array[int], count: int
    ) -> list[ReceiverAction]:
        """Datagrams ``view[i*slot : i*slot + lengths[i]]`` for i < count, as received: the
        same outcome as ``receive_datagram`` on each in turn, which it is when the compiled
        path is absent. With it, runs of ordinary DATA datagrams are taken in one call, and
        the first datagram it declines goes through ``receive_datagram`` before it resumes,
        so the order of processing is the order of arrival either way."""
        fast = _speedups
        if fast is None or self.layout is None or self._report_every == 1:
            # (Reporting every datagram - mrsync-rtt answers each page - leaves nothing to
            # batch: the Python path does exactly that.)
            return self._receive_each(view, slot, lengths, 0, count)
        actions: list[ReceiverAction] = []
        runs: list[tuple[int, int, list[memoryview], int]] = []
        released: list[int] = []
        i = 0
        while i < count:
            if self.missing:
                stop, new, seq_max, received, duplicates, unwanted, new_bytes = fast.scan_data(
                    view, slot, lengths, i, count, self._data_mac, self._session,
                    self.transfer, self._page, self._block_pages, self._current_block,
                    self._first, self._npages, self._last_len, self._wanted,
                    self._missing_pages, self._obj_missing, self._block_missing,
                    self._held if self._fec else None, runs, released,
                )  # fmt: skip
                if stop > i:
                    self._took_batch(stop - i, new, seq_max, received, duplicates, unwanted,
                                     new_bytes, runs, released, actions)
                    runs.clear()
                    released.clear()
                    i = stop
                    continue
            actions.extend(self._receive_each(view, slot, lengths, i, i + 1))
            i += 1
        return actions

    def _receive_each(
        self, view: memoryview, slot: int, lengths: array[int], begin: int, end: int
    ) -> list[ReceiverAction]:
        actions: list[ReceiverAction] = []
        for i in range(begin, end):
            at = i * slot
            found = self.receive_datagram(view[at : at + lengths[i]], 0.0)
            if found:
                actions.extend(found)
        return actions

    def _took_batch(
        self, taken: int, new: int, seq_max: int, received: int, duplicates: int,
        unwanted: int, new_bytes: int, runs: list[tuple[int, int, list[memoryview], int]],
        released: list[int], actions: list[ReceiverAction],
    ) -> None:
        """Settle what the compiled path did on its own (counts, the missing map, held
        symbols) and turn the runs of new pages it found into actions, as ``_got_page``
        would."""
        stats = self.stats
        stats.datagrams += taken
        stats.duplicates += duplicates
        stats.unwanted += unwanted
        stats.pages_written += new
        stats.bytes_written += new_bytes
        self.received += received
        if seq_max > self.seq_seen:
            self.seq_seen = seq_max
        for obj, offset, pages, object_done in runs:
            actions.append(WritePages(obj, offset, pages))
            if object_done:
                actions.append(ObjectComplete(obj))
        for block in released:
            self._release(block)
        self.missing -= new
        if new and self.missing == 0:
            actions.append(SendFeedback(self._feedback(0, (), FLAG_COMPLETE)))
            actions.append(self._complete())
        elif self.missing and self.seq_seen - self._reported_seq >= self._report_interval():
            actions.append(SendFeedback(self._feedback(0, (), 0)))

    # -- data -------------------------------------------------------------------------------

    def _on_data(
        self, transfer: int, seq: int, obj: int, page: int, payload: memoryview | bytes
    ) -> list[ReceiverAction]:
        # This runs for every datagram: checks are inlined against per-object facts computed
        # once in start_transfer (first global page, page count, length of the last page).
        if transfer != self.transfer:
            self.stats.dropped["stale"] += 1
            return []
        npages = self._npages[obj] if obj < len(self._npages) else 0
        if page >= npages or len(payload) != (
            self._last_len[obj] if page == npages - 1 else self._page
        ):
            self.stats.dropped["bad-page"] += 1
            return []
        layout = self.layout
        assert layout is not None
        self.received += 1
        if seq > self.seq_seen:
            self.seq_seen = seq
        actions: list[ReceiverAction] = []
        g = self._first[obj] + page
        block = g // self._block_pages
        if self._fec:
            if block > self._current_block:
                self._new_block(block, actions)
            if self._block_missing[block] and block not in self._page_mode:
                self._hold(block, g - block * self._block_pages, payload)
        if self._missing_pages[g]:
            self._got_page(obj, page, g, payload, actions)
            if self.missing == 0:
                return actions
        elif self._wanted[obj]:
            self.stats.duplicates += 1
        else:
            self.stats.unwanted += 1
        if block in self._parity_held and self._held_count(block) >= layout.block_size(block):
            # Parity came before this page, which completes the set: decode the rest.
            self._decode(block, actions)
            if self.missing == 0:
                return actions
        if self.missing and self.seq_seen - self._reported_seq >= self._report_interval():
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
        left = self._obj_missing[obj] - 1
        self._obj_missing[obj] = left
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
        if not self._block_missing[block] or block in self._page_mode:
            return actions  # nothing missing here (or repaired page by page): not for us
        if self._hold(block, pkt.esi, pkt.payload) and (
            self._held_count(block) >= layout.block_size(block)
        ):
            self._decode(block, actions)
        return actions

    def _hold(self, block: int, esi: int, symbol: memoryview | bytes) -> bool:
        """Keep a symbol of a block that parity is to repair; False if the block goes page by
        page instead (memory is spent)."""
        held = self._held.get(block)
        if held is None:
            if self._buffered >= self._max_buffered:
                self._page_mode.add(block)  # memory is spent: this block goes page by page
                return False
            bp, size = self._block_pages, self._page
            held = self._held[block] = bytearray(1 + bp + bp * size)
            self._buffered += len(held)
        bp = self._block_pages
        assert self.layout is not None
        if esi < self.layout.block_size(block):  # a page; repair symbols come after them
            if not held[1 + esi]:
                held[1 + esi] = 1
                at = 1 + bp + esi * self._page
                # A short last page stays zero-padded, as the encoder saw it.
                held[at : at + len(symbol)] = symbol
        else:
            parity = self._parity_held.setdefault(block, {})
            if esi not in parity:
                data = bytes(symbol)
                if len(data) < self._page:
                    data += bytes(self._page - len(data))
                parity[esi] = data
                self._buffered += self._page
                held[0] = 1  # tells the compiled path to leave this block to Python
        return True

    def _held_count(self, block: int) -> int:
        held = self._held.get(block)
        if held is None:
            return 0
        return held.count(1, 1, 1 + self._block_pages) + len(self._parity_held.get(block, ()))

    def _release(self, block: int) -> None:
        held = self._held.pop(block, None)
        if held is not None:
            self._buffered -= len(held)
        parity = self._parity_held.pop(block, None)
        if parity is not None:
            self._buffered -= len(parity) * self._page

    def _decode(self, block: int, actions: list[ReceiverAction]) -> None:
        layout = self.layout
        held = self._held[block]
        assert layout is not None
        k = layout.block_size(block)
        bp, size = self._block_pages, self._page
        # The lost pages are rebuilt into the held block, next to the pages that came.
        recover_block(k, size, held, 1, 1 + bp, self._parity_held.get(block, {}))
        self.stats.blocks_decoded += 1
        first = block * layout.block_pages
        for g in range(first, first + k):
            if self._missing_pages[g]:
                obj, page = layout.locate(g)
                at = 1 + bp + (g - first) * size
                data = bytes(held[at : at + layout.page_length(obj, page)])
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
        the blocks before it not reported yet, or reported ``RESAY_AFTER_BLOCKS`` blocks ago
        and still short; else (a poll) every such block. A block a poll has found unrepaired
        too often, or needing more than its code can give, goes back to page repair."""
        assert self.layout is not None
        needs = []
        for block in sorted(self._held):
            if before is not None and block >= before:
                break
            reports = self._reports.get(block)
            if (
                before is not None
                and reports is not None
                and before - self._said_at.get(block, before) < self.RESAY_AFTER_BLOCKS
            ):
                continue  # said lately: its parity may still be on the way
            k = self.layout.block_size(block)
            count = self._held_count(block)
            if not self._block_missing[block] or count >= k:
                continue
            if before is not None:
                self._reports.setdefault(block, 0)
                self._said_at[block] = before
            else:
                reports = (reports or 0) + 1
                if reports > self.MAX_BLOCK_REPORTS or k - count > max_repair(k):
                    self._release(block)
                    self._page_mode.add(block)
                    continue
                self._reports[block] = reports
            needs.append((block, k - count))
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

    def _report_interval(self) -> int:
        """Datagrams between unsolicited progress reports: ``report_every``, and fewer at the
        start of a transfer, where the sender paces at a guess and its rate controller doubles
        the rate once per delivery sample. A sample takes two reports a round (20 ms) apart;
        at the initial rate (then 5 MB/s), 128 datagrams were 37 ms, and reports that far
        apart left the first ~70 ms of every transfer at the guess (measured on the lab: the
        link reached 200 Mbit/s 140 ms after the first datagram). An eighth of what has
        arrived keeps a few reports a round while the rate doubles, and reaches
        ``report_every`` after 8 x report_every datagrams: about 30 extra reports per receiver
        and transfer, fewer with many receivers (``report_every`` grows with them, and the
        floor with it)."""
        every = self._report_every
        if self.received >= every << 3:
            return every
        return min(every, max(EARLY_REPORT_FLOOR, every >> 3, self.received >> 3))

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
        self._parity_held = {}
        self._buffered = 0
        return TransferComplete(self.transfer)
