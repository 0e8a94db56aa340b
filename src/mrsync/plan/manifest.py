"""The source manifest: every entry of the source tree, as the targets will rebuild it.

The master announces the manifest once, over the data plane, as a compressed msgpack blob; each
target compares it with its own tree. Paths are raw bytes (``os.fsencode``) so that names that
are not valid UTF-8 survive the trip. A file is named on the wire by its index in ``entries``.
"""

from __future__ import annotations

import enum
import zlib

import msgspec


class Kind(enum.IntEnum):
    FILE = 0
    DIR = 1
    SYMLINK = 2


class Entry(msgspec.Struct, array_like=True, frozen=True):
    """One entry of the source tree.

    ``path`` is relative to the transfer root, components separated by b"/"; the root itself is
    b"." (present when SRC ends with a slash, so its mode and mtime reach DEST as rsync does).
    Parents always come before their children in ``Manifest.entries``.
    """

    path: bytes
    kind: Kind
    mode: int  # permission bits only (stat.S_IMODE)
    size: int  # bytes for FILE, 0 otherwise
    mtime_ns: int
    uid: int
    gid: int
    target: bytes = b""  # symlink target, as stored, never followed
    digest: bytes = b""  # blake3-256 of the content, FILE only
    link: int = -1  # with -H: index of an earlier FILE entry this one is a hard link to


class Manifest(msgspec.Struct, array_like=True, frozen=True):
    entries: list[Entry]
    # True: non-empty FILE entries carry no digest (b""); each one's digest follows, on the
    # control stream, once the master has read the file to send it (control.Digests).
    digests_follow: bool = False


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Manifest)


def encode_manifest(manifest: Manifest) -> bytes:
    """Serialize and compress: names and metadata compress well, and every target pays for it."""
    return zlib.compress(_encoder.encode(manifest), 6)


def decode_manifest(blob: bytes) -> Manifest:
    """Strict decode; raises ``ValueError`` on anything malformed (after the digest matched)."""
    try:
        return _decoder.decode(zlib.decompress(blob))
    except (zlib.error, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"malformed manifest: {exc}") from exc
