"""Rate control: find the path's capacity from what receivers actually get, not from loss.

Multicast has no per-packet acks, and on a LAN most loss is random (a bad cable, a busy
receiver), not congestion: a sender that halves its rate on loss, as TCP-friendly schemes do
(uftp's TFMCC), runs at a fraction of the link on a lossy network. This controller, in the
manner of BBR, ignores loss entirely and paces to the *delivery rate*:

* Every receiver reports, with its progress, how many datagrams of the transfer it has
  received. Between two reports at least ``round`` apart that gives its delivery rate. Random
  loss lowers it by the loss rate only; a queue filling up at a bottleneck (the link, a switch,
  a receiver's socket buffer) caps it at the bottleneck's rate whatever is sent.
* The session's estimate is the slowest active receiver's best recent delivery rate (a windowed
  maximum, so a hiccup does not pull it down). Receivers that stall altogether are not waited
  for: the sender sits them out (see ``sender.py``).
* Startup: the pacing rate is twice the estimate, so it doubles every round while the
  estimate keeps up; after two rounds without 25 % growth the path is full (BBR waits three:
  in the simulator's drop-tail test the third round's overshoot cost more than it found).
  A startup round ends only once every receiver has a sample that began within it, so that
  no round is judged on samples of the rate before the last doubling.
  One round at 0.75 drains the queue startup built, then the rate cycles through gains 1.25
  (probe for more), 0.75 (drain what the probe queued) and six rounds of 1.0.
* Back to startup when a round's estimate comes out 20 % above the last one's: the path
  took nearly all of a 1.25 probe, so the capacity is far above the estimate. Startup had
  stopped short: receivers that were still opening their files at the start of a transfer
  delivered slowly for a few rounds, and with two flat rounds enough on the lab, one run in
  three left startup at a third of the link and took ~0.7 s of 1.25 probes to climb back
  (0.3 s of a 12 s transfer). At the link rate the estimate moves a few percent a round.
* ``cap`` (``--rate``) bounds everything.

Pure computation: times are passed in.
"""

from __future__ import annotations

from collections import deque

PROBE_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
STARTUP_GAIN = 2.0
DRAIN_GAIN = 0.75
MIN_ROUND = 0.02  # seconds: shorter rounds would measure report timing, not the path
MAX_FILTER = 10  # rounds a delivery-rate sample stays in the windowed maximum
FULL_PIPE_ROUNDS = 2  # rounds without 25 % growth that end startup
RESTART_GROWTH = 1.2  # a round's estimate this far above the last one's: back to startup
STARTUP_ROUND_LIMIT = 4  # rounds: the longest a startup round waits for fresh samples
# The pace before any delivery sample: 100 Mbit/s, the slowest Ethernet a fleet plausibly has,
# for the first round or two. At LAN round trips TCP's initial window (10 segments a round
# trip of ~1 ms) goes as fast. Starting at 5 MB/s, startup took two more rounds to reach the
# link: on the lab (8 targets, 2 % loss, the tree; interleaved runs) 7.91 s against 7.88 s
# at 10 MB/s and 7.86 s at 16 MB/s. On a slower path the first round's excess is lost and
# repaired, once; --rate caps this too.
INITIAL_RATE = 12.5e6  # bytes per second
MIN_RATE = 64 * 1024  # bytes per second: never pace to a standstill, whatever the samples say


def report_every_for(receivers: int, window: int, page_size: int = 1400) -> int:
    """How many datagrams a receiver processes between progress reports: often enough for
    the rate controller to see every round's delivery several times (128 datagrams, or 512
    KiB when pages are large: 7 ms at 200 Mbit/s), and with many receivers rarely enough that
    their reports stay a small load on the master (8 datagrams per receiver), never more than
    a quarter of the window. (Each report costs the master ~20 us of Python and the target a
    send through the network stack: at 32 datagrams they were a tenth of a target's CPU.)"""
    base = max(1, min(128, (512 * 1024) // page_size))
    many = 8 * receivers if receivers > 4 else 0
    return max(1, min(max(base, many), max(1, window // 4)))


class _Delivery:
    """One receiver's delivery-rate samples."""

    __slots__ = ("t0", "count0", "samples", "last_began")

    def __init__(self, now: float, count: int) -> None:
        self.t0 = now
        self.count0 = count
        self.last_began = -1.0  # when the interval of the latest sample began
        self.samples: deque[tuple[float, float]] = deque()  # (time, bytes per second)

    def best(self, since: float) -> float | None:
        while self.samples and self.samples[0][0] < since:
            self.samples.popleft()
        return max((rate for _, rate in self.samples), default=None)


class RateController:
    def __init__(
        self,
        *,
        now: float,
        datagram_bytes: int,
        initial_rate: float = INITIAL_RATE,
        cap: float | None = None,
    ) -> None:
        self._datagram = datagram_bytes
        self._cap = cap
        self._estimate = initial_rate / STARTUP_GAIN
        self._receivers: dict[int, _Delivery] = {}
        self._round = MIN_ROUND
        self._state = "startup"
        self._round_start = now
        self._last_estimate = 0.0
        self._flat_rounds = 0
        self._phase = 0
        self._round_estimate = 0.0  # the estimate when the last round ended
        self.rate = self._paced(STARTUP_GAIN)

    def restart(self, now: float) -> None:
        """Back to startup (the path changed: a receiver that held everyone back is gone)."""
        self._state = "startup"
        self._round_start = now
        self._flat_rounds = 0
        self._last_estimate = 0.0
        self.rate = self._paced(STARTUP_GAIN)

    def on_rtt(self, rtt: float) -> None:
        self._round = max(MIN_ROUND, rtt)

    def forget(self, receiver: int) -> None:
        """A receiver completed, failed or sat out: it no longer bounds the rate."""
        self._receivers.pop(receiver, None)

    def on_feedback(
        self, receiver: int, received: int, now: float, *, app_limited: bool = False
    ) -> None:
        """A receiver's report of the datagrams it has received so far. ``app_limited``: the
        sender had nothing to send lately, so the sample may only raise the estimate."""
        d = self._receivers.get(receiver)
        if d is None:
            self._receivers[receiver] = _Delivery(now, received)
            return
        elapsed = now - d.t0
        if elapsed < self._round or received < d.count0:
            return
        sample = (received - d.count0) * self._datagram / elapsed
        d.last_began = d.t0
        d.t0, d.count0 = now, received
        if app_limited and sample < self._estimate:
            return
        d.samples.append((now, sample))
        self._update(now)

    def _update(self, now: float) -> None:
        since = now - MAX_FILTER * self._round
        bests = [b for d in self._receivers.values() if (b := d.best(since)) is not None]
        if not bests:
            return
        self._estimate = min(bests)
        if not self._round_over(now):
            self.rate = self._paced(self._gain())
            return
        # A round has passed.
        self._round_start = now
        grew = self._estimate >= RESTART_GROWTH * self._round_estimate > 0
        self._round_estimate = self._estimate
        if self._state == "probe" and grew:
            self.restart(now)
            return
        if self._state == "startup":
            if self._estimate < 1.25 * self._last_estimate:
                self._flat_rounds += 1
                if self._flat_rounds >= FULL_PIPE_ROUNDS:
                    self._state = "drain"
            else:
                self._flat_rounds = 0
                self._last_estimate = self._estimate
        elif self._state == "drain":
            self._state = "probe"
            self._phase = 0
        else:
            self._phase = (self._phase + 1) % len(PROBE_GAINS)
        self.rate = self._paced(self._gain())

    def _round_over(self, now: float) -> bool:
        """Whether a round has passed. In startup a round also waits until every receiver
        with samples has one that began within it: a delivery sample spans a round of its
        own, so one taken across a rate increase averages the old rate with the new, and
        judged by the clock alone two such rounds looked flat and ended startup at a fifth of
        the link (measured on the lab: the link took 200 ms to fill instead of ~100). A
        receiver that stops reporting cannot hold startup: four rounds end one whatever."""
        elapsed = now - self._round_start
        if elapsed < self._round:
            return False
        if self._state != "startup" or elapsed >= STARTUP_ROUND_LIMIT * self._round:
            return True
        start = self._round_start
        return all(d.last_began >= start for d in self._receivers.values() if d.samples)

    def _gain(self) -> float:
        if self._state == "startup":
            return STARTUP_GAIN
        if self._state == "drain":
            return DRAIN_GAIN
        return PROBE_GAINS[self._phase]

    def _paced(self, gain: float) -> float:
        rate = max(gain * self._estimate, MIN_RATE)
        return min(rate, self._cap) if self._cap is not None else rate

    @property
    def state(self) -> str:
        return self._state

    @property
    def estimate(self) -> float:
        return self._estimate
