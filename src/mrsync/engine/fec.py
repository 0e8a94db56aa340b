"""Parity repair with a systematic Reed-Solomon code: zfec's (C, from Tahoe-LAFS), computed by
Intel's ISA-L where mrsync was built with it (``_isal_rs.c``: 25x faster, same bytes).

A block is ``k`` consecutive global pages (``Layout.block_pages``): its source symbols are the
pages themselves (each padded with zeros to the page size), sent as ordinary DATA; its repair
symbols, numbered k .. 255, go out as PARITY datagrams. A receiver that holds any k distinct
symbols of a block, source or repair in any mix, rebuilds the pages it lacks, exactly (a
maximum-distance-separable code: k symbols always suffice). So a single repair symbol fixes a
*different* lost page on every receiver, and the master sends per block only as many repair
symbols as the worst receiver lacks: repair cost follows the worst target, not the sum.

Why Reed-Solomon rather than a fountain code (RaptorQ): decoding costs a receiver about
(pages lost x k x page size), so small blocks make decoding nearly free: with zfec 0.5 ms per
MiB at k = 32 here, against 2.5 ms per MiB for RaptorQ, whose decoding touches the whole block
(with ISA-L it is a small fraction of that again). That matters when every target must keep
up with the link. The block size (``PARITY_BLOCK_PAGES``) is large enough that the worst
target's share of a block stays close to the average loss. A block has at most 256 symbols in
all, so at most 256 - k repair symbols; past that, its receivers fall back to page-by-page
repair.

zfec defines the code: its coefficients (what its encoder makes of unit vectors) are what
ISA-L is given, so a master and a target agree on every byte whichever of the two each uses.
zfec multiplies one byte at a time (~2 GB/s); at 2 % loss on 8 targets that was a quarter of
the master's CPU and of each target's, so ISA-L's vector code does the arithmetic when present.

Pure computation, no I/O: the sender's caller feeds block pages in, a receiver feeds symbols.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from mrsync.speedups import isal_rs

MAX_SYMBOLS = 256  # zfec works in GF(2^8): k + repair symbols <= 256


def supported(page_size: int) -> bool:
    """Whether pages of this size can be symbols (always, for sizes a datagram can carry)."""
    return page_size > 0


# Pages per parity block, whatever the number of targets. With loss p, a block of k pages
# costs, in repair, what the worst of N receivers lost of it; the expected worst-of-N share
# shrinks towards p as k grows (the law of large numbers), while a receiver's decoding work
# grows with k (zfec: about 1 ms per MiB at k = 128; ISA-L does the same work ~25x faster),
# and k + repair symbols must stay within the code's 256. The simulator, 8 receivers at 2 %
# loss, 8,192 pages, seeds 1-3: repair 4.99-5.09 % of the data at k = 64, 4.05-4.25 % at
# 128, 3.71-3.94 % at 192, 3.37-3.80 % at 224 (only 32 repair symbols left per block). At
# 1 % loss and N = 1,000 it gives about 4 % at k = 192.
PARITY_BLOCK_PAGES = 192


# zfec is imported when first needed: most targets of a clean network never decode, and its
# import (it brings its command-line tools along) was a tenth of a target's start-up.


@lru_cache(maxsize=8)
def _encoder(k: int) -> Any:
    import zfec

    return zfec.Encoder(k, MAX_SYMBOLS)


@lru_cache(maxsize=8)
def _decoder(k: int) -> Any:
    import zfec

    return zfec.Decoder(k, MAX_SYMBOLS)


def max_repair(k: int) -> int:
    return MAX_SYMBOLS - k


@lru_cache(maxsize=8)
def coefficients(k: int) -> bytes:
    """The code's parity coefficients, (256 - k) rows of k bytes: repair symbol k + r is the sum
    over j of row r's byte j times page j, in GF(2^8). Read off zfec by encoding unit vectors:
    page j all zero but for a 1 at byte j gives column j of every row."""
    units = [bytes(j) + b"\x01" + bytes(k - 1 - j) for j in range(k)]
    rows = _encoder(k).encode(units, list(range(k, MAX_SYMBOLS)))
    return b"".join(bytes(row) for row in rows)


@lru_cache(maxsize=8)
def _isal_tables(k: int) -> bytes:
    assert isal_rs is not None
    return isal_rs.tables(coefficients(k), k, MAX_SYMBOLS - k)  # type: ignore[no-any-return]


class BlockEncoder:
    """Repair symbols of one block of ``pages`` source symbols."""

    def __init__(self, pages: Sequence[bytes]) -> None:
        if not 0 < len(pages) < MAX_SYMBOLS:
            raise ValueError(f"a block has 1..{MAX_SYMBOLS - 1} pages, not {len(pages)}")
        self._pages = tuple(pages)
        self._k = len(pages)
        self._cache: dict[int, bytes] = {}

    def symbol(self, esi: int, due: int = 1) -> bytes:
        """Repair symbol ``esi``; when it must be computed, so are the ``due - 1`` after it
        (the sender says how many of the block it is about to send)."""
        if not self._k <= esi < MAX_SYMBOLS:
            raise ValueError(f"repair symbol id {esi} out of range for k={self._k}")
        found = self._cache.get(esi)
        if found is None:
            # All that are due at once: one pass over the block's pages serves them all.
            wanted = tuple(range(esi, min(MAX_SYMBOLS, esi + max(1, due))))
            k = self._k
            if isal_rs is not None:
                symbols = isal_rs.encode(_isal_tables(k), k, esi - k, len(wanted),
                                         self._pages, len(self._pages[0]))
            else:
                symbols = _encoder(k).encode(self._pages, wanted)
            for i, sym in zip(wanted, symbols, strict=True):
                self._cache[i] = bytes(sym)
            found = self._cache[esi]
        return found


def recover_block(
    k: int, size: int, block: bytearray, flags_at: int, pages_at: int, parity: dict[int, bytes]
) -> int:
    """Rebuild in place the pages a receiver lacks of a block of ``k`` pages: ``block`` holds k
    flags at ``flags_at`` (non-zero: page present) and k pages of ``size`` bytes (short ones
    zero-padded) at ``pages_at``; ``parity`` maps repair symbol ids (>= k) to symbols of
    ``size`` bytes. Needs as many repair symbols as pages are missing; sets the flags of the
    pages rebuilt and returns how many there were."""
    if isal_rs is not None:
        rows = [(esi - k, parity[esi]) for esi in sorted(parity)]
        return isal_rs.recover(  # type: ignore[no-any-return]
            coefficients(k), k, size, block, flags_at, pages_at, rows)
    symbols = dict(parity)
    missing = []
    for esi in range(k):
        if block[flags_at + esi]:
            at = pages_at + esi * size
            symbols[esi] = bytes(block[at : at + size])
        else:
            missing.append(esi)
    if not missing:
        return 0
    pages = decode_block(k, symbols)
    for esi in missing:
        at = pages_at + esi * size
        block[at : at + size] = pages[esi]
        block[flags_at + esi] = 1
    return len(missing)


def decode_block(k: int, symbols: dict[int, bytes]) -> list[bytes]:
    """The k source pages of a block from any k distinct symbols (esi -> symbol)."""
    if len(symbols) < k:
        raise ValueError(f"{len(symbols)} symbols cannot decode a block of {k}")
    chosen = sorted(symbols)[:k]
    return list(_decoder(k).decode([symbols[i] for i in chosen], chosen))
