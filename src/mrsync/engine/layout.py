"""How a transfer's objects map onto pages.

A transfer sends a set of objects (files, or the manifest blob) back to back as one sequence of
pages, each object starting on a page boundary so that a page never straddles two files. A page
is named on the wire by (object id, page within the object), and in repair requests by its
*global* page number, so a single NACK can name pages of any file. Pages are grouped in blocks
of ``BLOCK_PAGES`` consecutive global pages: the unit parity repair will work on.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

BLOCK_PAGES = 32  # default pages per parity block (the session picks its own, see fec.py)
BLOCK_BYTES = 4 * 1024 * 1024  # a receiver may hold a block in memory while it waits for parity


def block_pages_for(page_size: int, wanted: int = BLOCK_PAGES) -> int:
    """``wanted`` pages per parity block, fewer when pages are so large that a block would not
    fit comfortably in a receiver's memory."""
    return max(1, min(wanted, BLOCK_BYTES // page_size))


class Layout:
    __slots__ = (
        "page_size", "block_pages", "objects", "sizes", "first_page", "_starts", "_owners",
        "total_pages",
    )  # fmt: skip

    def __init__(
        self, objects: Iterable[tuple[int, int]], page_size: int, block_pages: int | None = None
    ) -> None:
        """``objects`` are (object id, size in bytes) in sending order; empty objects take no
        pages (there is nothing to send for them)."""
        if page_size <= 0:
            raise ValueError("page size must be positive")
        self.page_size = page_size
        self.block_pages = block_pages or block_pages_for(page_size)
        self.objects: list[int] = []
        self.sizes: dict[int, int] = {}
        self.first_page: dict[int, int] = {}
        # Start page and owner of every non-empty object, for bisecting a global page number.
        self._starts: list[int] = []
        self._owners: list[int] = []
        page = 0
        for obj, size in objects:
            if obj in self.sizes:
                raise ValueError(f"object {obj} listed twice")
            self.objects.append(obj)
            self.sizes[obj] = size
            self.first_page[obj] = page
            if size > 0:
                self._starts.append(page)
                self._owners.append(obj)
            page += self.pages_of(obj)
        self.total_pages = page

    def pages_of(self, obj: int) -> int:
        return -(-self.sizes[obj] // self.page_size)

    def global_page(self, obj: int, page: int) -> int:
        return self.first_page[obj] + page

    def locate(self, global_page: int) -> tuple[int, int]:
        """(object id, page within object) of a global page number."""
        if not 0 <= global_page < self.total_pages:
            raise IndexError(global_page)
        i = bisect.bisect_right(self._starts, global_page) - 1
        return self._owners[i], global_page - self._starts[i]

    def page_length(self, obj: int, page: int) -> int:
        """Bytes in that page: a full page except the last page of an object."""
        return min(self.page_size, self.sizes[obj] - page * self.page_size)

    @property
    def total_blocks(self) -> int:
        return -(-self.total_pages // self.block_pages)

    def block_of(self, global_page: int) -> int:
        return global_page // self.block_pages

    def block_size(self, block: int) -> int:
        """Pages in this block: ``block_pages`` except for the last block."""
        return min(self.block_pages, self.total_pages - block * self.block_pages)

    def bytes_total(self) -> int:
        return sum(self.sizes.values())
