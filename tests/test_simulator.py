"""The real state machines over a simulated lossy multicast network."""

from __future__ import annotations

import functools
import hashlib

import pytest

from mrsync.engine.layout import Layout
from mrsync.engine.simulator import simulate


def _content_fn(page_size: int, sizes: dict[int, int]):  # type: ignore[no-untyped-def]
    @functools.lru_cache(maxsize=8)  # the sender and every receiver ask for the same page
    def content(obj: int, page: int) -> bytes:
        length = min(page_size, sizes[obj] - page * page_size)
        seed = hashlib.blake2b(f"{obj}:{page}".encode(), digest_size=16).digest()
        return (seed * (length // 16 + 1))[:length]

    return content


def test_fifty_receivers_five_percent_loss_all_identical() -> None:
    page_size = 1024
    sizes = {i: 1 + (i * 7919) % 60_000 for i in range(60)}  # 60 files, 1 B .. 60 KB
    result = simulate(
        objects=list(sizes.items()), content=_content_fn(page_size, sizes), receivers=50,
        loss=0.05, seed=7, page_size=page_size, window=256,
    )
    assert result.all_identical
    assert not result.lost
    total_pages = Layout(list(sizes.items()), page_size).total_pages
    for r in result.receivers:
        assert r.missing == 0
        assert r.objects_completed == len(sizes)
        assert r.pages_written == total_pages  # each page written exactly once
    # Plain retransmission: with 50 receivers at 5% nearly every page is lost by someone, but
    # the union is sent once per round, so a few rounds suffice.
    assert result.repair_bytes < 2 * result.data_bytes
    assert result.polls < 30


def test_simulation_is_deterministic() -> None:
    sizes = {0: 300_000, 1: 5_000}
    runs = [
        simulate(objects=list(sizes.items()), content=_content_fn(1400, sizes), receivers=10,
                 loss=0.05, seed=3, page_size=1400)
        for _ in range(2)
    ]
    a, b = runs
    assert (a.duration, a.repair_bytes, a.polls, a.feedback_datagrams) == (
        b.duration, b.repair_bytes, b.polls, b.feedback_datagrams)


def test_receivers_wanting_different_files() -> None:
    sizes = {i: 10_000 + i for i in range(20)}
    result = simulate(
        objects=list(sizes.items()), content=_content_fn(1000, sizes), receivers=12, loss=0.1,
        seed=11, page_size=1000, wanted=lambda r: [o for o in sizes if o % 3 == r % 3],
    )
    assert result.all_identical
    for i, r in enumerate(result.receivers):
        assert r.objects_completed == len([o for o in sizes if o % 3 == i % 3])


def test_offsets_past_4_gib() -> None:
    """A 4.5 GiB object: pages past 2**32 bytes must land at their own offsets."""
    page_size = 1 << 20
    sizes = {3: 1000, 9: (1 << 32) + 3 * page_size + 12345}  # just past 4 GiB
    content = _content_fn(page_size, sizes)
    layout = Layout(list(sizes.items()), page_size)
    assert (layout.pages_of(9) - 1) * page_size > 2**32
    result = simulate(
        objects=list(sizes.items()), content=content, receivers=2, loss=0.02, seed=5,
        page_size=page_size, window=64, link_rate=1e9,
    )
    assert result.all_identical
    for r in result.receivers:
        assert r.pages_written == layout.total_pages


@pytest.mark.parametrize("loss", [0.0, 0.3])
def test_feedback_and_data_loss_extremes(loss: float) -> None:
    sizes = {0: 50_000}
    result = simulate(objects=list(sizes.items()), content=_content_fn(1400, sizes),
                      receivers=5, loss=loss, seed=1, page_size=1400)
    assert result.all_identical
    if loss == 0.0:
        assert result.repair_bytes == 0


def test_parity_repair_cost_follows_the_worst_receiver() -> None:
    """200 receivers at 1% independent loss: plain retransmission sends nearly every page
    again (someone lost it), parity sends about what the worst receiver of each block lost."""
    page_size = 1024
    sizes = {0: page_size * 2048 + 100}
    content = _content_fn(page_size, sizes)
    runs = {
        fec: simulate(objects=list(sizes.items()), content=content, receivers=200, loss=0.01,
                      seed=2, page_size=page_size, fec=fec)
        for fec in (False, True)
    }
    assert runs[False].all_identical and runs[True].all_identical
    assert runs[False].repair_share > 0.5
    assert runs[True].repair_share < 0.05
    assert runs[True].parity_bytes > 0


@pytest.mark.parametrize("loss", [0.0, 0.02])
def test_rate_control_finds_a_bottleneck_and_ignores_random_loss(loss: float) -> None:
    """A 25 MB/s bottleneck with a 1.25 MB drop-tail queue behind a 125 MB/s first hop: the
    sender must find it on its own (no rate given) and keep it nearly full, with and without
    2% random loss (loss is not congestion)."""
    page_size = 1416
    sizes = {0: page_size * 20_000}
    result = simulate(
        objects=list(sizes.items()), content=_content_fn(page_size, sizes), receivers=4,
        loss=loss, seed=3, page_size=page_size, window=8192, link_rate=125e6,
        bottleneck_rate=25e6,
    )
    assert result.all_identical
    goodput = result.data_bytes / result.duration
    assert goodput > 0.8 * 25e6, goodput
    # Without rate control the first hop's speed would overrun the queue all along.
    assert result.bottleneck_drops < 0.05 * 20_000


def test_rate_controller_unit() -> None:
    from mrsync.engine.rate import RateController

    rc = RateController(now=0.0, datagram_bytes=1000, initial_rate=1e6)
    t, got = 0.0, 0
    # Startup: deliveries follow the pacing rate up to a 20 MB/s bottleneck, 2% lost.
    for _ in range(200):
        t += 0.02
        delivered = min(rc.rate, 20e6) * 0.98
        got += int(delivered * 0.02 / 1000)
        rc.on_feedback(1, got, t)
    assert rc.state == "probe"
    assert 0.9 * 20e6 <= rc.estimate <= 20e6
    assert rc.rate <= 1.25 * 20e6


def test_rate_controller_climbs_back_when_startup_stopped_short() -> None:
    """Receivers still opening their files deliver slowly for the first rounds, and startup
    takes that for the path's capacity. When a probe then finds the path taking nearly all
    of it, the controller returns to startup instead of climbing by 1.25 every eight rounds:
    it is at the 20 MB/s capacity within ~15 rounds, where probing alone took over 40."""
    from mrsync.engine.rate import RateController

    rc = RateController(now=0.0, datagram_bytes=1000, initial_rate=1e6)
    t, got, at_capacity = 0.0, 0, None
    for n in range(120):
        t += 0.02
        capacity = 2e6 if n < 6 else 20e6  # a slow start, then the real path
        got += int(min(rc.rate, capacity) * 0.02 / 1000)
        rc.on_feedback(1, got, t)
        if n == 8:
            assert rc.state != "startup" or rc.estimate < 5e6  # it did stop short at first
        if at_capacity is None and rc.estimate >= 0.9 * 20e6:
            at_capacity = n
    assert at_capacity is not None and at_capacity < 30, at_capacity
    assert rc.state == "probe" and rc.rate <= 1.25 * 20e6


def test_rate_controller_holds_at_capacity() -> None:
    """At the capacity the estimate moves a few percent a round: no return to startup."""
    from mrsync.engine.rate import RateController

    rc = RateController(now=0.0, datagram_bytes=1000, initial_rate=1e6)
    t, got, startups = 0.0, 0, 0
    for n in range(400):
        t += 0.02
        jitter = 1.0 + 0.05 * ((n * 7919) % 11 - 5) / 5  # +-5 % per round
        got += int(min(rc.rate, 20e6 * jitter) * 0.02 / 1000)
        rc.on_feedback(1, got, t)
        if n > 50 and rc.state == "startup":
            startups += 1
    assert startups == 0
    assert 0.9 * 20e6 <= rc.estimate <= 1.1 * 20e6


def test_rate_controller_startup_is_not_ended_by_samples_of_the_old_rate() -> None:
    """A delivery sample spans at least a round, and receivers report at moments of their
    own: when a round ends on the clock, some receivers' latest samples still show the rate
    before the last doubling, and the estimate (the slowest receiver's) looks flat. Two such
    rounds ended startup at a fifth of the link on the lab. A startup round now also waits
    until every receiver has a sample that began within it."""
    from mrsync.engine.rate import RateController

    rc = RateController(now=0.0, datagram_bytes=1000, initial_rate=1e6)
    capacity, step = 20e6, 0.001
    phases = {0: 0, 1: 7, 2: 14, 3: 19}  # each receiver reports every 20 ms, at its own ms
    got = dict.fromkeys(phases, 0.0)
    left_startup_at = None
    for n in range(1, 1500):
        t = n * step
        for rid, phase in phases.items():
            got[rid] += min(rc.rate, capacity) * step / 1000
            if n % 20 == phase:
                rc.on_feedback(rid, int(got[rid]), t)
        if left_startup_at is None and rc.state != "startup":
            left_startup_at = rc.estimate
    assert left_startup_at is not None and left_startup_at >= 0.7 * capacity, left_startup_at
    assert 0.9 * capacity <= rc.estimate <= capacity
