"""The master's side of one transfer, as a state machine without I/O.

What it does:

* **First pass.** Every page of the layout goes out once, in order, each datagram stamped with
  a send sequence number (``seq``) that grows with every data datagram, repairs included.
* **Flow control by window.** Receivers report the highest ``seq`` they have processed (every
  ``report_every`` datagrams, and in every answer to a poll). The sender never runs more than
  ``window`` datagrams ahead of the slowest active receiver. The window is sized to fit in a
  receiver's socket buffer, so a receiver that is slow to *process* slows the sender instead of
  overflowing its buffer, while a datagram lost on the way does not slow anything: the highest
  seq processed still advances past it. Loss is repaired, never mistaken for congestion.
* **Repair by batched NACKs.** When the first pass is done (or the window stalls) the sender
  multicasts a POLL carrying the highest seq sent. Every receiver answers with the ranges of
  global pages it still lacks, many ranges per datagram, pages of any file. Because a receiver
  answers after processing the POLL, everything sent before it has arrived or is lost, so the
  sender resends each listed page unless it was already resent after that point (``_last_sent``
  per page), and sends the union once to all. Then it polls again, until every receiver reports
  COMPLETE (on the data plane, or through the control stream via ``receiver_done``).
* **Parity.** Receivers that lose pages of a block report, per block, how many more symbols
  they need (FLAG_BLOCKS) as soon as the sender has moved past the block, and at polls. The
  sender sends, per block, the largest count any receiver asked for, as fresh repair symbols
  (``SendParity``) that serve every receiver at once (a block has at most 256 - k of them;
  past that its receivers fall back to page repair). ``fec_ratio`` adds proactive parity to
  every block as its last page goes out, for links known to be lossy. Parity goes before page
  repairs, which go before the first pass, so that receivers release a block's memory early.
* **Sitting out.** The window paces the sender to its slowest receiver, which is right for a
  receiver that is a little slower and wrong for one that stalls (a frozen process, a dying
  disk). Every seq's send time is kept; a receiver whose last processed datagram was sent more
  than ``sitout_lag`` seconds ago (default 2 s: the others have waited that long for it) sits
  out (``ReceiverSatOut``): it no longer holds the window or the end of the transfer, and the
  caller brings it up to date afterwards with a catch-up sender of its own (``repair_only``:
  no first pass, just polls and the repairs it asks for, by unicast). The last receiver still
  keeping up never sits out: there would be nobody left to go faster for.
* **Rate.** A ``RateController`` (``rate.py``) paces the sender to the delivery rate the
  receivers report, ignoring random loss; ``rate`` caps it. The window stays as a bound on
  what is in flight, so that no receiver's socket buffer can overflow whatever the estimate.
* **Silence.** A receiver that answers nothing for ``silence_timeout`` seconds while the sender
  waits on it is given up (``ReceiverLost``) so that it cannot hold the others back forever.

Time is always passed in; the caller asks ``next_wakeup`` when to call ``poll`` again.
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections import Counter
from collections.abc import Iterable

import msgspec

from mrsync.engine.fec import MAX_SYMBOLS
from mrsync.engine.layout import Layout
from mrsync.engine.rate import RateController
from mrsync.wire import FLAG_BLOCKS, FLAG_COMPLETE, DecodeError, Feedback, decode, encode_poll


class SendPage(msgspec.Struct, frozen=True, gc=False):
    """Read this page of this object and multicast it as a DATA datagram with this seq."""

    obj: int
    page: int
    seq: int
    repair: bool


class SendRun(msgspec.Struct, frozen=True, gc=False):
    """``count`` consecutive first-pass pages of one object from ``page`` on, with seqs from
    ``seq`` on: what ``count`` SendPage actions would say, in one (see ``poll(runs=True)``)."""

    obj: int
    page: int
    count: int
    seq: int


class SendParity(msgspec.Struct, frozen=True, gc=False):
    """Compute repair symbol ``esi`` of ``block`` and multicast it as PARITY with this seq."""

    block: int
    esi: int
    seq: int
    # Symbols of this block now due, this one included: the encoder computes them together
    # (its cost grows with the count, so neither one at a time nor more than needed).
    due: int = 1


class SendDatagram(msgspec.Struct, frozen=True, gc=False):
    """Multicast these ready-made bytes (a POLL)."""

    data: bytes


class ReceiverLost(msgspec.Struct, frozen=True, gc=False):
    receiver: int
    reason: str


class ReceiverSatOut(msgspec.Struct, frozen=True, gc=False):
    receiver: int
    lag: float  # seconds it was behind the sender


# Sending time that a late wakeup may make up for. On a busy host the sender's timer fires
# milliseconds late; with 2 ms of credit, 16 targets at 2 % loss on two cores lost a quarter of
# every paced round to that, the delivery rate followed, and the rate control spiralled down
# to a third of the link. 10 ms is 250 KB at 200 Mbit/s: a burst any switch port absorbs.
PACING_CREDIT = 0.010

# A transfer's unicast catch-up flows (one per target that sat out) number their datagrams
# from ranges of their own, 2**40 seqs apart, past the multicast flow's last: every DATA and
# PARITY datagram of a session then has its own (transfer, seq), the nonce of its GMAC
# (wire/packets.py), which must never come with two different messages. 2**40 datagrams are
# over a petabyte; 2**23 targets fit below 2**64.
CATCH_UP_SEQS = 1 << 40


def catch_up_first_seq(group_last_seq: int, receiver: int) -> int:
    """The seq a catch-up flow to ``receiver`` starts after (its ``first_seq``), once the
    multicast flow of the transfer has ended at ``group_last_seq``."""
    if not 0 <= group_last_seq < CATCH_UP_SEQS or not 0 <= receiver < (1 << 23) - 1:
        raise ValueError("seq or receiver id out of the catch-up numbering's range")
    return group_last_seq + (receiver + 1) * CATCH_UP_SEQS


SenderAction = SendPage | SendRun | SendParity | SendDatagram | ReceiverLost | ReceiverSatOut


class SenderStats(msgspec.Struct):
    pages_sent: int = 0  # first-pass data datagrams
    pages_resent: int = 0  # repair data datagrams
    bytes_sent: int = 0  # payload bytes, first pass
    bytes_resent: int = 0  # payload bytes, repairs
    parity_sent: int = 0  # repair symbols
    parity_bytes: int = 0
    polls_sent: int = 0
    feedback: int = 0
    dropped: Counter[str] = msgspec.field(default_factory=Counter)


class _Peer(msgspec.Struct):
    seq_seen: int = 0
    complete: bool = False
    lost: bool = False
    sat_out: bool = False
    last_heard: float = 0.0
    answered_poll: int = 0
    missing: int = -1  # pages it still lacks, -1 until it says


class Sender:
    MIN_POLL_TIMEOUT = 0.005
    # Every POLL goes out twice. A receiver that misses a poll is asked again only when the
    # poll times out (4 round trips, doubled while unanswered), and at the end of a transfer
    # the last receivers wait on exactly that. On the lab (8 targets, 2 % loss, the tree; six
    # interleaved runs each) the end of the first pass to the last target complete took
    # 59-340 ms (median 69) with one copy, 55-61 ms (median 60) with two. Two copies make a
    # lost poll 50 times rarer for one datagram more per poll; answering both does no harm
    # (the second answer asks for nothing that was not already sent after the seq it reports).
    POLL_COPIES = 2
    MAX_POLL_TIMEOUT = 1.0

    def __init__(
        self,
        *,
        transfer: int,
        layout: Layout,
        receivers: Iterable[int],
        key: bytes,
        session: int,
        window: int,
        now: float,
        rate: float | None = None,
        silence_timeout: float = 30.0,
        sitout_lag: float | None = 2.0,
        first_seq: int = 0,
        repair_only: bool = False,
        fec_ratio: float = 0.0,
        rate_control: bool = True,
        datagram_bytes: int = 1500,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least one datagram")
        self.transfer = transfer
        self.layout = layout
        self.stats = SenderStats()
        self._key = key
        self._session = session
        self._window = window
        self._cap = rate  # payload bytes per second, None = no cap
        self._rc = (
            RateController(now=now, datagram_bytes=datagram_bytes, cap=rate)
            if rate_control
            else None
        )
        self._silence_timeout = silence_timeout
        self._sitout_lag = sitout_lag
        self._peers = {rid: _Peer(last_heard=now) for rid in receivers}
        self._active = len(self._peers)  # peers neither complete nor lost
        total = layout.total_pages
        self._next_first = 0  # next global page of the first pass
        self._last_sent = array("Q", bytes(8 * total))  # seq a page was last sent with, 0 = never
        if repair_only:
            # Catch-up: the multicast transfer already sent everything (up to first_seq); only
            # what the receiver still lacks goes out, when it says so.
            self._next_first = total
            self._last_sent = array("Q", [max(first_seq, 1)]) * total
        self._queued = bytearray(total)  # 1 while a page waits in the repair heap
        self._repairs: list[int] = []  # heap of global pages to resend, lowest first
        self._fec_ratio = fec_ratio
        self._parity_due: dict[int, int] = {}  # block -> repair symbols still to send
        self._parity_heap: list[int] = []  # blocks with parity due, lowest first
        self._next_esi: dict[int, int] = {}  # block -> next fresh repair symbol id
        self._parity_seq: dict[int, int] = {}  # block -> seq of its latest repair symbol
        self._first_seq = first_seq
        self._seq = first_seq
        self._send_times = array("d")  # send time of seq first_seq + 1 + i
        self._min_seen = first_seq  # lower bound of active receivers' seq_seen (only ever rises)
        self._next_send_at = now
        self._last_progress_at = now
        self._poll = 0
        self._poll_sent_at = -math.inf
        self._poll_deadline = now  # no poll before this time
        self._poll_timeout = 0.05
        self._poll_now = False  # a poll is wanted at once (to check on a quiet receiver)
        self._poll_times: list[float] = [-math.inf]  # send time of each poll, by number
        self._unanswered_polls = 0
        self.srtt: float | None = None

    # -- events -----------------------------------------------------------------------------

    def receive_datagram(self, data: bytes | memoryview, now: float) -> None:
        """A datagram arrived on the feedback socket. Anything malformed, forged, foreign or
        stale is counted and otherwise ignored."""
        try:
            pkt = decode(data, self._key, self._session)
        except DecodeError as exc:
            self.stats.dropped[exc.reason.value] += 1
            return
        if not isinstance(pkt, Feedback):
            self.stats.dropped["unexpected"] += 1
            return
        self.receive_feedback(pkt, now)

    def receive_feedback(self, pkt: Feedback, now: float) -> None:
        """An authenticated FEEDBACK (for callers that decode once and dispatch)."""
        if pkt.transfer != self.transfer:
            self.stats.dropped["stale"] += 1
            return
        peer = self._peers.get(pkt.receiver)
        if peer is None or peer.lost:
            self.stats.dropped["unknown-receiver"] += 1
            return
        self.stats.feedback += 1
        peer.last_heard = now
        if pkt.seq_seen > peer.seq_seen:
            peer.seq_seen = min(pkt.seq_seen, self._seq)
            self._last_progress_at = now
        if self._rc is not None and not (peer.complete or peer.sat_out):
            # While the sender has nothing to send (waiting on a poll) or its window is full
            # (waiting on a slow receiver), deliveries say nothing about the path: such
            # samples would drag the estimate towards zero.
            limited = not self._has_page() or self._window_full()
            self._rc.on_feedback(pkt.receiver, pkt.received, now, app_limited=limited)
        peer.missing = pkt.missing
        if pkt.poll and pkt.poll == self._poll and peer.answered_poll != pkt.poll:
            peer.answered_poll = pkt.poll
            self._rtt_sample(now - self._poll_sent_at)
            if self._all_answered():
                # Everyone answered: the next poll may follow as soon as repairs are out.
                self._unanswered_polls = 0
                self._poll_deadline = min(self._poll_deadline, now + self._min_poll_gap())
        if pkt.flags & FLAG_COMPLETE:
            self._settle(peer, complete=True)
        if not peer.sat_out:  # its catch-up serves it; the group is not made to wait
            if pkt.flags & FLAG_BLOCKS:
                self._queue_parity(pkt.ranges, peer.seq_seen)
            else:
                self._queue_repairs(pkt.ranges, peer.seq_seen)

    def receiver_done(self, receiver: int) -> None:
        """The control stream says this receiver has the whole transfer."""
        peer = self._peers.get(receiver)
        if peer is not None:
            self._settle(peer, complete=True)

    def receiver_failed(self, receiver: int) -> None:
        """The control stream says this receiver is gone; stop waiting for it."""
        peer = self._peers.get(receiver)
        if peer is not None:
            self._settle(peer, complete=False)

    # -- queries ----------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._active == 0

    def serves(self, receiver: int) -> bool:
        return receiver in self._peers

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def sat_out(self) -> list[int]:
        return [rid for rid, p in self._peers.items() if p.sat_out and not p.lost]

    @property
    def first_pass_done(self) -> bool:
        return self._next_first >= self.layout.total_pages

    def receiver_missing(self) -> dict[int, int]:
        """Pages each receiver last said it lacks (-1: not heard yet)."""
        return {rid: p.missing for rid, p in self._peers.items()}

    def next_wakeup(self, now: float) -> float:
        """The latest time ``poll`` must be called again if nothing arrives before."""
        if self.done:
            return math.inf
        wake = now + 0.25  # housekeeping: silence checks
        if self._has_page():
            if self._window_full():
                wake = min(wake, max(self._poll_deadline, self._last_progress_at + self._stall()))
            elif self.pacing_rate is not None:
                wake = min(wake, self._next_send_at)
            else:
                wake = now
        else:
            wake = min(wake, self._poll_deadline)
        return wake

    # -- output -----------------------------------------------------------------------------

    def poll(self, now: float, budget: int = 64, *, runs: bool = False) -> list[SenderAction]:
        """What to do now: at most ``budget`` datagrams to send, and receivers given up.
        With ``runs``, consecutive first-pass pages of an object come as one ``SendRun``
        (at most ``budget`` pages), which the I/O layer can read, seal and send in one go."""
        actions: list[SenderAction] = []
        self._check_silence(now, actions)
        self._check_lag(now, actions)
        if self._poll_now and not self.done:
            self._poll_now = False
            actions.extend(self._make_poll(now))
        extra = 0  # datagrams beyond one per action (a SendRun is many)
        while len(actions) + extra < budget and not self.done:
            if not self._has_page():
                if now >= self._poll_deadline:
                    actions.extend(self._make_poll(now))
                break
            if self._window_full():
                # Stalled: if no progress report came for a while, ask for one.
                if now >= self._poll_deadline and now - self._last_progress_at >= self._stall():
                    actions.extend(self._make_poll(now))
                break
            if now < self._next_send_at:
                break
            if runs and not (self._parity_heap or self._repairs):
                run = self._next_run(now, budget - len(actions) - extra)
                if run is not None:
                    actions.append(run)
                    extra += run.count - 1
                    continue
            actions.append(self._next_page(now))
        return actions

    def _next_run(self, now: float, most: int) -> SendRun | None:
        """As many first-pass pages as ``_next_page`` would hand out one by one right now
        (window, pacing, ``most``), of one object and one block; None if fewer than two."""
        layout = self.layout
        g = self._next_first
        obj, page = layout.locate(g)
        ps = layout.page_size
        last = layout.pages_of(obj) - 1
        bp = layout.block_pages
        # Pages of the object and of the block (proactive parity is queued at a block's end).
        n = min(most, last - page + 1, (g // bp + 1) * bp - g)
        if self._window_full():
            return None
        n = min(n, self._window - (self._seq - self._min_seen))
        rate = self.pacing_rate
        next_send_at = self._next_send_at
        if rate is not None:
            # Pages whose send time has come, paced exactly as _pace paces them one by one.
            k = 0
            while k < n and now >= next_send_at:
                size = ps if page + k < last else layout.page_length(obj, last)
                next_send_at = max(next_send_at, now - PACING_CREDIT) + size / rate
                k += 1
            n = k
        if n < 2:
            return None
        self._next_send_at = next_send_at
        self._next_first = g + n
        length = n * ps if page + n - 1 < last else (n - 1) * ps + layout.page_length(obj, last)
        return SendRun(obj, page, n, self._mark_sent(g, n, length, now, repair=False))

    def _mark_sent(self, g: int, n: int, length: int, now: float, *, repair: bool) -> int:
        """Book ``n`` pages from global page ``g`` (``length`` bytes in all) as sent now:
        their seqs (the first is returned), send times and counters, and the proactive
        parity of a block whose last page this was."""
        seq = self._seq + 1
        self._seq += n
        self._last_sent[g : g + n] = array("Q", range(seq, seq + n))
        self._send_times.extend([now] * n)
        if repair:
            self.stats.pages_resent += n
            self.stats.bytes_resent += length
        else:
            self.stats.pages_sent += n
            self.stats.bytes_sent += length
            if self._fec_ratio > 0:
                layout = self.layout
                end = g + n - 1
                block = end // layout.block_pages
                k = layout.block_size(block)
                if end == block * layout.block_pages + k - 1:
                    self._add_parity(block, math.ceil(self._fec_ratio * k))
        return seq

    # -- internals --------------------------------------------------------------------------

    def _has_page(self) -> bool:
        return (
            bool(self._parity_heap)
            or bool(self._repairs)
            or self._next_first < self.layout.total_pages
        )

    def _next_page(self, now: float) -> SendPage | SendParity:
        if self._parity_heap:
            return self._next_parity(now)
        if self._repairs:
            g = heapq.heappop(self._repairs)
            self._queued[g] = 0
            repair = True
        else:
            g = self._next_first
            self._next_first += 1
            repair = False
        obj, page = self.layout.locate(g)
        length = self.layout.page_length(obj, page)
        seq = self._mark_sent(g, 1, length, now, repair=repair)
        self._pace(now, length)
        return SendPage(obj, page, seq, repair)

    @property
    def pacing_rate(self) -> float | None:
        """Payload bytes per second the sender paces to (None: unpaced)."""
        return self._rc.rate if self._rc is not None else self._cap

    def _pace(self, now: float, length: int) -> None:
        rate = self.pacing_rate
        if rate is not None:
            # Never let a long idle spell turn into a burst: at most PACING_CREDIT of credit.
            self._next_send_at = max(self._next_send_at, now - PACING_CREDIT) + length / rate

    def _next_parity(self, now: float) -> SendParity:
        block = self._parity_heap[0]
        due = self._parity_due[block]
        left = due - 1
        if left:
            self._parity_due[block] = left
        else:
            del self._parity_due[block]
            heapq.heappop(self._parity_heap)
        esi = self._next_esi.get(block, self.layout.block_size(block))
        self._next_esi[block] = esi + 1
        self._seq += 1
        self._send_times.append(now)
        self._parity_seq[block] = self._seq
        self.stats.parity_sent += 1
        self.stats.parity_bytes += self.layout.page_size
        self._pace(now, self.layout.page_size)
        return SendParity(block, esi, self._seq, due)

    def _add_parity(self, block: int, count: int) -> None:
        # A block has MAX_SYMBOLS symbols in all; when its repair symbols are spent, its
        # receivers fall back to asking page by page.
        spare = MAX_SYMBOLS - self._next_esi.get(block, self.layout.block_size(block))
        count = min(count, spare)
        if count <= 0:
            return
        due = self._parity_due.get(block)
        if due is None:
            heapq.heappush(self._parity_heap, block)
            self._parity_due[block] = count
        elif count > due:
            self._parity_due[block] = count

    def _queue_parity(self, needs: Iterable[tuple[int, int]], seq_seen: int) -> None:
        total = self.layout.total_blocks
        for block, need in needs:
            # Repair symbols for this block still on their way to that receiver: its count
            # does not include them yet, wait for its next report.
            if block < total and self._parity_seq.get(block, 0) <= seq_seen:
                self._add_parity(block, need)

    def _window_full(self) -> bool:
        if self._seq - self._min_seen < self._window:
            return False
        active = [
            p.seq_seen for p in self._peers.values() if not (p.complete or p.lost or p.sat_out)
        ]
        fresh = min(active) if active else self._seq
        if fresh > self._min_seen:
            self._min_seen = fresh
        return self._seq - self._min_seen >= self._window

    def _queue_repairs(self, ranges: Iterable[tuple[int, int]], seq_seen: int) -> None:
        total = self.layout.total_pages
        last_sent, queued, heap = self._last_sent, self._queued, self._repairs
        for start, count in ranges:
            for g in range(start, min(start + count, total)):
                # 0: not sent yet (the first pass will get there); > seq_seen: a resend is
                # still on its way to that receiver.
                if not queued[g] and 0 < last_sent[g] <= seq_seen:
                    queued[g] = 1
                    heapq.heappush(heap, g)

    def _make_poll(self, now: float) -> list[SendDatagram]:
        if self._poll and not self._all_answered():
            self._unanswered_polls += 1
        self._poll += 1
        self._poll_sent_at = now
        self._poll_times.append(now)
        backoff = min(2.0 ** min(self._unanswered_polls, 10), 64.0)
        self._poll_deadline = now + min(self._poll_timeout * backoff, self.MAX_POLL_TIMEOUT)
        self.stats.polls_sent += 1
        datagram = SendDatagram(encode_poll(self._key, self._session, self.transfer, self._poll,
                                            self._seq))
        return [datagram] * self.POLL_COPIES

    def _all_answered(self) -> bool:
        return all(
            p.answered_poll == self._poll or p.complete or p.lost or p.sat_out
            for p in self._peers.values()
        )

    def _rtt_sample(self, rtt: float) -> None:
        self.srtt = rtt if self.srtt is None else 0.875 * self.srtt + 0.125 * rtt
        if self._rc is not None:
            self._rc.on_rtt(self.srtt)
        self._poll_timeout = max(self.MIN_POLL_TIMEOUT, 4 * self.srtt)

    def _min_poll_gap(self) -> float:
        return max(0.001, self.srtt or 0.0)

    def _stall(self) -> float:
        return max(0.005, 2 * (self.srtt or 0.0))

    def _check_lag(self, now: float, actions: list[SenderAction]) -> None:
        """Sit out a receiver that is more than ``sitout_lag`` behind, but only after asking:
        progress reports are periodic, so a quiet receiver may just be between two of them.
        A POLL sent after the point it seems stuck at settles it: a live receiver answers
        (and its answer proves it has processed everything up to the poll); a stalled one
        does not within a few round trips."""
        if self._sitout_lag is None or self._active < 2:
            return
        patience = max(0.1, 4 * (self.srtt or 0.0))
        for rid, peer in self._peers.items():
            if peer.complete or peer.lost or peer.sat_out or peer.seq_seen >= self._seq:
                continue
            # When was the first datagram it has not processed yet sent?
            index = max(peer.seq_seen, self._first_seq) - self._first_seq
            stuck_since = self._send_times[index]
            lag = now - stuck_since
            if lag <= self._sitout_lag:
                continue
            # Polls sent since it got stuck that it has not answered (any poll may be lost,
            # so one unanswered poll proves nothing; three in a row do).
            unanswered = [
                t for n, t in enumerate(self._poll_times[peer.answered_poll + 1 :],
                                        peer.answered_poll + 1)
                if t > stuck_since and n <= self._poll
            ]
            if len(unanswered) < 3:
                if now - self._poll_sent_at > patience:
                    self._poll_now = True
            elif now - self._poll_sent_at > patience and self._active > 1:
                peer.sat_out = True
                self._active -= 1
                if self._rc is not None:
                    # Whatever it held back, the others may take more now: find out quickly.
                    self._rc.forget(rid)
                    self._rc.restart(now)
                actions.append(ReceiverSatOut(rid, lag))

    def _settle(self, peer: _Peer, *, complete: bool) -> None:
        if not (peer.complete or peer.lost or peer.sat_out):
            self._active -= 1
        if self._rc is not None:
            self._rc.forget(self._rid_of(peer))
        if complete:
            peer.complete = True
        else:
            peer.lost = True

    def _rid_of(self, peer: _Peer) -> int:
        return next(rid for rid, p in self._peers.items() if p is peer)

    def _check_silence(self, now: float, actions: list[SenderAction]) -> None:
        for rid, peer in self._peers.items():
            if peer.complete or peer.lost or peer.sat_out:
                continue
            if now - peer.last_heard > self._silence_timeout:
                self._settle(peer, complete=False)
                actions.append(ReceiverLost(rid, f"no answer for {self._silence_timeout:.0f} s"))
