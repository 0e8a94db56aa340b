"""The control stream between the master and one target: session parameters, the target's
needs, its results. It runs over the stdin/stdout of the receiver process (started locally or
through a remote shell), which is reliable and already authenticated by whatever started it;
that is also how the per-session key reaches the target without ever crossing the data plane.

Framing: a 4-byte big-endian length, then one msgpack-encoded message (a tagged msgspec Struct).
"""

from __future__ import annotations

import struct

import msgspec

from mrsync.plan.options import SyncOptions

MAX_MESSAGE = 64 * 1024 * 1024  # a frame longer than this is a broken stream, not a message
_LENGTH = struct.Struct("!I")


class Hello(msgspec.Struct, tag=True):
    """Master -> target: everything the target needs to join the session."""

    version: int
    session: int
    key: bytes
    receiver_id: int
    dest: bytes  # target directory, raw bytes
    group: str  # multicast group address
    port: int
    family: int  # socket.AF_INET or AF_INET6
    interface: str  # interface to join the group on; "" = the one the route to the master uses
    feedback_host: str  # where to send FEEDBACK datagrams
    feedback_port: int
    page_size: int
    block_pages: int  # pages per parity block
    fec: bool  # parity repair (RaptorQ) for this session
    report_every: int
    max_datagram: int  # largest datagram the path carries, for sizing feedback
    verbose: int = 0
    options: SyncOptions = SyncOptions()


class HelloOk(msgspec.Struct, tag=True):
    version: int
    hostname: str
    pid: int
    address: str  # the target's address on the data plane
    data_port: int  # its unicast socket: catch-up data after sitting out is sent there
    mtu: int = 0  # MTU of the interface it joined the group on (0: unknown)


class StartTransfer(msgspec.Struct, tag=True):
    """Master -> target: the next transfer. kind "manifest": one object (id 0) of ``size``
    bytes whose blake3 is ``digest``. kind "data": the manifest's files whose ids are set in
    ``objects`` (a bitmap, bit i of byte i // 8), sent in ascending id order. kind "rtt"
    (mrsync-rtt): one object (id 0) of ``size`` bytes, every page answered as it arrives and
    then thrown away."""

    transfer: int
    kind: str
    size: int = 0
    digest: bytes = b""
    objects: bytes = b""


class Ready(msgspec.Struct, tag=True):
    transfer: int


class Digests(msgspec.Struct, tag=True):
    """Master -> target: content digests of files of data transfer ``transfer`` whose
    manifest entries had none (``Manifest.digests_follow``), computed by the master from the
    bytes it sent. ``digests[i]`` is the blake3-256 of file ``files[i]``; b"" means the file
    changed while it was read, and the target must refuse it."""

    transfer: int
    files: list[int]
    digests: list[bytes]


class Needs(msgspec.Struct, tag=True):
    """Target -> master: the files whose content this target lacks (bitmap, as above)."""

    objects: bytes
    files: int
    size: int  # bytes of content it lacks
    deletions: int = 0
    itemized: list[str] = []  # rsync -i style lines, filled for --dry-run (and -v 2)


class TransferDone(msgspec.Struct, tag=True):
    transfer: int


class FileFailure(msgspec.Struct, array_like=True):
    path: str
    reason: str


class Result(msgspec.Struct, tag=True):
    """Target -> master: the end of its part of the session."""

    files_written: int
    bytes_written: int
    deleted: int
    errors: list[FileFailure]
    counters: dict[str, int]


class Failure(msgspec.Struct, tag=True):
    """Either side: a fatal error; the sender of it stops."""

    message: str


class Bye(msgspec.Struct, tag=True):
    """Master -> target: the session is over; clean up and exit."""


Message = (
    Hello | HelloOk | StartTransfer | Ready | Digests | Needs | TransferDone | Result | Failure
    | Bye
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


class ProtocolError(Exception):
    """The control stream carried something that is not a message of ours."""


def frame(message: Message) -> bytes:
    body = _encoder.encode(message)
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """Accumulates bytes from a stream and yields the whole messages in them."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buf)
            if length > MAX_MESSAGE:
                raise ProtocolError(f"control frame of {length} bytes")
            end = _LENGTH.size + length
            if len(self._buf) < end:
                break
            body = bytes(self._buf[_LENGTH.size : end])
            del self._buf[:end]
            try:
                out.append(_decoder.decode(body))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ProtocolError(f"bad control message: {exc}") from exc
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def bitmap_from_ids(ids: list[int] | set[int], count: int) -> bytes:
    bits = bytearray((count + 7) // 8)
    for i in ids:
        bits[i >> 3] |= 1 << (i & 7)
    return bytes(bits)


def ids_from_bitmap(bits: bytes, count: int) -> list[int]:
    return [i for i in range(min(count, len(bits) * 8)) if bits[i >> 3] >> (i & 7) & 1]


def bitmap_has(bits: bytes, i: int) -> bool:
    """Whether id ``i`` is set in a bitmap of ``bitmap_from_ids``."""
    return i >> 3 < len(bits) and bool(bits[i >> 3] >> (i & 7) & 1)
