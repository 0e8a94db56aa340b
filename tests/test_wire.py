"""Datagram wire format: round trips, rejection of damaged/foreign datagrams, sizes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrsync import PROTOCOL_VERSION
from mrsync.wire import (
    DATA_OVERHEAD,
    FLAG_COMPLETE,
    FLAG_MORE,
    HEADER_SIZE,
    MAC_SIZE,
    Data,
    DecodeError,
    DropReason,
    Feedback,
    PacketType,
    Parity,
    Poll,
    decode,
    encode_data,
    encode_feedback,
    encode_parity,
    encode_poll,
    max_feedback_ranges,
    packets,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SESSION = 0x89AB_CDEF

U8 = 2**8 - 1
U16 = 2**16 - 1
U32 = 2**32 - 1
U64 = 2**64 - 1


def _edgy(top: int) -> st.SearchStrategy[int]:
    """Integers in [0, top], with the edges (and the 4 GiB boundary) drawn often."""
    edges = [0, 1, top - 1, top]
    if top > 2**32:
        edges += [2**32 - 1, 2**32, 2**32 + 1]
    return st.one_of(st.sampled_from(edges), st.integers(0, top))


u8 = _edgy(U8)
u32 = _edgy(U32)
u64 = _edgy(U64)
keys = st.binary(min_size=32, max_size=32)
payloads = st.binary(min_size=0, max_size=1500)
ranges_st = st.lists(st.tuples(u64, st.integers(1, U32)), max_size=max_feedback_ranges(1400))


def _data() -> bytes:
    return encode_data(KEY, SESSION, 7, 123456, 3, 2**40, b"x" * 1400)


def _poll() -> bytes:
    return encode_poll(KEY, SESSION, 7, 9, 123456)


def _feedback() -> bytes:
    return encode_feedback(KEY, SESSION, 7, 42, 9, 123455, 10, 99, FLAG_MORE, [(5, 3), (2**40, 7)])


def _parity() -> bytes:
    return encode_parity(KEY, SESSION, 7, 123457, 2**33, 1030, b"p" * 1400)


SAMPLES = {"data": _data, "parity": _parity, "poll": _poll, "feedback": _feedback}


def _reason(datagram: bytes | memoryview, key: bytes = KEY, session: int = SESSION) -> DropReason:
    with pytest.raises(DecodeError) as info:
        decode(datagram, key, session)
    return info.value.reason


def _remac(body: bytes, key: bytes = KEY) -> bytes:
    """Re-authenticate a hand-crafted body, to reach the checks that come after the MAC: the
    GMAC of DATA and PARITY, the keyed BLAKE3 of the others."""
    import blake3

    if body[3] in (PacketType.DATA, PacketType.PARITY):
        if len(body) < 20:  # too short for its nonce: no MAC can make it authentic
            return body + bytes(packets.DATA_MAC_SIZE)
        return body + packets.data_mac(key).tag(body)
    return body + blake3.blake3(body, key=key).digest(length=MAC_SIZE)


# --- sizes ------------------------------------------------------------------------------------


def test_sizes() -> None:
    assert HEADER_SIZE == 8
    assert MAC_SIZE == 16
    assert packets.DATA_MAC_SIZE == 12
    assert DATA_OVERHEAD == 8 + 24 + 12
    assert len(encode_data(KEY, 1, 0, 0, 0, 0, b"")) == DATA_OVERHEAD
    assert len(encode_data(KEY, 1, 0, 0, 0, 0, b"a" * 1400)) == DATA_OVERHEAD + 1400
    assert len(_poll()) == 8 + 16 + 16
    assert len(encode_feedback(KEY, 1, 0, 0, 0, 0, 0, 0, 0, [])) == 8 + 39 + 16


def test_header_layout() -> None:
    d = _data()
    assert d[:2] == b"MR"
    assert d[2] == PROTOCOL_VERSION
    assert d[3] == PacketType.DATA
    assert struct.unpack("!I", d[4:8])[0] == SESSION
    # DATA fields in network byte order: transfer, seq, obj, page.
    assert struct.unpack("!IQIQ", d[8:32]) == (7, 123456, 3, 2**40)


def test_drop_reason_values() -> None:
    assert {r.value for r in DropReason} == {
        "short", "magic", "version", "type", "session", "mac", "length",
    }  # fmt: skip
    assert str(DecodeError(DropReason.MAC)) == "mac"


def test_max_feedback_ranges_1400() -> None:
    n = max_feedback_ranges(1400)
    assert n == 111
    ranges = [(i * 10, 1) for i in range(n)]
    assert len(encode_feedback(KEY, 1, 0, 0, 0, 0, 0, 0, 0, ranges)) <= 1400
    ranges.append((n * 10, 1))
    assert len(encode_feedback(KEY, 1, 0, 0, 0, 0, 0, 0, 0, ranges)) > 1400


@given(st.integers(0, 70000))
def test_max_feedback_ranges_any_size(size: int) -> None:
    n = max_feedback_ranges(size)
    assert 0 <= n <= U16
    if n:
        assert len(encode_feedback(KEY, 1, 0, 0, 0, 0, 0, 0, 0, [(0, 1)] * n)) <= size
    if n < U16:
        assert len(encode_feedback(KEY, 1, 0, 0, 0, 0, 0, 0, 0, [(0, 1)] * (n + 1))) > size


# --- round trips -----------------------------------------------------------------------------


@given(keys, u32, u32, u64, u32, u64, payloads)
def test_data_round_trip(
    key: bytes, session: int, transfer: int, seq: int, obj: int, page: int, payload: bytes
) -> None:
    datagram = encode_data(key, session, transfer, seq, obj, page, payload)
    assert len(datagram) == DATA_OVERHEAD + len(payload)
    pkt = decode(datagram, key, session)
    assert isinstance(pkt, Data)
    assert pkt[:4] == (transfer, seq, obj, page)
    assert bytes(pkt.payload) == payload


def test_data_past_4gib_and_memoryview_payload() -> None:
    page = 2**32 // 65536 + 1  # byte offset page * 65536 is past 4 GiB
    assert page * 65536 > 2**32
    buf = bytearray(b"\0" * 10 + b"p" * 1400)
    datagram = encode_data(KEY, SESSION, 1, 2, 3, page, memoryview(buf)[10:])
    pkt = decode(datagram, KEY, SESSION)
    assert isinstance(pkt, Data)
    assert pkt.page == page
    # No copy: the payload is a view into the datagram.
    assert isinstance(pkt.payload, memoryview)
    assert pkt.payload.obj is datagram
    assert pkt.payload == b"p" * 1400


def test_decode_accepts_memoryview_and_bytearray() -> None:
    datagram = _data()
    buf = bytearray(2000)
    buf[: len(datagram)] = datagram
    # As a receive loop would do it: one reused buffer, a view of the bytes received.
    pkt = decode(memoryview(buf)[: len(datagram)], KEY, SESSION)
    assert isinstance(pkt, Data)
    assert pkt.payload == b"x" * 1400


@given(keys, u32, u32, u32, u64)
def test_poll_round_trip(key: bytes, session: int, transfer: int, poll: int, seq: int) -> None:
    datagram = encode_poll(key, session, transfer, poll, seq)
    assert decode(datagram, key, session) == Poll(transfer, poll, seq)


@given(keys, u32, u32, u32, u32, u64, u64, u64, u8, ranges_st)
def test_feedback_round_trip(
    key: bytes,
    session: int,
    transfer: int,
    receiver: int,
    poll: int,
    seq_seen: int,
    missing: int,
    received: int,
    flags: int,
    ranges: list[tuple[int, int]],
) -> None:
    datagram = encode_feedback(
        key, session, transfer, receiver, poll, seq_seen, missing, received, flags, ranges
    )
    assert len(datagram) <= 1400
    pkt = decode(datagram, key, session)
    assert pkt == Feedback(
        transfer, receiver, poll, seq_seen, missing, received, flags, tuple(ranges)
    )
    assert isinstance(pkt, Feedback)
    assert isinstance(pkt.ranges, tuple)


@given(keys, u32, u32, u64, st.integers(0, 2**24 - 1), u64, st.binary(max_size=1400))
def test_parity_round_trip(
    key: bytes, session: int, transfer: int, seq: int, esi: int, block: int, symbol: bytes
) -> None:
    datagram = encode_parity(key, session, transfer, seq, block, esi, symbol)
    pkt = decode(datagram, key, session)
    assert isinstance(pkt, Parity)
    assert (pkt.transfer, pkt.seq, pkt.esi, pkt.block, bytes(pkt.payload)) == (
        transfer, seq, esi, block, symbol)


def test_feedback_flags() -> None:
    assert (FLAG_COMPLETE, FLAG_MORE) == (1, 2)
    datagram = encode_feedback(KEY, SESSION, 1, 2, 0, 5, 0, 3, FLAG_COMPLETE, ())
    pkt = decode(datagram, KEY, SESSION)
    assert isinstance(pkt, Feedback)
    assert pkt.flags & FLAG_COMPLETE
    assert pkt.poll == 0 and pkt.ranges == ()


# --- encode refuses what it cannot represent -----------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: encode_data(KEY, SESSION, -1, 0, 0, 0, b""),
        lambda: encode_data(KEY, SESSION, 0, 2**64, 0, 0, b""),
        lambda: encode_data(KEY, SESSION, 0, 0, 2**32, 0, b""),
        lambda: encode_data(KEY, 2**64, 0, 0, 0, 0, b""),
        lambda: encode_poll(KEY, SESSION, 0, -1, 0),
        lambda: encode_feedback(KEY, SESSION, 0, 0, 0, 0, 0, 0, 256, ()),
        lambda: encode_feedback(KEY, SESSION, 0, 0, 0, 0, 0, 0, 0, [(0, 0)]),
        lambda: encode_feedback(KEY, SESSION, 0, 0, 0, 0, 0, 0, 0, [(2**64, 1)]),
        lambda: encode_feedback(KEY, SESSION, 0, 0, 0, 0, 0, 0, 0, [(0, 1)] * (U16 + 1)),
    ],
)
def test_encode_out_of_range(call: object) -> None:
    assert callable(call)
    with pytest.raises((ValueError, struct.error)):
        call()


# --- rejection -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SAMPLES)
def test_wrong_key(kind: str) -> None:
    assert _reason(SAMPLES[kind](), key=OTHER_KEY) is DropReason.MAC


@pytest.mark.parametrize("kind", SAMPLES)
def test_other_session(kind: str) -> None:
    assert _reason(SAMPLES[kind](), session=SESSION + 1) is DropReason.SESSION


@pytest.mark.parametrize("kind", SAMPLES)
def test_wrong_version(kind: str) -> None:
    d = bytearray(SAMPLES[kind]())
    d[2] = (PROTOCOL_VERSION + 1) & 0xFF
    assert _reason(bytes(d)) is DropReason.VERSION


@pytest.mark.parametrize("kind", SAMPLES)
def test_bad_magic(kind: str) -> None:
    d = SAMPLES[kind]()
    assert _reason(b"RM" + d[2:]) is DropReason.MAGIC


@pytest.mark.parametrize("ptype", [0, 5, 255])
def test_unknown_type(ptype: int) -> None:
    d = bytearray(_poll())
    d[3] = ptype
    assert _reason(bytes(d)) is DropReason.TYPE


def test_short() -> None:
    for n in range(HEADER_SIZE + packets.DATA_MAC_SIZE):
        assert _reason(_data()[:n]) is DropReason.SHORT
    # Length is checked before magic: even empty or garbage input is just "short".
    assert _reason(b"") is DropReason.SHORT


def test_checks_cheapest_first() -> None:
    # A datagram from another session with a wrong key reports the session, not the MAC:
    # the session check comes first and costs no hashing.
    d = encode_poll(OTHER_KEY, SESSION + 1, 1, 1, 1)
    assert _reason(d) is DropReason.SESSION


def _header(ptype: int) -> bytes:
    return struct.pack("!2sBBI", b"MR", PROTOCOL_VERSION, ptype, SESSION)


@pytest.mark.parametrize(
    "body",
    [
        # Authenticated but malformed: each must be LENGTH, not accepted.
        pytest.param(_header(PacketType.DATA) + b"\0" * 23, id="data-short"),
        pytest.param(_header(PacketType.POLL) + b"\0" * 15, id="poll-short"),
        pytest.param(_header(PacketType.POLL) + b"\0" * 17, id="poll-trailing"),
        pytest.param(_header(PacketType.FEEDBACK) + b"\0" * 30, id="feedback-short"),
        pytest.param(
            _header(PacketType.FEEDBACK) + struct.pack("!IIIQQBH", 0, 0, 0, 0, 0, 0, 2)
            + struct.pack("!QI", 0, 1),
            id="feedback-fewer-ranges",
        ),
        pytest.param(
            _header(PacketType.FEEDBACK) + struct.pack("!IIIQQBH", 0, 0, 0, 0, 0, 0, 1)
            + struct.pack("!QI", 0, 1) + b"\0",
            id="feedback-trailing",
        ),
        pytest.param(
            _header(PacketType.FEEDBACK) + struct.pack("!IIIQQBH", 0, 0, 0, 0, 0, 0, 2)
            + struct.pack("!QI", 0, 1) + struct.pack("!QI", 5, 0),
            id="feedback-empty-range",
        ),
    ],
)  # fmt: skip
def test_length(body: bytes) -> None:
    assert _reason(_remac(body)) is DropReason.LENGTH


def test_empty_data_payload_is_fine() -> None:
    pkt = decode(_remac(_header(PacketType.DATA) + b"\0" * 24), KEY, SESSION)
    assert isinstance(pkt, Data)
    assert pkt.payload == b""


@pytest.mark.parametrize("kind", SAMPLES)
def test_every_bit_flip_rejected(kind: str) -> None:
    good = SAMPLES[kind]()
    for i in range(len(good)):
        for bit in range(8):
            d = bytearray(good)
            d[i] ^= 1 << bit
            reason = _reason(bytes(d))
            # Which check fires depends on where the flip landed; past the header it is the MAC.
            if i < 2:
                assert reason is DropReason.MAGIC
            elif i == 2:
                assert reason is DropReason.VERSION
            elif i == 3:
                assert reason in (DropReason.TYPE, DropReason.MAC)
            elif i < HEADER_SIZE:
                assert reason is DropReason.SESSION
            else:
                assert reason is DropReason.MAC


@pytest.mark.parametrize("kind", SAMPLES)
def test_every_truncation_and_extension_rejected(kind: str) -> None:
    good = SAMPLES[kind]()
    for n in range(len(good)):
        assert _reason(good[:n]) in (DropReason.SHORT, DropReason.MAC)
    for extra in (b"\0", b"\xff" * 16, good[-MAC_SIZE:], good):
        assert _reason(good + extra) is DropReason.MAC


@given(st.binary(max_size=2000))
def test_random_bytes_only_raise_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data, KEY, SESSION)


@given(st.binary(max_size=200))
def test_random_body_with_valid_prefix(tail: bytes) -> None:
    # Random bytes behind a plausible header: still only DecodeError, almost always MAC.
    for ptype in PacketType:
        with pytest.raises(DecodeError):
            decode(_header(ptype) + tail, KEY, SESSION)


@settings(max_examples=300)
@given(st.sampled_from(sorted(SAMPLES)), st.data())
def test_random_damage_never_accepted_with_other_contents(kind: str, data: st.DataObject) -> None:
    good = SAMPLES[kind]()
    original = decode(good, KEY, SESSION)
    d = bytearray(good)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(d) - 1))
        d[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(d)))
    damaged = bytes(d[:cut]) + data.draw(st.binary(max_size=20))
    try:
        pkt = decode(damaged, KEY, SESSION)
    except DecodeError:
        return
    # Only an undamaged datagram may be accepted, and it must decode to the same packet.
    assert damaged == good
    assert pkt == original


@given(st.binary(max_size=200), u32)
def test_random_bytes_with_authentic_mac_only_raise_decode_error(body: bytes, session: int) -> None:
    # Authenticated garbage (as a buggy peer could send) exercises the post-MAC checks.
    for ptype in PacketType:
        raw = _remac(struct.pack("!2sBBI", b"MR", PROTOCOL_VERSION, ptype, session) + body)
        try:
            pkt = decode(raw, KEY, session)
        except DecodeError as e:
            if ptype in (PacketType.DATA, PacketType.PARITY) and len(body) < 12:
                # Too short to carry the nonce of its GMAC: nothing can authenticate it.
                assert e.reason is DropReason.MAC
            else:
                assert e.reason is DropReason.LENGTH
        else:
            assert isinstance(pkt, (Data, Parity, Poll, Feedback))
