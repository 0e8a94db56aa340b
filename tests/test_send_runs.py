"""The master's run path: consecutive first-pass pages handed out, sealed and sent as one.

``Sender.poll(runs=True)`` must hand out exactly the pages, seqs and send times that
``poll()`` does one page at a time, and ``encode_data_run`` must give exactly the datagrams
``encode_data`` gives page by page (compiled or not).
"""

from __future__ import annotations

import pytest

from mrsync.engine.layout import Layout
from mrsync.engine.sender import Sender, SendPage, SendParity, SendRun
from mrsync.speedups import speedups
from mrsync.wire import decode, encode_data, encode_data_run, packets

KEY = bytes(range(32))
SESSION = 77


def _pages(
    sender: Sender, runs: bool, times: list[float]
) -> tuple[list[tuple[int, int, int]], int]:
    """(obj, page, seq) of every page the sender hands out, polled at ``times``; and how
    many SendRun actions carried them."""
    out: list[tuple[int, int, int]] = []
    run_actions = 0
    for now in times:
        for action in sender.poll(now, budget=64, runs=runs):
            if isinstance(action, SendRun):
                run_actions += 1
                out += [(action.obj, action.page + k, action.seq + k)
                        for k in range(action.count)]
            elif isinstance(action, SendPage):
                out.append((action.obj, action.page, action.seq))
            elif isinstance(action, SendParity):
                out.append((-1, action.block * 1000 + action.esi, action.seq))
    return out, run_actions


@pytest.mark.parametrize("rate", [None, 3e6])
@pytest.mark.parametrize("fec_ratio", [0.0, 0.05])
def test_runs_hand_out_what_single_pages_do(rate: float | None, fec_ratio: float) -> None:
    sizes = [(0, 100_000), (3, 1), (4, 0), (7, 250_000), (9, 1_399), (11, 40_000)]
    layout = Layout(sizes, 1400, block_pages=32)

    def make() -> Sender:
        return Sender(transfer=2, layout=layout, receivers=[0, 1], key=KEY, session=SESSION,
                      window=150, now=0.0, rate=rate, rate_control=False, fec_ratio=fec_ratio,
                      sitout_lag=None)

    # Polled every 1 ms for a while: with a rate, pacing decides how many go each time; the
    # window (150, with no feedback) stops both after the same page.
    times = [i * 0.001 for i in range(400)]
    single, batched = make(), make()
    expected, no_runs = _pages(single, False, times)
    got, run_actions = _pages(batched, True, times)
    assert no_runs == 0 and run_actions >= 5  # runs really were handed out, only when asked
    assert got == expected
    assert len(got) >= 100
    assert batched.stats == single.stats
    assert list(batched._last_sent) == list(single._last_sent)
    assert list(batched._send_times) == list(single._send_times)
    assert batched._next_send_at == pytest.approx(single._next_send_at)


@pytest.mark.parametrize("compiled", [True, False])
def test_data_run_is_the_datagrams_of_its_pages(compiled: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    if compiled and speedups is None:
        pytest.skip("mrsync._speedups not built")
    if not compiled:
        monkeypatch.setattr(packets, "_speedups", None)
    page_size = 1000
    payload = bytes(range(256)) * 17  # 4,352 bytes: four full pages and a short one
    run = encode_data_run(KEY, SESSION, 5, 900, 12, 40, payload, page_size)
    expected = b"".join(
        encode_data(KEY, SESSION, 5, 900 + k, 12, 40 + k, payload[at : at + page_size])
        for k, at in enumerate(range(0, len(payload), page_size))
    )
    assert run == expected
    if compiled:  # and it was the compiled sealing that made it
        assert speedups is not None
        mac = packets.data_mac(KEY)
        assert speedups.seal_run(mac, SESSION, 5, 12, 40, 900, payload, page_size) == expected
    # And each one decodes, authentic, to its page.
    first = decode(run[: page_size + packets.DATA_OVERHEAD], KEY, SESSION)
    assert (first.transfer, first.seq, first.obj, first.page) == (5, 900, 12, 40)  # type: ignore[union-attr]
