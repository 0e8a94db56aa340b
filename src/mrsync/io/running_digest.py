"""The digest of a file hashed while it is being written, so that checking it costs little
once the last page is in.

A target checks every file it receives against the digest in the manifest before putting it
in place. Hashed after the fact, a 256 MiB file costs ~0.1 s of CPU to read back and hash;
with 8 or 16 targets on one host that all finish together, it was the last 0.4-0.9 s of the
transfer. Pages arrive in order apart from the lost ones, which parity brings back a few
blocks later, so the file is complete from its start up to a point that keeps moving: the
part before that point is hashed as it forms, in steps of ``STEP`` bytes read back from the
page cache (one large read and one large hash update, which is faster than hashing page by
page), and at the end only what remains is read.

The digest is of what the file holds, as a hash after the fact would be, on one condition:
nothing already hashed is written again. Targets write every page once, but should a write
land in the hashed part anyway, the running digest gives up and the file is hashed whole at
the end (``valid``).
"""

from __future__ import annotations

import os
from bisect import bisect_left

import blake3

from mrsync.plan.scan import hash_fd

STEP = 4 * 1024 * 1024  # bytes hashed at a time: large reads and updates, often enough
MIN_SIZE = 2 * STEP  # smaller files are hashed at the end: they cost little either way


_SCRATCH: list[memoryview] = []


def _scratch() -> memoryview:
    """One read buffer for all files (a target is single-threaded), made on first use."""
    if not _SCRATCH:
        _SCRATCH.append(memoryview(bytearray(STEP)))
    return _SCRATCH[0]


class RunningDigest:
    """Written ranges of one file, and the hash of its complete prefix."""

    __slots__ = ("size", "hashed", "valid", "_hasher", "_starts", "_ends")

    def __init__(self, size: int) -> None:
        self.size = size
        self.hashed = 0  # bytes [0, hashed) are in the hasher
        self.valid = True
        # One thread: targets share their host's cores with each other.
        self._hasher = blake3.blake3(max_threads=1)
        # Written ranges beyond ``hashed``, sorted, disjoint and not touching.
        self._starts: list[int] = []
        self._ends: list[int] = []

    def wrote(self, fd: int, offset: int, length: int) -> None:
        """Bytes [offset, offset + length) of the file behind ``fd`` now hold their final
        content (holes count: they read as zeros). Hashes what became complete, a STEP at a
        time."""
        if length <= 0 or not self.valid:
            return
        end = offset + length
        if offset < self.hashed:
            self.valid = False  # rewriting what was hashed: hash the whole file at the end
            return
        starts, ends = self._starts, self._ends
        if ends and ends[-1] == offset:  # the usual case: the next pages in order
            ends[-1] = end
        elif not starts or starts[-1] < offset:
            starts.append(offset)
            ends.append(end)
        else:
            self._insert(offset, end)
        if starts[0] == self.hashed and ends[0] - self.hashed >= STEP:
            self._hash_prefix(fd, ends[0] - (ends[0] - self.hashed) % STEP)

    def _insert(self, start: int, end: int) -> None:
        """Merge [start, end) into the ranges (a lost page come back)."""
        starts, ends = self._starts, self._ends
        i = bisect_left(starts, start)
        # Absorb a range before it that reaches it, and every later one it reaches.
        if i > 0 and ends[i - 1] >= start:
            i -= 1
            start = starts[i]
            end = max(end, ends[i])
        j = i
        while j < len(starts) and starts[j] <= end:
            end = max(end, ends[j])
            j += 1
        starts[i:j] = [start]
        ends[i:j] = [end]

    def _hash_prefix(self, fd: int, upto: int) -> None:
        view = _scratch()
        while self.hashed < upto:
            want = min(len(view), upto - self.hashed)
            n = os.preadv(fd, [view[:want]], self.hashed)
            if n <= 0:  # shorter than written: let the check at the end say what it finds
                self.valid = False
                return
            self._hasher.update(view[:n])
            self.hashed += n
        if self._ends[0] <= self.hashed:
            del self._starts[0], self._ends[0]
        else:
            self._starts[0] = self.hashed

    def digest(self, fd: int) -> bytes:
        """The digest of the file's first ``size`` bytes: what remains is read and hashed now
        (all of it if the running digest gave up)."""
        if not self.valid:
            return hash_fd(fd, self.size)[0]
        return hash_fd(fd, self.size, start=self.hashed, hasher=self._hasher)[0]
