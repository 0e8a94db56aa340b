"""The master's POLLs go out twice, and a receiver that answers both copies costs nothing.

A receiver that misses a poll is asked again only when the poll times out; at the end of a
transfer the last receivers wait on exactly that. Two copies of every poll make that 50 times
rarer at 2 % loss.
"""

from __future__ import annotations

from mrsync.engine.layout import Layout
from mrsync.engine.sender import SendDatagram, Sender, SendPage, SendParity, SendRun
from mrsync.wire import FLAG_BLOCKS, Feedback, Poll, decode

KEY = bytes(range(32))
SESSION = 91


def _sender() -> tuple[Sender, list[object]]:
    """A sender whose first pass (two blocks of 8 pages) is out, and what it sent."""
    layout = Layout([(0, 16 * 100)], 100, block_pages=8)
    sender = Sender(transfer=4, layout=layout, receivers=[0, 1], key=KEY, session=SESSION,
                    window=1000, now=0.0, rate_control=False, sitout_lag=None)
    sent: list[object] = []
    for step in range(5):
        sent += sender.poll(step * 0.001, budget=64, runs=True)
    assert sender.first_pass_done
    return sender, sent


def _polls(actions: list[object]) -> list[bytes]:
    return [a.data for a in actions if isinstance(a, SendDatagram)]


def test_every_poll_goes_out_twice() -> None:
    sender, sent = _sender()
    polls = _polls(sent)
    assert len(polls) == 2 and polls[0] == polls[1]
    pkt = decode(polls[0], KEY, SESSION)
    assert isinstance(pkt, Poll) and pkt.poll == 1
    assert sender.stats.polls_sent == 1  # one poll, in two datagrams
    # Unanswered, it is asked again after the timeout: again two copies, the next number.
    later = sender.poll(1.0, budget=64)
    again = _polls(later)
    assert len(again) == 2 and again[0] == again[1]
    second = decode(again[0], KEY, SESSION)
    assert isinstance(second, Poll) and second.poll == 2


def test_answering_both_copies_sends_the_repair_once() -> None:
    sender, sent = _sender()
    last_seq = max(a.seq + a.count - 1 for a in sent if isinstance(a, SendRun))
    # Receiver 0 lacks 2 pages of block 1, receiver 1 lacks one page (page 3) of block 0;
    # each answers both copies of poll 1, once each copy arrives.
    answer0 = Feedback(4, 0, 1, last_seq, 2, 14, FLAG_BLOCKS, ((1, 2),))
    answer1 = Feedback(4, 1, 1, last_seq, 1, 15, FLAG_BLOCKS, ((0, 1),))
    repairs: list[object] = []
    now = 0.01
    for answer in (answer0, answer1, answer0, answer1):
        sender.receive_feedback(answer, now)
        repairs += sender.poll(now, budget=64)
        now += 0.0001
    parity = [(a.block, a.esi) for a in repairs if isinstance(a, SendParity)]
    assert sorted(parity) == [(0, 8), (1, 8), (1, 9)]  # what was asked, once
    assert not [a for a in repairs if isinstance(a, SendPage)]
