"""A target's unsolicited progress reports: frequent at the start of a transfer, where the
master's rate controller doubles its guess once per delivery sample, then ``report_every``."""

from __future__ import annotations

from array import array

import pytest

from mrsync.engine.layout import Layout
from mrsync.engine.receiver import EARLY_REPORT_FLOOR, Receiver, SendFeedback
from mrsync.speedups import speedups
from mrsync.wire import encode_data

KEY = bytes(range(32))
SESSION = 0x77
PAGE = 64
PAGES = 2048
REPORT_EVERY = 128
SLOT = 256


def _receiver() -> Receiver:
    r = Receiver(receiver_id=0, key=KEY, session=SESSION, report_every=REPORT_EVERY,
                 max_ranges=16)
    r.start_transfer(3, Layout([(0, PAGE * PAGES)], PAGE, 192), [0], fec=True)
    return r


def _datagrams() -> list[bytes]:
    return [encode_data(KEY, SESSION, 3, seq, 0, seq - 1, bytes([seq % 251 + 1]) * PAGE)
            for seq in range(1, PAGES + 1)]


def _check(report_seqs: list[int], slack: int) -> None:
    early = [s for s in report_seqs if s <= REPORT_EVERY]
    # At the start: every EARLY_REPORT_FLOOR (16) datagrams, not once in 128.
    assert len(early) >= REPORT_EVERY // (EARLY_REPORT_FLOOR + slack) - 1, report_seqs
    late = [s for s in report_seqs if s > 8 * REPORT_EVERY]
    gaps = [b - a for a, b in zip(late, late[1:], strict=False)]
    # Past 8 x report_every: back to one report per report_every datagrams.
    assert gaps and all(REPORT_EVERY <= g <= REPORT_EVERY + slack for g in gaps), gaps
    # In all, a few dozen more than report_every alone would send, not hundreds.
    assert PAGES // REPORT_EVERY < len(report_seqs) <= PAGES // REPORT_EVERY + 40


def test_reports_are_frequent_at_the_start_then_every_report_every() -> None:
    r = _receiver()
    seqs = []
    for seq, datagram in enumerate(_datagrams(), 1):
        if any(isinstance(a, SendFeedback) for a in r.receive_datagram(datagram, 0.0)):
            seqs.append(seq)
    assert r.missing == 0
    _check(seqs[:-1], slack=0)  # (the last is the COMPLETE report)


@pytest.mark.skipif(speedups is None, reason="mrsync._speedups not built")
def test_the_compiled_path_reports_early_too() -> None:
    """The batch path reports at most once per batch: with batches of 8 the early reports
    still come every 16-24 datagrams."""
    r = _receiver()
    batch = 8
    buf = bytearray(SLOT * batch)
    lengths = array("I", [0] * batch)
    seqs = []
    datagrams = _datagrams()
    for first in range(0, PAGES, batch):
        chunk = datagrams[first : first + batch]
        for i, d in enumerate(chunk):
            buf[i * SLOT : i * SLOT + len(d)] = d
            lengths[i] = len(d)
        actions = r.receive_batch(memoryview(buf), SLOT, lengths, len(chunk))
        if any(isinstance(a, SendFeedback) for a in actions):
            seqs.append(first + len(chunk))
    assert r.missing == 0
    _check(seqs[:-1], slack=batch)
