"""The compiled batch path of a target (mrsync._speedups) against the pure-Python receiver.

Both are fed the same datagrams - pages in order with losses, duplicates, pages this target
does not want, forged and stale datagrams, parity for the blocks with losses, polls - and must
end in the same state with the same actions: the compiled path is only allowed to be faster.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
from array import array
from typing import Any

import pytest

from mrsync.engine import receiver as receiver_module
from mrsync.engine.fec import BlockEncoder
from mrsync.engine.layout import Layout
from mrsync.engine.receiver import (
    ObjectComplete,
    Receiver,
    ReceiverAction,
    SendFeedback,
    TransferComplete,
    WritePage,
    WritePages,
)
from mrsync.io.batchrecv import BatchReceiver
from mrsync.speedups import speedups
from mrsync.wire import encode_data, encode_parity, encode_poll

KEY = bytes(range(32))
SESSION = 0x1234
PAGE = 100
SLOT = 512


def test_compiled_path_is_built_where_a_compiler_is() -> None:
    # `pip install` builds it whenever a C compiler is present: a missing module there means
    # the build broke silently, and every test below would only exercise the Python path.
    if os.environ.get("MRSYNC_PURE_PYTHON", "") not in ("", "0"):
        pytest.skip("MRSYNC_PURE_PYTHON is set: the compiled path is off on purpose")
    if shutil.which("cc") or shutil.which("gcc"):
        assert speedups is not None, "mrsync._speedups was not built (see setup.py)"
    else:  # pragma: no cover
        pytest.skip("no C compiler: the pure-Python path is the only one")


needs_speedups = pytest.mark.skipif(speedups is None, reason="mrsync._speedups not built")


def _stream(seed: int, layout: Layout, fec: bool) -> list[bytes]:
    """Every page in order, with loss, repeats, forgeries, a stale transfer, parity, polls."""
    rng = random.Random(seed)
    content: dict[int, bytes] = {}

    def page_bytes(obj: int, page: int) -> bytes:
        length = layout.page_length(obj, page)
        return bytes(rng.randrange(256) for _ in range(length))

    out: list[bytes] = []
    seq = 0
    for obj in layout.objects:
        for page in range(layout.pages_of(obj)):
            g = layout.global_page(obj, page)
            content[g] = page_bytes(obj, page)
            seq += 1
            datagram = encode_data(KEY, SESSION, 7, seq, obj, page, content[g])
            roll = rng.random()
            if roll < 0.08:
                continue  # lost
            out.append(datagram)
            if roll > 0.97:
                out.append(datagram)  # repeated
            if roll < 0.1:
                forged = bytearray(datagram)
                forged[-1] ^= 1
                out.append(bytes(forged))
                out.append(encode_data(KEY, SESSION, 6, seq, obj, page, content[g]))  # stale
            if rng.random() < 0.01:
                seq += 1
                out.append(encode_poll(KEY, SESSION, 7, seq, seq))
    if fec:
        for block in range(layout.total_blocks):
            k = layout.block_size(block)
            first = block * layout.block_pages
            pages = [content[g] + bytes(PAGE - len(content[g])) for g in range(first, first + k)]
            encoder = BlockEncoder(pages)
            for esi in range(k, k + 6):
                seq += 1
                out.append(encode_parity(KEY, SESSION, 7, seq, block, esi, encoder.symbol(esi)))
    seq += 1
    out.append(encode_poll(KEY, SESSION, 7, 999, seq))
    return out


def _summary(actions: list[ReceiverAction]) -> list[Any]:
    """Actions with payloads copied out (they point into the receive buffer)."""
    result: list[Any] = []
    for action in actions:
        if isinstance(action, WritePage):
            result.append(("write", action.obj, action.page, action.offset, bytes(action.data)))
        elif isinstance(action, WritePages):  # one entry per page, as WritePage gives them
            offset = action.offset
            for data in action.data:
                result.append(("write", action.obj, offset // PAGE, offset, bytes(data)))
                offset += len(data)
        elif isinstance(action, SendFeedback):
            result.append(("feedback", bytes(action.data)))
        elif isinstance(action, ObjectComplete | TransferComplete):
            result.append(action)
    return result


def _fresh(layout: Layout, wanted: list[int], fec: bool) -> Receiver:
    r = Receiver(receiver_id=3, key=KEY, session=SESSION, report_every=16, max_ranges=40)
    assert r.start_transfer(7, layout, wanted, fec=fec) == []
    return r


def _state(r: Receiver) -> dict[str, Any]:
    """Everything but the count of feedback datagrams sent (see below)."""
    s = r.stats
    return {
        "missing": r.missing, "received": r.received, "seq_seen": r.seq_seen,
        "missing_pages": bytes(r._missing_pages), "held": sorted(r._held),
        "datagrams": s.datagrams, "pages_written": s.pages_written,
        "bytes_written": s.bytes_written, "duplicates": s.duplicates, "unwanted": s.unwanted,
        "parity": s.parity, "blocks_decoded": s.blocks_decoded,
        "pages_decoded": s.pages_decoded, "polls": s.polls, "dropped": dict(s.dropped),
    }  # fmt: skip


@needs_speedups
@pytest.mark.parametrize("fec", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_batch_path_matches_python_path(seed: int, fec: bool) -> None:
    sizes = [(0, 2_950), (1, 37), (2, 0), (3, 12_000), (5, 499), (6, 4_000)]
    layout = Layout(sizes, PAGE, block_pages=16)
    wanted = [0, 1, 3, 6]  # 5 is someone else's: its pages are "unwanted" here
    stream = _stream(seed, layout, fec)

    one_by_one = _fresh(layout, wanted, fec)
    expected: list[Any] = []
    for datagram in stream:
        expected += _summary(one_by_one.receive_datagram(datagram, 0.0))

    batched = _fresh(layout, wanted, fec)
    got: list[Any] = []
    rng = random.Random(seed)
    buf = bytearray(SLOT * 64)
    view = memoryview(buf)
    lengths = array("I", bytes(4 * 64))
    i = 0
    while i < len(stream):
        n = min(rng.randint(1, 64), len(stream) - i)
        for j, datagram in enumerate(stream[i : i + n]):
            buf[j * SLOT : j * SLOT + len(datagram)] = datagram
            lengths[j] = len(datagram)
        got += _summary(batched.receive_batch(view, SLOT, lengths, n))
        i += n

    # Same pages written with the same bytes, same completions, same state and counters.
    # (Progress reports may come at other moments: the batch path reports once per run.)
    def non_feedback(items: list[Any]) -> list[Any]:
        return [a for a in items if not (isinstance(a, tuple) and a[0] == "feedback")]

    assert non_feedback(got) == non_feedback(expected)
    writes = [a for a in got if isinstance(a, tuple) and a[0] == "write"]
    assert writes, "the stream wrote nothing: the test would prove nothing"
    assert _state(batched) == _state(one_by_one)
    assert batched.stats.dropped["mac"] > 0 and batched.stats.dropped["stale"] > 0
    if fec:
        assert batched.stats.blocks_decoded > 0
    assert batched.missing == 0 if fec else batched.missing > 0


@needs_speedups
def test_batch_path_is_what_runs() -> None:
    """The compiled path really takes the common datagrams (not everything falling back)."""
    layout = Layout([(0, PAGE * 64)], PAGE, block_pages=16)
    r = _fresh(layout, [0], fec=False)
    calls = 0
    original = r._receive_each

    def counting(*args: Any) -> list[ReceiverAction]:
        nonlocal calls
        calls += 1
        return original(*args)

    r._receive_each = counting  # type: ignore[method-assign]
    buf = bytearray(SLOT * 64)
    lengths = array("I", bytes(4 * 64))
    for page in range(64):
        d = encode_data(KEY, SESSION, 7, page + 1, 0, page, bytes([page]) * PAGE)
        buf[page * SLOT : page * SLOT + len(d)] = d
        lengths[page] = len(d)
    actions = r.receive_batch(memoryview(buf), SLOT, lengths, 64)
    assert r.missing == 0
    assert calls == 0
    # One run of 64 pages, then the object is whole.
    assert [type(a).__name__ for a in actions[:2]] == ["WritePages", "ObjectComplete"]
    first = actions[0]
    assert isinstance(first, WritePages) and first.offset == 0
    assert [bytes(d) for d in first.data] == [bytes([p]) * PAGE for p in range(64)]


def test_python_fallback_gives_the_same_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(receiver_module, "_speedups", None)
    layout = Layout([(0, PAGE * 10 + 5)], PAGE, block_pages=4)
    r = _fresh(layout, [0], fec=True)
    buf = bytearray(SLOT * 16)
    lengths = array("I", bytes(4 * 16))
    for page in range(11):
        d = encode_data(KEY, SESSION, 7, page + 1, 0, page, bytes([page + 1]) * (5 if page == 10
                                                                                  else PAGE))
        buf[page * SLOT : page * SLOT + len(d)] = d
        lengths[page] = len(d)
    actions = _summary(r.receive_batch(memoryview(buf), SLOT, lengths, 11))
    writes = [a for a in actions if isinstance(a, tuple) and a[0] == "write"]
    assert [w[4][:1] for w in writes] == [bytes([p + 1]) for p in range(11)]
    assert r.missing == 0


def test_batch_receiver_reports_each_datagram() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        batch = BatchReceiver(b, slot=64, slots=8)
        for i in range(10):
            a.send(bytes([i]) * (i + 1))
        assert batch.receive() == 8
        assert [bytes(batch.view[i * 64 : i * 64 + batch.lengths[i]]) for i in range(8)] == [
            bytes([i]) * (i + 1) for i in range(8)
        ]
        assert batch.receive() == 2
        assert batch.receive() == 0


def test_a_block_still_short_is_said_again_four_blocks_later() -> None:
    """A block's parity need is said when the sender moves past it; if that parity is lost
    too, the need is said again RESAY_AFTER_BLOCKS blocks later, not only at the poll that
    ends the pass (where a whole pass's worth of such blocks used to pile up)."""
    from mrsync.wire import FLAG_BLOCKS, Feedback, decode

    layout = Layout([(0, PAGE * 4 * 8)], PAGE, block_pages=4)  # 8 blocks of 4 pages
    r = _fresh(layout, [0], fec=True)
    said: dict[int, list[tuple[int, int]]] = {}  # block being started -> block needs said
    for page in range(4 * 8):
        if page == 1:
            continue  # lost, and no parity will come
        d = encode_data(KEY, SESSION, 7, page + 1, 0, page, bytes([page]) * PAGE)
        for action in r.receive_datagram(d, 0.0):
            if isinstance(action, SendFeedback):
                fb = decode(action.data, KEY, SESSION)
                assert isinstance(fb, Feedback)
                if fb.flags & FLAG_BLOCKS:
                    said.setdefault(page // 4, []).extend(fb.ranges)
    assert said == {1: [(0, 1)], 1 + Receiver.RESAY_AFTER_BLOCKS: [(0, 1)]}
