"""Parity: ISA-L (when built) and zfec compute the same code, and a block comes back whole."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import zfec

from mrsync.engine import fec
from mrsync.speedups import isal_rs

needs_isal = pytest.mark.skipif(isal_rs is None, reason="mrsync._isal_rs not built here")


def _pages(rng: random.Random, k: int, size: int) -> list[bytes]:
    return [rng.randbytes(size) for _ in range(k)]


@pytest.fixture(params=["isal", "zfec"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "isal":
        if isal_rs is None:
            pytest.skip("mrsync._isal_rs not built here")
    else:
        monkeypatch.setattr(fec, "isal_rs", None)
    return str(request.param)


def test_coefficients_are_zfecs_code() -> None:
    """Row r of the coefficients, applied to the pages, is zfec's repair symbol k + r."""
    rng = random.Random(1)
    k, size = 16, 40
    pages = _pages(rng, k, size)
    coef = fec.coefficients(k)
    assert len(coef) == (256 - k) * k
    for esi in (k, k + 1, 200, 255):
        want = bytes(zfec.Encoder(k, 256).encode(pages, [esi])[0])
        row = coef[(esi - k) * k : (esi - k + 1) * k]
        got = bytearray(size)
        for j, c in enumerate(row):
            for b in range(size):
                got[b] ^= _gf_mul(c, pages[j][b])
        assert bytes(got) == want


def _gf_mul(a: int, b: int) -> int:
    """GF(2^8) modulo x^8+x^4+x^3+x^2+1, the field of zfec and ISA-L."""
    out = 0
    while b:
        if b & 1:
            out ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return out


@pytest.mark.parametrize("k", [1, 7, 128, 192, 255])
def test_symbols_are_byte_identical_to_zfec(backend: str, k: int) -> None:
    rng = random.Random(k)
    size = 1416
    pages = _pages(rng, k, size)
    encoder = fec.BlockEncoder(pages)
    for esi in sorted({k, min(255, k + 3)}):  # k = 255 has one repair symbol: 255
        assert encoder.symbol(esi, due=3) == bytes(zfec.Encoder(k, 256).encode(pages, [esi])[0])


@pytest.mark.parametrize("seed", range(12))
def test_recover_block_rebuilds_lost_pages(backend: str, seed: int) -> None:
    rng = random.Random(seed)
    k = rng.choice([1, 2, 5, 32, 128, 200])
    size = rng.choice([1, 100, 1416])
    pages = _pages(rng, k, size)
    lost = sorted(rng.sample(range(k), rng.randint(0, min(k, 256 - k, 20))))
    # Any repair symbols will do, as many as pages were lost (an MDS code), plus a spare.
    esis = rng.sample(range(k, 256), min(256 - k, len(lost) + 1))
    encoder = fec.BlockEncoder(pages)
    parity = {esi: encoder.symbol(esi) for esi in esis}
    # The receiver's layout: a byte of its own, k flags, k pages.
    block = bytearray(1 + k + k * size)
    for i, page in enumerate(pages):
        if i not in lost:
            block[1 + i] = 1
            block[1 + k + i * size : 1 + k + (i + 1) * size] = page
    assert fec.recover_block(k, size, block, 1, 1 + k, parity) == len(lost)
    assert block[0] == 0
    assert block[1 : 1 + k] == b"\x01" * k
    assert bytes(block[1 + k :]) == b"".join(pages)


def test_recover_block_needs_enough_parity(backend: str) -> None:
    rng = random.Random(5)
    k, size = 8, 64
    pages = _pages(rng, k, size)
    block = bytearray(k + k * size)
    for i in range(2, k):
        block[i] = 1
        block[k + i * size : k + (i + 1) * size] = pages[i]
    parity = {9: fec.BlockEncoder(pages).symbol(9)}
    with pytest.raises(ValueError):
        fec.recover_block(k, size, block, 0, k, parity)


@needs_isal
def test_isal_refuses_what_would_overrun() -> None:
    assert isal_rs is not None
    coef = fec.coefficients(4)
    with pytest.raises(ValueError):
        isal_rs.recover(coef, 4, 10, bytearray(20), 0, 4, [])  # block shorter than 4 pages
    with pytest.raises(ValueError):
        isal_rs.recover(coef[:10], 4, 10, bytearray(44), 0, 4, [])
    block = bytearray(4 + 40)
    with pytest.raises(ValueError):  # the same repair row twice
        isal_rs.recover(coef, 4, 10, block, 0, 4, [(0, bytes(10)), (0, bytes(10))])
    with pytest.raises(ValueError):
        isal_rs.encode(isal_rs.tables(coef, 4, 2), 4, 1, 2, [bytes(10)] * 4, 10)  # row 2 absent
    with pytest.raises(ValueError):
        isal_rs.encode(isal_rs.tables(coef, 4, 2), 4, 0, 1, [bytes(9)] * 4, 10)  # short page


def test_isal_is_built_where_its_header_is() -> None:
    """Where ISA-L's header exists (CI installs libisal-dev), the build must not silently
    leave mrsync on zfec's slower arithmetic."""
    if os.environ.get("MRSYNC_PURE_PYTHON", "") not in ("", "0"):
        pytest.skip("compiled modules turned off")
    if not Path("/usr/include/isa-l/erasure_code.h").is_file():
        pytest.skip("ISA-L's header is not installed")
    assert isal_rs is not None


def test_compiled_modules_are_refused_when_stale_absent_or_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mrsync import speedups as loader

    assert loader._load("_no_such_module") is None
    if isal_rs is not None:
        assert loader._load("_isal_rs", API_VERSION=loader.ISAL_API_VERSION) is isal_rs
        assert loader._load("_isal_rs", API_VERSION=loader.ISAL_API_VERSION + 1) is None
        monkeypatch.setenv("MRSYNC_PURE_PYTHON", "1")
        assert loader._load("_isal_rs", API_VERSION=loader.ISAL_API_VERSION) is None
