"""The running digest: a file hashed while written, in any order, equals the file's digest."""

from __future__ import annotations

import os
import random
from pathlib import Path

import blake3
import pytest

from mrsync.io import running_digest, store
from mrsync.io.running_digest import RunningDigest
from mrsync.io.store import FileError, FileStore
from mrsync.plan.manifest import Entry, Kind, Manifest

STEP = 64 * 1024
PAGE = 1416


@pytest.fixture(autouse=True)
def small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(running_digest, "STEP", STEP)
    monkeypatch.setattr(store, "RUNNING_DIGEST_MIN", 2 * STEP)


def _pages(size: int) -> list[int]:
    return list(range(0, size, PAGE))


def _write_all(path: Path, data: bytes, order: list[int]) -> tuple[RunningDigest, int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, len(data))
    rd = RunningDigest(len(data))
    for at in order:
        chunk = data[at : at + PAGE]
        os.pwrite(fd, chunk, at)
        rd.wrote(fd, at, len(chunk))
    return rd, fd


@pytest.mark.parametrize("seed", range(8))
def test_any_order_gives_the_files_digest(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(rng.randint(1, 5 * STEP))
    order = _pages(len(data))
    if seed % 2:
        rng.shuffle(order)
    else:  # in order, but with losses that come back later, as parity brings them
        late = set(rng.sample(order, len(order) // 20))
        order = [p for p in order if p not in late] + sorted(late)
    rd, fd = _write_all(tmp_path / "f", data, order)
    try:
        assert rd.valid
        assert rd.digest(fd) == blake3.blake3(data).digest()
    finally:
        os.close(fd)


def test_in_order_leaves_less_than_a_step_to_hash_at_the_end(tmp_path: Path) -> None:
    data = os.urandom(10 * STEP + 123)
    rd, fd = _write_all(tmp_path / "f", data, _pages(len(data)))
    try:
        assert len(data) - rd.hashed < STEP
        assert rd.hashed % STEP == 0
        assert rd.digest(fd) == blake3.blake3(data).digest()
    finally:
        os.close(fd)


def test_rewriting_a_hashed_part_falls_back_to_a_whole_hash(tmp_path: Path) -> None:
    data = bytearray(os.urandom(4 * STEP))
    rd, fd = _write_all(tmp_path / "f", bytes(data), _pages(len(data)))
    try:
        assert rd.hashed > PAGE
        data[:PAGE] = bytes(PAGE)  # new content where the digest has already been
        os.pwrite(fd, data[:PAGE], 0)
        rd.wrote(fd, 0, PAGE)
        assert not rd.valid
        assert rd.digest(fd) == blake3.blake3(bytes(data)).digest()
    finally:
        os.close(fd)


def test_holes_count_as_written_zeros(tmp_path: Path) -> None:
    data = bytearray(os.urandom(3 * STEP))
    data[STEP : 2 * STEP] = bytes(STEP)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, len(data))
        rd = RunningDigest(len(data))
        for at in _pages(len(data)):
            chunk = data[at : at + PAGE]
            if any(chunk):
                os.pwrite(fd, chunk, at)
            rd.wrote(fd, at, len(chunk))  # the store reports a skipped zero page too
        assert rd.hashed >= 2 * STEP
        assert rd.digest(fd) == blake3.blake3(bytes(data)).digest()
    finally:
        os.close(fd)


def _entry(path: bytes, data: bytes) -> Entry:
    return Entry(path, Kind.FILE, 0o644, len(data), 1_600_000_000 * 10**9, os.getuid(),
                 os.getgid(), b"", blake3.blake3(data).digest())


def test_store_checks_large_files_with_the_running_digest(tmp_path: Path) -> None:
    rng = random.Random(3)
    data = rng.randbytes(6 * STEP + 77)
    bad = bytearray(data)
    bad[5 * STEP] ^= 1
    manifest = Manifest([_entry(b"good", data), _entry(b"bad", data)])
    with FileStore(str(tmp_path), manifest) as st:
        st.prepare()
        for file_id, content in ((0, data), (1, bytes(bad))):
            pages = _pages(len(content))
            for i in range(0, len(pages), 16):  # runs of 16 pages, as targets write them
                run = [content[p : p + PAGE] for p in pages[i : i + 16]]
                st.write_pages(file_id, pages[i], run)
        st.flush()
        # The digest ran along: less than a step is left for the check.
        assert len(data) - st._running[0].hashed < STEP
        assert st.finish_file(0) is None
        assert st.finish_file(1) == FileError("bad", "digest mismatch")
    assert (tmp_path / "good").read_bytes() == data
    assert not (tmp_path / "bad").exists()
