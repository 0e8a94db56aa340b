"""Reading pages of the source for the sender: the manifest blob from memory, files by
``pread`` through a small cache of open descriptors."""

from __future__ import annotations

import os
from collections import OrderedDict

from mrsync.engine.fec import BlockEncoder
from mrsync.engine.layout import Layout
from mrsync.plan.manifest import Manifest


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
    the session waiting forever for a page of the announced length."""

    MAX_OPEN = 64

    def __init__(self, base: bytes, manifest: Manifest, page_size: int) -> None:
        self._base = base
        self._entries = manifest.entries
        self._page_size = page_size
        self._fds: OrderedDict[int, int] = OrderedDict()
        self.short_reads: set[int] = set()
        self._chunk: tuple[int, int, memoryview] = (-1, 0, memoryview(b""))

    def _fd(self, obj: int) -> int:
        fd = self._fds.get(obj)
        if fd is not None:
            self._fds.move_to_end(obj)
            return fd
        path = self._entries[obj].path
        full = self._base if path == b"." else os.path.join(self._base, path)
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
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
        return self._chunk[2][:length]

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
