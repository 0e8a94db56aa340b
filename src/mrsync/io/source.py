"""Reading pages of the source for the sender: the manifest blob from memory, files by
``pread`` through a small cache of open descriptors, hashing files as the first pass reads
them."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable

import blake3

from mrsync.engine.fec import BlockEncoder
from mrsync.engine.layout import Layout
from mrsync.plan.manifest import Manifest
from mrsync.plan.scan import entry_path, hash_fd


class BlobPages:
    def __init__(self, blob: bytes, page_size: int) -> None:
        self._view = memoryview(blob)
        self._page_size = page_size

    def read(self, obj: int, page: int, length: int) -> bytes | memoryview:
        start = page * self._page_size
        return self._view[start : start + length]

    def close(self) -> None:
        self._view.release()


class FilePages:
    """Pages of the manifest's files. A file that shrank since the scan yields zeros where its
    bytes are gone: the targets then refuse it on the digest, with a clear error, instead of
    the session waiting forever for a page of the announced length.

    With ``digest``, the files whose digests the manifest left out (``digests_follow``) are
    hashed from the very bytes read to be sent, as rsync computes its whole-file checksum
    while sending: the first pass reads each file front to back, so every byte is hashed
    once, and the source is read once instead of twice (once at the scan, once to send).
    ``take_digests`` hands out the digests completed since it was last called; a file that
    could not be hashed that way (read out of order, or short) is hashed, or refused, by
    ``finish_digests`` at the end of the first pass."""

    MAX_OPEN = 64

    def __init__(
        self, base: bytes, manifest: Manifest, page_size: int, *, digest: Iterable[int] = ()
    ) -> None:
        self._base = base
        self._entries = manifest.entries
        self._page_size = page_size
        self._fds: OrderedDict[int, int] = OrderedDict()
        self.short_reads: set[int] = set()
        self._chunk: tuple[int, int, memoryview] = (-1, 0, memoryview(b""))
        # obj -> (hasher, bytes hashed so far): files being hashed as they are read
        self._hashing: dict[int, tuple[blake3.blake3, int]] = {
            obj: (blake3.blake3(), 0) for obj in digest if self._entries[obj].size > 0
        }
        self._unhashed: set[int] = set()  # read out of order: hashed at the end instead
        self._digests: list[tuple[int, bytes]] = []  # completed, not yet taken

    def _fd(self, obj: int) -> int:
        fd = self._fds.get(obj)
        if fd is not None:
            self._fds.move_to_end(obj)
            return fd
        path = self._entries[obj].path
        fd = os.open(entry_path(self._base, path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._fds[obj] = fd
        if len(self._fds) > self.MAX_OPEN:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    READAHEAD = 256 * 1024  # the first pass reads pages in order: one pread serves many

    def read(self, obj: int, page: int, length: int) -> bytes | memoryview:
        offset = page * self._page_size
        chunk_obj, chunk_off, chunk = self._chunk
        if chunk_obj == obj and chunk_off <= offset and offset + length <= chunk_off + len(chunk):
            start = offset - chunk_off
            return chunk[start : start + length]
        want = max(length, self.READAHEAD - self.READAHEAD % self._page_size)
        try:
            data = os.pread(self._fd(obj), want, offset)
        except OSError:
            data = b""
        if len(data) < length:
            self.short_reads.add(obj)
            return data + bytes(length - len(data))
        self._chunk = (obj, offset, memoryview(data))
        if obj in self._hashing:
            self._hash(obj, offset, self._chunk[2])
        return self._chunk[2][:length]

    def _hash(self, obj: int, offset: int, data: memoryview) -> None:
        hasher, done = self._hashing[obj]
        size = self._entries[obj].size
        if offset > done:  # a gap: not the first pass's order after all
            del self._hashing[obj]
            self._unhashed.add(obj)
            return
        end = min(offset + len(data), size)  # a file that grew: its announced bytes only
        if end <= done:
            return  # bytes hashed already (a repair or parity read)
        hasher.update(data[done - offset : end - offset])
        if end < size:
            self._hashing[obj] = (hasher, end)
        else:
            del self._hashing[obj]
            self._digests.append((obj, hasher.digest()))

    def take_digests(self) -> list[tuple[int, bytes]]:
        """(file, digest) of the files hashed to their end since the last call. A file that
        came up short while it was read gets b"": its targets refuse it."""
        taken, self._digests = self._digests, []
        return [(obj, b"" if obj in self.short_reads else d) for obj, d in taken]

    def finish_digests(self) -> list[tuple[int, bytes]]:
        """At the end of the first pass: the digests still owed, hashed from the file now."""
        owed = sorted(self._unhashed | set(self._hashing))
        self._unhashed.clear()
        self._hashing.clear()
        for obj in owed:
            size = self._entries[obj].size
            try:
                digest, hashed = hash_fd(self._fd(obj), size)
            except OSError:
                digest, hashed = b"", 0
            self._digests.append((obj, digest if hashed == size else b""))
        return self.take_digests()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class ParitySymbols:
    """Repair symbols of the blocks of a transfer, computed from the source pages on demand.
    A few encoders are kept, since a block's repair rounds come close together."""

    KEEP = 8

    def __init__(self, layout: Layout, pages: BlobPages | FilePages) -> None:
        self._layout = layout
        self._pages = pages
        self._encoders: OrderedDict[int, BlockEncoder] = OrderedDict()

    def symbol(self, block: int, esi: int, due: int = 1) -> bytes:
        encoder = self._encoders.get(block)
        if encoder is None:
            layout = self._layout
            size = layout.page_size
            k = layout.block_size(block)
            first = block * layout.block_pages
            pages = []
            for i in range(k):
                obj, page = layout.locate(first + i)
                chunk = bytes(self._pages.read(obj, page, layout.page_length(obj, page)))
                # Short pages are zero-padded, as receivers pad them.
                pages.append(chunk + bytes(size - len(chunk)) if len(chunk) < size else chunk)
            encoder = self._encoders[block] = BlockEncoder(pages)
            if len(self._encoders) > self.KEEP:
                self._encoders.popitem(last=False)
        else:
            self._encoders.move_to_end(block)
        return encoder.symbol(esi, due)
