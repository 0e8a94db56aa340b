"""Parity repair with RaptorQ (RFC 6330), through the ``raptorq`` package (Rust).

A block is up to ``Layout.block_pages`` consecutive global pages: its source symbols are the
pages themselves (each padded with zeros to the page size), sent as ordinary DATA. Its repair
symbols (encoding symbol ids >= the block's page count) go out as PARITY datagrams. A receiver
that holds any K symbols of a K-page block, source or repair, in any mix, can rebuild the
pages it lacks. So a single repair symbol fixes a *different* lost page on every receiver, and
the master sends per block only as many repair symbols as the worst receiver lacks: repair
cost follows the worst target, not the sum of every target's losses.

Pure computation, no I/O: the sender's caller feeds block bytes in, a receiver feeds symbols.
"""

from __future__ import annotations

import struct

import raptorq

_PAYLOAD_ID = struct.Struct("!I")  # RFC 6330 FEC Payload ID: SBN (8 bits) | ESI (24 bits)
MAX_ESI = (1 << 24) - 1
MAX_SYMBOL = 65528  # RFC 6330's symbol size is a u16, and the library wants multiples of 8


def supported(page_size: int) -> bool:
    """Whether pages of this size can be RaptorQ symbols (else repair is page by page)."""
    return 0 < page_size <= MAX_SYMBOL and page_size % 8 == 0


def _packet(esi: int, symbol: bytes | memoryview) -> bytes:
    return _PAYLOAD_ID.pack(esi) + bytes(symbol)  # source block number 0: one block per object


class BlockEncoder:
    """Repair symbols of one block. Encoding costs a few milliseconds per MiB, so callers keep
    the encoder of a block while its repair rounds last."""

    def __init__(self, block_data: bytes, symbol_size: int, pages: int) -> None:
        if not supported(symbol_size):
            raise ValueError(f"symbol size {symbol_size} is not usable for RaptorQ")
        if len(block_data) != pages * symbol_size:
            raise ValueError("block data must be pages * symbol_size bytes (pad short pages)")
        self._encoder = raptorq.Encoder.with_defaults(block_data, symbol_size)
        self._pages = pages
        self._symbols: list[bytes] = []  # repair symbols generated so far, esi = pages + i

    def symbol(self, esi: int) -> bytes:
        if not self._pages <= esi <= MAX_ESI:
            raise ValueError(f"repair symbol id {esi} out of range")
        index = esi - self._pages
        if index >= len(self._symbols):
            # The library regenerates from the start: ask for room to spare.
            count = max(index + 1, 2 * len(self._symbols), 16)
            packets = self._encoder.get_encoded_packets(count)
            self._symbols = [p[4:] for p in packets[self._pages :]]
        return self._symbols[index]


class BlockDecoder:
    """Collects symbols of one block until the pages it lacks can be rebuilt."""

    def __init__(self, pages: int, symbol_size: int) -> None:
        self.pages = pages
        self.symbol_size = symbol_size
        self._decoder = raptorq.Decoder.with_defaults(pages * symbol_size, symbol_size)
        self.result: bytes | None = None

    def add(self, esi: int, symbol: bytes | memoryview) -> bytes | None:
        """Feed one symbol (source page padded to the symbol size, or repair symbol); returns
        the whole block's bytes once it can be decoded."""
        if self.result is None:
            out = self._decoder.decode(_packet(esi, symbol))
            if out is not None:
                self.result = bytes(out)
        return self.result
