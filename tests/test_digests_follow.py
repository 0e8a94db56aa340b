"""Content digests that follow the data: the master hashes each file from the bytes it reads
to send it (as rsync computes its whole-file checksum while sending), instead of reading the
whole source once more before the transfer; the targets check every file against them.
"""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import msgspec
import pytest
from conftest import rsync_differences

from mrsync import cli, exitcodes
from mrsync.io import source as source_module
from mrsync.io.source import FilePages
from mrsync.plan.compare import UnsafePath, validate_manifest
from mrsync.plan.manifest import Entry, Kind, Manifest
from mrsync.plan.options import SyncOptions
from mrsync.plan.scan import EMPTY_DIGEST, hash_manifest, scan_source

PAGE = 1000


def _digest(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def _source(tmp_path: Path, files: dict[str, bytes]) -> tuple[bytes, Manifest]:
    root = tmp_path / "src"
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return os.fsencode(root), scan_source(f"{root}/", hash_files=False)


def _ids(manifest: Manifest) -> dict[str, int]:
    return {os.fsdecode(e.path): i for i, e in enumerate(manifest.entries)}


def test_scan_without_hashing_leaves_digests_to_follow(tmp_path: Path) -> None:
    root, manifest = _source(tmp_path, {"a": b"x" * 5000, "empty": b""})
    os.link(tmp_path / "src" / "a", tmp_path / "src" / "b")
    manifest = scan_source(f"{os.fsdecode(root)}/", hash_files=False,
                           options=SyncOptions(hard_links=True))
    assert manifest.digests_follow
    by_name = {os.fsdecode(e.path): e for e in manifest.entries}
    assert by_name["a"].digest == b""
    assert by_name["b"].digest == b"" and by_name["b"].link >= 0
    assert by_name["empty"].digest == EMPTY_DIGEST  # nothing to read: known at once
    validate_manifest(manifest)
    hashed = scan_source(f"{os.fsdecode(root)}/")
    assert not hashed.digests_follow
    assert {os.fsdecode(e.path): e.digest for e in hashed.entries}["a"] == _digest(b"x" * 5000)


def test_a_file_without_a_digest_is_refused_unless_they_follow() -> None:
    entry = Entry(b"f", Kind.FILE, 0o644, 10, 1_600_000_000 * 10**9, 0, 0)
    validate_manifest(Manifest([entry], digests_follow=True))
    with pytest.raises(UnsafePath):
        validate_manifest(Manifest([entry]))
    with pytest.raises(UnsafePath):  # a wrong-sized digest is never allowed
        validate_manifest(Manifest([msgspec.structs.replace(entry, digest=b"x")],
                                   digests_follow=True))


def test_first_pass_reads_hash_each_file_once(tmp_path: Path) -> None:
    a, b = os.urandom(700_000), os.urandom(3_500)
    root, manifest = _source(tmp_path, {"a": a, "b": b})
    ids = _ids(manifest)
    pages = FilePages(root, manifest, PAGE, digest=[ids["a"], ids["b"]])
    got: dict[int, bytes] = {}
    # The first pass, in runs of 7 pages, with a repair read of an earlier page and a parity
    # read of a whole earlier block in between: only the first pass's bytes are hashed.
    for name, data in (("a", a), ("b", b)):
        obj = ids[name]
        for page in range(0, -(-len(data) // PAGE), 7):
            length = min(7 * PAGE, len(data) - page * PAGE)
            assert bytes(pages.read(obj, page, length)) == data[page * PAGE :][:length]
            if page >= 300:
                pages.read(obj, 3, PAGE)
                for p in range(256, 263):
                    pages.read(obj, p, PAGE)
            got.update(pages.take_digests())
    got.update(pages.finish_digests())
    assert got == {ids["a"]: _digest(a), ids["b"]: _digest(b)}
    assert pages.take_digests() == []  # each digest is handed out once


def test_out_of_order_reads_are_hashed_at_the_end(tmp_path: Path) -> None:
    data = os.urandom(900_000)
    root, manifest = _source(tmp_path, {"f": data})
    obj = _ids(manifest)["f"]
    pages = FilePages(root, manifest, PAGE, digest=[obj])
    pages.read(obj, 500, PAGE)  # a gap before it: not the first pass's order
    assert pages.take_digests() == []
    assert pages.finish_digests() == [(obj, _digest(data))]


def test_a_file_that_shrank_or_grew_while_sent(tmp_path: Path) -> None:
    root, manifest = _source(tmp_path, {"shrank": b"s" * 50_000, "grew": b"g" * 50_000})
    ids = _ids(manifest)
    (tmp_path / "src" / "shrank").write_bytes(b"s" * 20_000)
    (tmp_path / "src" / "grew").write_bytes(b"g" * 80_000)
    pages = FilePages(root, manifest, PAGE, digest=ids.values())
    for name in ("shrank", "grew"):
        for page in range(50):
            pages.read(ids[name], page, PAGE)
    got = dict(pages.finish_digests())
    assert got[ids["shrank"]] == b""  # zeros were sent where its bytes were gone: refused
    assert got[ids["grew"]] == _digest(b"g" * 50_000)  # the announced bytes, as sent
    assert pages.short_reads == {ids["shrank"]}


def _forbid_hashing_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    """The master in this process must not hash a file before sending it (the targets, other
    processes, are not affected)."""
    from mrsync.plan import scan

    def refuse(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the master hashed a file up front")

    monkeypatch.setattr(scan, "hash_file", refuse)


def test_targets_refuse_a_file_the_master_could_not_read_whole(
    tmp_path: Path, port: int, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """End to end, the master in this process: a file comes up short while it is sent. The
    targets get its zero-filled pages, the digest says no, and they keep it out; the rest
    arrives, and the exit status says partial."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "fine").write_bytes(os.urandom(300_000))
    (src / "vanishing").write_bytes(os.urandom(300_000))
    real_pread = source_module.os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        if os.readlink(f"/proc/self/fd/{fd}").endswith("vanishing"):
            return data[: max(0, 100_000 - offset)]  # it was cut to 100 kB while sent
        return data

    monkeypatch.setattr(source_module.os, "pread", pread)
    _forbid_hashing_up_front(monkeypatch)  # the refusal must come from the digest that follows
    dests = [tmp_path / "t1", tmp_path / "t2"]
    code = cli.main(["-P", str(port), "--no-progress", f"{src}/", *map(str, dests)])
    err = capsys.readouterr().err
    assert code == exitcodes.PARTIAL, err
    assert "vanishing: changed while being sent; targets refuse it" in err
    for d in dests:
        assert (d / "fine").read_bytes() == (src / "fine").read_bytes()
        assert not (d / "vanishing").exists()
        assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []  # no temp left
    # And once the source holds still, the next run completes them.
    monkeypatch.setattr(source_module.os, "pread", real_pread)
    assert cli.main(["-P", str(port), "--no-progress", f"{src}/", *map(str, dests)]) == 0
    for d in dests:
        assert rsync_differences(src, d) == ""


def test_hash_manifest_fills_in_what_the_scan_left_out(tmp_path: Path) -> None:
    root, follow = _source(tmp_path, {"a": os.urandom(70_000), "b": b"bb", "empty": b""})
    os.link(tmp_path / "src" / "a", tmp_path / "src" / "hard")
    follow = scan_source(f"{os.fsdecode(root)}/", hash_files=False,
                         options=SyncOptions(hard_links=True))
    filled = hash_manifest(follow, root)
    hashed = scan_source(f"{os.fsdecode(root)}/", options=SyncOptions(hard_links=True))
    assert not filled.digests_follow
    assert filled.entries == hashed.entries


def test_many_files_times_many_targets_put_the_digests_in_the_manifest(
    tmp_path: Path, port: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the budget for digests on the control streams, the master hashes up front and
    the digests travel once, in the manifest; the result is the same."""
    from mrsync import job

    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(os.urandom(10_000))
    calls: list[int] = []
    real = job.hash_manifest

    def counted(*args: object, **kwargs: object) -> Manifest:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(job, "hash_manifest", counted)
    monkeypatch.setattr(job, "DIGESTS_FOLLOW_MAX_BYTES", 5 * 40 * 2 - 1)  # 5 files, 2 targets
    dests = [tmp_path / "t1", tmp_path / "t2"]
    assert cli.main(["-P", str(port), "--no-progress", f"{src}/", *map(str, dests)]) == 0
    assert calls == [1]
    for d in dests:
        assert rsync_differences(src, d) == ""
    calls.clear()
    monkeypatch.setattr(job, "DIGESTS_FOLLOW_MAX_BYTES", 5 * 40 * 2)  # within: they follow
    _forbid_hashing_up_front(monkeypatch)
    (src / "f0").write_bytes(os.urandom(10_000))
    assert cli.main(["-P", str(port), "--no-progress", f"{src}/", *map(str, dests)]) == 0
    assert calls == []
    for d in dests:
        assert rsync_differences(src, d) == ""


def test_digests_owed_when_the_first_pass_never_got_there(tmp_path: Path) -> None:
    """The group's flow can end early (every target that stayed with it failed) while a
    target that sat out still waits for the digests of files never read: they are hashed
    from the files, once."""
    a, b = os.urandom(40_000), os.urandom(5_000)
    root, manifest = _source(tmp_path, {"a": a, "b": b})
    ids = _ids(manifest)
    pages = FilePages(root, manifest, PAGE, digest=ids.values())
    pages.read(ids["a"], 0, PAGE)  # the first page of one file only
    assert dict(pages.finish_digests()) == {ids["a"]: _digest(a), ids["b"]: _digest(b)}
    assert pages.finish_digests() == []
