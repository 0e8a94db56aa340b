"""Datagram wire format: encode and decode DATA, PARITY, POLL and FEEDBACK datagrams. Bytes
only.

Every datagram is::

    common header | type fields | payload | MAC

    common header (8 bytes): magic b"MR", version u8, type u8, session_id u32
    MAC (12 or 16 bytes):    over everything before it, with a key derived from the session's

The session id only sorts out the sessions that share a group and port before any MAC is
computed: 32 random bits make two concurrent sessions alike once in four billion, and even
then each drops the other's datagrams on the MAC. Every byte of a DATA header is ~0.07 % of
the link.

All integers are in network byte order, so masters and targets of different architectures
agree. Page numbers and sequence numbers are u64 so that offsets past 4 GiB are representable.

Two MACs, one per direction of traffic:

* DATA and PARITY, the master's hundreds of thousands of datagrams a second, carry an
  AES-256-GMAC, its tag cut to 12 bytes (96 bits, as NIST SP 800-38D allows): AES-GCM
  encrypting nothing, with the datagram as associated data and its header's (transfer u32,
  seq u64), bytes 8-20, as the 96-bit nonce. GMAC must never see one
  nonce with two different messages under one key, so the master gives every DATA and PARITY
  datagram of a session its own (transfer, seq): each transfer has its own number, every
  datagram of a flow takes the next seq, and the unicast catch-up flows that follow a
  transfer number theirs from ranges of their own (``engine.sender.catch_up_first_seq``).
  A replayed datagram repeats the message along with the nonce, which reveals nothing. With
  AES-NI a tag costs ~0.25 us for 1,468 bytes, against ~1.2 us for keyed BLAKE3, whose speed
  needs longer messages than a datagram; at one tag per datagram that was a fifth of a
  target's CPU.
* POLL and FEEDBACK carry a 16-byte keyed BLAKE3: they are few, the targets send FEEDBACK
  too, and they could not keep nonces apart from one another.

This module does no I/O and keeps no state; the state machines in ``mrsync.engine`` decide what
to send and what a decoded packet means. In particular the MAC proves only that a datagram came
from a holder of this session's key and is intact: a replayed datagram passes it, so the engine
must treat repeats (same transfer/page, old poll numbers) as harmless duplicates.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Sequence
from hmac import compare_digest
from typing import TYPE_CHECKING, NamedTuple, cast

from blake3 import blake3

from mrsync import PROTOCOL_VERSION
from mrsync.speedups import speedups as _speedups

if TYPE_CHECKING:
    from typing import Protocol

    class DataMac(Protocol):
        def tag(self, data: bytes | memoryview, /) -> bytes: ...

MAGIC = b"MR"
MAC_SIZE = 16  # POLL and FEEDBACK
DATA_MAC_SIZE = 12  # DATA and PARITY
FLAG_COMPLETE = 1
FLAG_MORE = 2
FLAG_BLOCKS = 4  # the FEEDBACK's pairs are (block, parity symbols needed), not page ranges


class PacketType(enum.IntEnum):
    DATA = 1
    POLL = 2
    FEEDBACK = 3
    PARITY = 4  # laid out as DATA: (transfer, seq, esi, block) + one repair symbol


class DropReason(enum.Enum):
    """Why a datagram was dropped; the caller counts these per reason."""

    SHORT = "short"
    MAGIC = "magic"
    VERSION = "version"
    TYPE = "type"
    SESSION = "session"
    MAC = "mac"
    LENGTH = "length"


class DecodeError(Exception):
    """The only exception :func:`decode` raises. ``reason`` says which check failed."""

    def __init__(self, reason: DropReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class Data(NamedTuple):
    transfer: int
    seq: int
    obj: int
    page: int
    # A memoryview into the datagram on decode (no copy). If the caller receives into a reused
    # buffer, it must consume the payload before the next receive overwrites it.
    payload: memoryview | bytes


class Parity(NamedTuple):
    """A repair symbol of a block (RaptorQ encoding symbol id ``esi`` >= the block's pages)."""

    transfer: int
    seq: int
    esi: int
    block: int
    payload: memoryview | bytes


class Poll(NamedTuple):
    transfer: int
    poll: int
    seq: int


class Feedback(NamedTuple):
    transfer: int
    receiver: int
    poll: int
    seq_seen: int
    missing: int  # wanted pages still missing
    received: int  # datagrams of this transfer received so far (the sender's delivery rate)
    flags: int
    # (first global page, count >= 1), or with FLAG_BLOCKS (block, symbols needed >= 1)
    ranges: tuple[tuple[int, int], ...]


Packet = Data | Parity | Poll | Feedback

# --- layouts -------------------------------------------------------------------------------
# Each type has one Struct covering the common header *and* its fields, so the hot path packs
# or unpacks a whole header in a single call.
_HEADER = struct.Struct("!2sBBI")  # magic, version, type, session
_DATA = struct.Struct("!2sBBIIQIQ")  # + transfer, seq, obj, page
_POLL = struct.Struct("!2sBBIIIQ")  # + transfer, poll, seq
_FEEDBACK = struct.Struct("!2sBBIIIIQQQBH")  # + transfer, receiver, poll, seq_seen,
#                                              missing, received, flags, nranges
_RANGE = struct.Struct("!QI")  # start, count

HEADER_SIZE = _HEADER.size  # 8
DATA_OVERHEAD = _DATA.size + DATA_MAC_SIZE  # 44: what a DATA datagram adds around its payload
_FEEDBACK_BASE = _FEEDBACK.size + MAC_SIZE  # 63: FEEDBACK without ranges
_RANGE_SIZE = _RANGE.size  # 12
_MAX_NRANGES = 0xFFFF  # nranges is a u16
_MIN_SIZE = HEADER_SIZE + DATA_MAC_SIZE
_DATA_SIZE = _DATA.size
_DATA_MIN_SIZE = _DATA_SIZE + DATA_MAC_SIZE

# Bound methods, looked up once rather than per packet.
_pack_data = _DATA.pack
_unpack_data = _DATA.unpack_from
_unpack_header = _HEADER.unpack_from

_TYPES = frozenset(int(t) for t in PacketType)
_DATA_TYPE = int(PacketType.DATA)
_PARITY_TYPE = int(PacketType.PARITY)
_POLL_TYPE = int(PacketType.POLL)


_DATA_MAC_KEY_CONTEXT = b"mrsync 2: the AES-256-GMAC key of DATA and PARITY datagrams"
_NONCE_AT = 8  # the nonce is the header's transfer and seq: bytes 8-20
_NONCE_END = 20


class _PythonGmac:
    """AES-256-GMAC through the ``cryptography`` package: the same tags as the compiled
    ``_speedups.Gmac``, for hosts where that was not built."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)

    def tag(self, data: bytes | memoryview, /) -> bytes:
        if len(data) < _NONCE_END:
            raise ValueError("a datagram too short for its nonce")
        return self._aead.encrypt(data[_NONCE_AT:_NONCE_END], b"", data)[:DATA_MAC_SIZE]


@functools.lru_cache(maxsize=4)
def data_mac(key: bytes) -> DataMac:
    """The authenticator of DATA and PARITY datagrams under a session key (one per key, kept:
    it holds the expanded AES key)."""
    derived = blake3(_DATA_MAC_KEY_CONTEXT, key=key).digest()
    if _speedups is not None:
        return cast("DataMac", _speedups.Gmac(derived))
    return _PythonGmac(derived)


def _mac(key: bytes, data: bytes | memoryview) -> bytes:
    """The keyed BLAKE3 of a POLL or FEEDBACK datagram."""
    return blake3(data, key=key).digest(length=MAC_SIZE)


# --- encode --------------------------------------------------------------------------------
# Out-of-range values (negative, too large for the field) raise struct.error from pack(); only
# decode promises never to raise anything but DecodeError.


def _seal(key: bytes, head: bytes, payload: bytes | memoryview) -> bytes:
    """A DATA or PARITY datagram: header, payload and their GMAC."""
    message = head + payload
    return message + data_mac(key).tag(message)


def encode_data(
    key: bytes,
    session: int,
    transfer: int,
    seq: int,
    obj: int,
    page: int,
    payload: bytes | memoryview,
) -> bytes:
    """One DATA datagram: ``page`` of object ``obj``, send sequence number ``seq``."""
    head = _pack_data(MAGIC, PROTOCOL_VERSION, _DATA_TYPE, session, transfer, seq, obj, page)
    return _seal(key, head, payload)


def encode_data_run(
    key: bytes,
    session: int,
    transfer: int,
    seq: int,
    obj: int,
    page: int,
    payload: bytes | memoryview,
    page_size: int,
) -> bytes:
    """Consecutive pages of ``obj`` from ``page`` on (``payload`` holds them back to back, the
    last possibly short) as DATA datagrams with seqs from ``seq`` on, back to back: the
    concatenation of what :func:`encode_data` gives page by page, ready for one GSO send."""
    if _speedups is not None:
        return bytes(_speedups.seal_run(data_mac(key), session, transfer, obj, page, seq,
                                        payload, page_size))
    view = memoryview(payload)
    return b"".join(
        encode_data(key, session, transfer, seq + k, obj, page + k,
                    view[at : at + page_size])
        for k, at in enumerate(range(0, len(view), page_size))
    )


def encode_parity(
    key: bytes,
    session: int,
    transfer: int,
    seq: int,
    block: int,
    esi: int,
    symbol: bytes | memoryview,
) -> bytes:
    """One PARITY datagram: repair symbol ``esi`` of ``block``."""
    head = _pack_data(MAGIC, PROTOCOL_VERSION, _PARITY_TYPE, session, transfer, seq, esi, block)
    return _seal(key, head, symbol)


def encode_poll(key: bytes, session: int, transfer: int, poll: int, seq: int) -> bytes:
    """One POLL datagram: asks for feedback number ``poll``; ``seq`` is the highest seq sent."""
    head = _POLL.pack(MAGIC, PROTOCOL_VERSION, _POLL_TYPE, session, transfer, poll, seq)
    return head + _mac(key, head)


def encode_feedback(
    key: bytes,
    session: int,
    transfer: int,
    receiver: int,
    poll: int,
    seq_seen: int,
    missing: int,
    received: int,
    flags: int,
    ranges: Sequence[tuple[int, int]],
) -> bytes:
    """One FEEDBACK datagram listing ``ranges`` of missing global pages as (start, count).

    The caller keeps it within the datagram size with :func:`max_feedback_ranges` and sets
    FLAG_MORE when it had to leave ranges out.
    """
    n = len(ranges)
    if n > _MAX_NRANGES:
        raise ValueError(f"{n} ranges do not fit the u16 range count")
    size = _FEEDBACK.size + n * _RANGE_SIZE
    buf = bytearray(size + MAC_SIZE)
    _FEEDBACK.pack_into(
        buf, 0, MAGIC, PROTOCOL_VERSION, int(PacketType.FEEDBACK), session,
        transfer, receiver, poll, seq_seen, missing, received, flags, n,
    )  # fmt: skip
    offset = _FEEDBACK.size
    for start, count in ranges:
        # An empty range would be refused by decode; fail here, where the bug is.
        if count < 1:
            raise ValueError(f"range count must be >= 1, got {count}")
        _RANGE.pack_into(buf, offset, start, count)
        offset += _RANGE_SIZE
    body = memoryview(buf)[:size]
    buf[size:] = _mac(key, body)
    body.release()
    return bytes(buf)


def max_feedback_ranges(datagram_size: int) -> int:
    """How many ranges fit in a FEEDBACK datagram of at most ``datagram_size`` bytes."""
    fit = (datagram_size - _FEEDBACK_BASE) // _RANGE_SIZE
    return max(0, min(fit, _MAX_NRANGES))


# --- decode --------------------------------------------------------------------------------


def decode_data(
    mv: memoryview, key: bytes, session: int
) -> tuple[int, int, int, int, memoryview] | None:
    """The fast path for the one case that runs hundreds of thousands of times a second: a
    well-formed, authentic DATA datagram of this session, as (transfer, seq, obj, page,
    payload view), with one unpack and one MAC and no object built. Anything else, a DATA
    datagram failing a check included, gives None: :func:`decode` then names the reason.
    ``mv`` must be a memoryview of bytes."""
    n = len(mv)
    if n < _DATA_MIN_SIZE or mv[3] != _DATA_TYPE:
        return None
    magic, version, _, sess, transfer, seq, obj, page = _unpack_data(mv)
    if magic != MAGIC or version != PROTOCOL_VERSION or sess != session:
        return None
    end = n - DATA_MAC_SIZE
    if not compare_digest(data_mac(key).tag(mv[:end]), mv[end:]):
        return None
    return transfer, seq, obj, page, mv[_DATA_SIZE:end]


def decode(datagram: bytes | memoryview, key: bytes, session: int) -> Packet:
    """Check and parse one datagram. Raises :class:`DecodeError` (and nothing else) if it must
    be dropped.

    The checks run cheapest first, so foreign or stale traffic on the group (another session,
    another version, not mrsync at all) is dropped before any hashing. The session is checked
    before the MAC for the same reason, and because a datagram from a session whose key we do
    not hold could never pass the MAC anyway: "session" is the more useful drop reason. The
    field lengths are checked only after the MAC, so that a LENGTH drop means an authenticated
    peer sent a malformed packet (a bug or version skew), not that someone sent noise.
    """
    mv = memoryview(datagram)
    if mv.itemsize != 1:  # e.g. an array('I') view: lengths and slices below count bytes
        mv = mv.cast("B")
    fields = decode_data(mv, key, session)
    if fields is not None:
        return Data(*fields)
    n = len(mv)
    if n < _MIN_SIZE:
        raise DecodeError(DropReason.SHORT)
    magic, version, ptype, sess = _unpack_header(mv)
    if magic != MAGIC:
        raise DecodeError(DropReason.MAGIC)
    if version != PROTOCOL_VERSION:
        raise DecodeError(DropReason.VERSION)
    if sess != session:
        raise DecodeError(DropReason.SESSION)
    if ptype not in _TYPES:
        raise DecodeError(DropReason.TYPE)
    if ptype in (_DATA_TYPE, _PARITY_TYPE):
        end = n - DATA_MAC_SIZE
        # Too short to hold its nonce, it cannot be authenticated: a MAC drop.
        tag = data_mac(key).tag(mv[:end]) if end >= _NONCE_END else b""
    else:
        end = n - MAC_SIZE
        tag = _mac(key, mv[:end])
    if not compare_digest(tag, mv[end:]):
        raise DecodeError(DropReason.MAC)

    if ptype == _DATA_TYPE:  # the hot path: keep it first and short
        if end < _DATA_SIZE:
            raise DecodeError(DropReason.LENGTH)
        _, _, _, _, transfer, seq, obj, page = _unpack_data(mv)
        return Data(transfer, seq, obj, page, mv[_DATA_SIZE:end])

    if ptype == _PARITY_TYPE:
        if end < _DATA_SIZE:
            raise DecodeError(DropReason.LENGTH)
        _, _, _, _, transfer, seq, esi, block = _unpack_data(mv)
        return Parity(transfer, seq, esi, block, mv[_DATA_SIZE:end])

    if ptype == _POLL_TYPE:
        if end != _POLL.size:
            raise DecodeError(DropReason.LENGTH)
        _, _, _, _, transfer, poll, seq = _POLL.unpack_from(mv)
        return Poll(transfer, poll, seq)

    # FEEDBACK, the only type left.
    if end < _FEEDBACK.size:
        raise DecodeError(DropReason.LENGTH)
    (_, _, _, _, transfer, receiver, poll, seq_seen, missing, received, flags, nranges) = (
        _FEEDBACK.unpack_from(mv)
    )
    if end - _FEEDBACK.size != nranges * _RANGE_SIZE:
        raise DecodeError(DropReason.LENGTH)
    ranges: tuple[tuple[int, int], ...] = tuple(_RANGE.iter_unpack(mv[_FEEDBACK.size : end]))
    for _, count in ranges:
        if count == 0:
            raise DecodeError(DropReason.LENGTH)
    return Feedback(transfer, receiver, poll, seq_seen, missing, received, flags, ranges)
