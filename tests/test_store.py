"""The receiver's file store: temp files, digest check, rename, metadata, refusing symlinks."""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

import blake3
import pytest

from mrsync.io import store as store_mod
from mrsync.io.store import FileError, FileStore, StoreError
from mrsync.plan.compare import compare, validate_manifest
from mrsync.plan.manifest import Entry, Kind, Manifest
from mrsync.plan.options import SyncOptions
from mrsync.plan.scan import scan_source, source_root

PAGE = 1024
MTIME = 1_600_000_000_123_456_789


def digest(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def F(path: bytes, data: bytes, mode: int = 0o640, mtime: int = MTIME) -> Entry:
    return Entry(
        path, Kind.FILE, mode, len(data), mtime, os.getuid(), os.getgid(), b"", digest(data)
    )


def D(path: bytes, mode: int = 0o755, mtime: int = MTIME) -> Entry:
    return Entry(path, Kind.DIR, mode, 0, mtime, os.getuid(), os.getgid())


def L(path: bytes, target: bytes, mtime: int = MTIME) -> Entry:
    return Entry(path, Kind.SYMLINK, 0o777, 0, mtime, os.getuid(), os.getgid(), target)


def send(store: FileStore, file_id: int, data: bytes, order: list[int] | None = None) -> None:
    pages = list(range(0, len(data), PAGE))
    for i in order if order is not None else pages:
        store.write(file_id, i, data[i : i + PAGE])


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if ".mrsync." in p.name]


def sync(src: str, dest: Path, shuffle: bool = True) -> list[FileError]:
    """scan -> compare -> store, as the receiver would run it (pages shuffled)."""
    manifest = scan_source(src)
    validate_manifest(manifest)
    needs = compare(manifest, str(dest))
    rng = random.Random(7)
    with FileStore(str(dest), manifest) as store:
        store.prepare()
        base = source_root(src)
        for file_id in needs.data:
            path = os.path.join(base, manifest.entries[file_id].path)
            with open(path, "rb") as f:
                data = f.read()
            order = list(range(0, len(data), PAGE))
            if shuffle:
                rng.shuffle(order)
            send(store, file_id, data, order)
            assert store.finish_file(file_id) is None
        errors = store.finish_tree()
    return errors


def snapshot(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Everything a faithful copy must reproduce, by relative path (bytes)."""
    out: dict[bytes, tuple[object, ...]] = {}
    broot = os.fsencode(str(root))
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, broot)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(full), st.st_mtime_ns, st.st_uid, st.st_gid)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", st.st_mode, st.st_mtime_ns, st.st_uid, st.st_gid)
            else:
                with open(full, "rb") as f:
                    content = f.read()
                out[rel] = ("f", st.st_mode, st.st_mtime_ns, st.st_uid, st.st_gid, content)
    return out


@pytest.fixture
def src(tmp_path: Path) -> Path:
    s = tmp_path / "src"
    (s / "sub" / "deep").mkdir(parents=True)
    (s / "emptydir").mkdir()
    (s / "a.txt").write_bytes(b"hello world")
    (s / "big.bin").write_bytes(os.urandom(10 * PAGE + 17))
    (s / "empty").write_bytes(b"")
    (s / "sub" / "b.txt").write_bytes(b"bee" * 1000)
    (s / "sub" / "deep" / "c").write_bytes(os.urandom(3 * PAGE))
    with open(os.path.join(os.fsencode(str(s)), b"caf\xe9 au lait"), "wb") as f:
        f.write(b"non-utf8 name")
    os.symlink("a.txt", s / "link")
    os.symlink("/nowhere/at/all", s / "dangling")
    os.chmod(s / "a.txt", 0o600)
    os.chmod(s / "sub" / "deep", 0o700)
    os.chmod(s / "emptydir", 0o750)
    for i, p in enumerate(sorted(s.rglob("*"), key=lambda p: -len(p.parts))):
        os.utime(p, ns=(MTIME, MTIME + i * 1000), follow_symlinks=False)
    os.utime(s, ns=(MTIME, MTIME - 5))
    return s


# ---------------------------------------------------------------------- whole trees


def test_sync_into_empty_dest_reproduces_tree(src: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    assert sync(str(src) + "/", dest) == []
    assert snapshot(dest) == snapshot(src)
    st, sst = os.stat(dest), os.stat(src)
    assert (st.st_mode, st.st_mtime_ns) == (sst.st_mode, sst.st_mtime_ns)  # root entry "."
    assert leftovers(dest) == []
    # A second run finds nothing to send and changes nothing.
    manifest = scan_source(str(src) + "/")
    assert compare(manifest, str(dest)).data == []
    assert sync(str(src) + "/", dest) == []
    assert snapshot(dest) == snapshot(src)


def test_sync_without_slash_creates_named_dir(src: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    assert sync(str(src), dest) == []
    assert snapshot(dest / "src") == snapshot(src)


def test_metadata_only_change_keeps_inode(src: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    sync(str(src) + "/", dest)
    inode = os.stat(dest / "sub" / "b.txt").st_ino
    os.chmod(src / "sub" / "b.txt", 0o604)
    os.utime(src / "sub", ns=(MTIME, MTIME + 42))
    os.symlink("elsewhere", src / "sub" / "newlink")
    os.utime(src / "sub", ns=(MTIME, MTIME + 43))
    manifest = scan_source(str(src) + "/")
    assert compare(manifest, str(dest)).data == []
    assert sync(str(src) + "/", dest) == []
    assert snapshot(dest) == snapshot(src)
    assert os.stat(dest / "sub" / "b.txt").st_ino == inode


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_owner_applied_as_root(tmp_path: Path) -> None:
    data = b"owned"
    entries = [
        Entry(b"d", Kind.DIR, 0o755, 0, MTIME, 4321, 8765),
        Entry(b"d/f", Kind.FILE, 0o4755, len(data), MTIME, 1234, 5678, b"", digest(data)),
        Entry(b"d/l", Kind.SYMLINK, 0o777, 0, MTIME, 1111, 2222, b"f"),
        Entry(b"d/e", Kind.FILE, 0o600, 0, MTIME, 3333, 4444, b"", digest(b"")),
    ]
    with FileStore(str(tmp_path), Manifest(entries)) as store:
        store.prepare()
        store.write(1, 0, data)
        assert store.finish_file(1) is None
        assert store.finish_tree() == []
    for rel, uid, gid in [("d", 4321, 8765), ("d/f", 1234, 5678), ("d/l", 1111, 2222)]:
        st = os.lstat(tmp_path / rel)
        assert (st.st_uid, st.st_gid) == (uid, gid)
    assert os.stat(tmp_path / "d" / "f").st_mode & 0o7777 == 0o4755  # set-uid survives chown


# ---------------------------------------------------------------------- single files


def test_out_of_order_pages_exact_bytes_mode_mtime(tmp_path: Path) -> None:
    data = os.urandom(20 * PAGE + 5)
    manifest = Manifest([D(b"."), D(b"d", 0o711), F(b"d/f", data, 0o604, MTIME + 7)])
    dest = tmp_path / "dest"
    with FileStore(str(dest), manifest) as store:
        store.prepare()
        order = list(range(0, len(data), PAGE))
        random.Random(1).shuffle(order)
        send(store, 2, data, order)
        send(store, 2, data, order[:3])  # duplicate repairs are harmless
        assert leftovers(dest)  # the temp file exists, the final name does not yet
        assert not (dest / "d" / "f").exists()
        assert store.finish_file(2) is None
        store.write(2, 0, data[:PAGE])  # a late duplicate after finishing is ignored
        assert store.finish_file(2) is None
        assert store.finish_tree() == []
    assert (dest / "d" / "f").read_bytes() == data
    st = os.stat(dest / "d" / "f")
    assert st.st_mode & 0o7777 == 0o604 and st.st_mtime_ns == MTIME + 7
    st = os.stat(dest / "d")
    assert st.st_mode & 0o7777 == 0o711 and st.st_mtime_ns == MTIME
    assert leftovers(dest) == []


def test_digest_mismatch_keeps_old_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"old content")
    data = b"new content!" * 100
    manifest = Manifest([F(b"f", data)])
    with FileStore(str(tmp_path), manifest) as store:
        store.prepare()
        send(store, 0, data[:-1] + b"X")
        err = store.finish_file(0)
        assert err == FileError("f", "digest mismatch")
        assert store.is_failed(0)
        assert store.finish_file(0) == err  # stable outcome
        assert store.finish_tree() == [err]  # not reported twice
        assert store.errors == [err]
    assert (tmp_path / "f").read_bytes() == b"old content"
    assert leftovers(tmp_path) == []


def test_unwritten_pages_are_zeros(tmp_path: Path) -> None:
    data = b"\0" * (5 * PAGE) + b"tail"
    with FileStore(str(tmp_path), Manifest([F(b"f", data)])) as store:
        store.prepare()
        store.write(0, 5 * PAGE, b"tail")  # the zero pages never arrive: a hole reads as zeros
        assert store.finish_file(0) is None
    assert (tmp_path / "f").read_bytes() == data


def test_write_outside_the_file_is_a_caller_bug(tmp_path: Path) -> None:
    manifest = Manifest([F(b"f", b"abc"), D(b"d")])
    with FileStore(str(tmp_path), manifest) as store:
        store.prepare()
        with pytest.raises(ValueError):
            store.write(0, 2, b"xy")
        with pytest.raises(ValueError):
            store.write(0, -1, b"x")
        with pytest.raises(ValueError):
            store.write(1, 0, b"x")  # a DIR
        with pytest.raises(ValueError):
            store.finish_file(5)


def test_write_before_prepare_is_a_caller_bug(tmp_path: Path) -> None:
    with (
        FileStore(str(tmp_path), Manifest([F(b"f", b"abc")])) as store,
        pytest.raises(RuntimeError),
    ):
        store.write(0, 0, b"abc")


def test_huge_sparse_file_past_4gib(tmp_path: Path) -> None:
    size = (5 << 30) + PAGE
    page = os.urandom(PAGE)
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    zeros = bytes(64 << 20)
    for _ in range((5 << 30) // len(zeros)):
        hasher.update(zeros)
    hasher.update(page)
    entry = Entry(b"huge", Kind.FILE, 0o644, size, MTIME, 0, 0, b"", hasher.digest())
    with FileStore(str(tmp_path), Manifest([entry])) as store:
        store.prepare()
        store.write(0, 5 << 30, page)
        (temp,) = [p for p in tmp_path.iterdir() if ".mrsync." in p.name]
        st = os.stat(temp)
        assert st.st_size == size and st.st_blocks * 512 < (1 << 20)  # sparse
        assert store.finish_file(0) is None
    st = os.stat(tmp_path / "huge")
    assert st.st_size == size and st.st_blocks * 512 < (1 << 20)
    with open(tmp_path / "huge", "rb") as f:
        f.seek(5 << 30)
        assert f.read() == page


def test_many_files_with_small_fd_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "MAX_OPEN_FILES", 4)
    monkeypatch.setattr(store_mod, "MAX_DIR_FDS", 3)
    rng = random.Random(3)
    entries = [D(b"d%d" % i) for i in range(10)]
    contents = {}
    for i in range(300):
        data = rng.randbytes(rng.randrange(1, 4 * PAGE))
        path = b"d%d/f%d" % (i % 10, i)
        contents[len(entries)] = data
        entries.append(F(path, data))
    manifest = Manifest(entries)
    validate_manifest(manifest)
    writes = [(fid, off) for fid, data in contents.items() for off in range(0, len(data), PAGE)]
    rng.shuffle(writes)  # all 300 files in flight at once
    before = len(os.listdir("/proc/self/fd"))
    with FileStore(str(tmp_path), manifest) as store:
        store.prepare()
        for fid, off in writes:
            store.write(fid, off, contents[fid][off : off + PAGE])
            assert len(os.listdir("/proc/self/fd")) <= before + 4 + 3 + 1
        for fid in contents:
            assert store.finish_file(fid) is None
        assert store.finish_tree() == []
    for fid, data in contents.items():
        assert (tmp_path / os.fsdecode(entries[fid].path)).read_bytes() == data
    assert len(os.listdir("/proc/self/fd")) == before


# ---------------------------------------------------------------------- finish_tree


def test_finish_tree_symlinks_empty_files_dirs(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "d").mkdir(parents=True)
    os.symlink("old-target", dest / "d" / "l1")  # wrong target: replaced
    os.symlink("same", dest / "d" / "l2")  # identical: left alone (only metadata)
    (dest / "d" / "l3").mkdir()  # a directory where a symlink goes
    (dest / "d" / "l3" / "junk").write_bytes(b"x")
    (dest / "d" / "e1").write_bytes(b"not empty yet")  # becomes empty
    (dest / "d" / "e2").mkdir()  # a directory where an empty file goes
    l2_inode = os.lstat(dest / "d" / "l2").st_ino
    manifest = Manifest(
        [
            D(b"."),
            D(b"d", 0o750, MTIME + 1),
            L(b"d/l1", b"new-target"),
            L(b"d/l2", b"same", MTIME + 2),
            L(b"d/l3", b"../x"),
            F(b"d/e1", b"", 0o600, MTIME + 3),
            F(b"d/e2", b""),
            F(b"d/e3", b"", 0o444),
            D(b"d/sub", 0o500, MTIME + 4),
            D(b"d/sub/inner", 0o700, MTIME + 5),
        ]
    )
    validate_manifest(manifest)
    with FileStore(str(dest), manifest) as store:
        store.prepare()
        assert store.finish_tree() == []
    assert os.readlink(dest / "d" / "l1") == "new-target"
    assert os.readlink(dest / "d" / "l3") == "../x"
    assert os.lstat(dest / "d" / "l2").st_ino == l2_inode
    assert os.lstat(dest / "d" / "l2").st_mtime_ns == MTIME + 2
    for name, mode, mtime in [("e1", 0o600, MTIME + 3), ("e2", 0o640, MTIME), ("e3", 0o444, MTIME)]:
        st = os.lstat(dest / "d" / name)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0
        assert (st.st_mode & 0o7777, st.st_mtime_ns) == (mode, mtime)
    for rel, mode, mtime in [("d", 0o750, MTIME + 1), ("d/sub", 0o500, MTIME + 4)]:
        st = os.lstat(dest / rel)
        assert (st.st_mode & 0o7777, st.st_mtime_ns) == (mode, mtime)
    assert os.lstat(dest / "d/sub/inner").st_mtime_ns == MTIME + 5
    assert leftovers(dest) == []
    os.chmod(dest / "d" / "sub", 0o700)  # let pytest clean up


def test_file_replaces_dir_and_dir_replaces_file(tmp_path: Path) -> None:
    (tmp_path / "was-dir" / "x" / "y").mkdir(parents=True)
    (tmp_path / "was-dir" / "x" / "y" / "z").write_bytes(b"deep")
    (tmp_path / "was-file").write_bytes(b"I was a file")
    os.symlink("/", tmp_path / "was-link")
    data = b"now a file"
    manifest = Manifest(
        [F(b"was-dir", data), D(b"was-file"), F(b"was-file/in", data), D(b"was-link")]
    )
    with FileStore(str(tmp_path), manifest) as store:
        store.prepare()
        assert (tmp_path / "was-dir" / "x").is_dir()  # kept until the new file is verified
        send(store, 0, data)
        send(store, 2, data)
        assert store.finish_file(0) is None
        assert store.finish_file(2) is None
        assert store.finish_tree() == []
    assert (tmp_path / "was-dir").read_bytes() == data
    assert (tmp_path / "was-file" / "in").read_bytes() == data
    assert not (tmp_path / "was-link").is_symlink() and (tmp_path / "was-link").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["was-dir", "was-file", "was-link"]


def test_dir_in_the_way_kept_when_file_fails(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_bytes(b"keep me")
    with FileStore(str(tmp_path), Manifest([F(b"d", b"data")])) as store:
        store.prepare()
        store.write(0, 0, b"DATA")
        assert store.finish_file(0) == FileError("d", "digest mismatch")
    assert (tmp_path / "d" / "keep").read_bytes() == b"keep me"


def test_not_received_is_reported(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"old")
    manifest = Manifest([F(b"f", b"new content"), F(b"g", b"other")])
    with FileStore(str(tmp_path), manifest) as store:
        store.prepare()
        store.write(1, 0, b"oth")
        store.abort_file(1)  # the caller gave up on it
        errors = store.finish_tree()
    assert errors == [FileError("f", "not received"), FileError("g", "not received")]
    assert (tmp_path / "f").read_bytes() == b"old" and not (tmp_path / "g").exists()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------- never outside DEST


def test_symlinked_dir_in_dest_is_replaced_not_followed(tmp_path: Path) -> None:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (outside / "f").write_bytes(b"precious")
    os.symlink(outside, dest / "d")
    data = b"payload"
    manifest = Manifest([D(b"d"), F(b"d/f", data)])
    needs = compare(manifest, str(dest))
    assert needs.data == [1]
    with FileStore(str(dest), manifest) as store:
        store.prepare()
        send(store, 1, data)
        assert store.finish_file(1) is None
        assert store.finish_tree() == []
    assert not (dest / "d").is_symlink()
    assert (dest / "d" / "f").read_bytes() == data
    assert (outside / "f").read_bytes() == b"precious"
    assert os.listdir(outside) == ["f"]


def test_symlink_planted_after_prepare_is_not_written_through(tmp_path: Path) -> None:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    outside.mkdir()
    data = b"payload"
    manifest = Manifest([D(b"d"), D(b"d/e"), F(b"d/e/f", data), F(b"d/g", data)])
    with FileStore(str(dest), manifest) as store:
        store.prepare()
        # Someone swaps d for a symlink; drop the store's cached walk so it looks again.
        (dest / "d" / "e").rmdir()
        (dest / "d").rmdir()
        os.symlink(outside, dest / "d")
        store._forget_dirs(b"d")
        store.write(2, 0, data)
        err = store.finish_file(2)
        assert err is not None and err.path == "d/e/f"
        assert "not a directory" in err.reason and "symlink" in err.reason
        store.write(3, 0, data)
        assert store.finish_file(3) is not None
    assert os.listdir(outside) == []


def test_dest_root_symlink_is_followed_like_rsync(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "alias")
    with FileStore(str(tmp_path / "alias"), Manifest([F(b"f", b"x")])) as store:
        store.prepare()
        store.write(0, 0, b"x")
        assert store.finish_file(0) is None
    assert (real / "f").read_bytes() == b"x"


def test_dest_root_unusable_raises(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    store = FileStore(str(tmp_path / "file"), Manifest([]))
    with pytest.raises(StoreError):
        store.prepare()
    store.close()


# ---------------------------------------------------------------------- errors


def test_enospc_on_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "full").write_bytes(b"old copy")
    good, bad = b"fine" * 500, b"too big" * 500
    manifest = Manifest([F(b"full", bad), F(b"ok", good)])
    real_pwrite = os.pwrite
    with FileStore(str(tmp_path), manifest) as store:
        store.prepare()

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            if offset == PAGE and fd == store._open.get(0):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)
        for off in range(0, len(good), PAGE):
            store.write(0, off, bad[off : off + PAGE])
            store.write(1, off, good[off : off + PAGE])
        assert store.is_failed(0) and not store.is_failed(1)
        err = store.finish_file(0)
        assert err is not None and err.path == "full"
        assert "No space left on device" in err.reason
        assert store.finish_file(1) is None
        assert store.finish_tree() == [err]
    assert (tmp_path / "full").read_bytes() == b"old copy"
    assert (tmp_path / "ok").read_bytes() == good
    assert leftovers(tmp_path) == []


def test_directory_that_cannot_be_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_mkdir = os.mkdir

    def mkdir(path: bytes, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        if path == b"ro":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real_mkdir(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", mkdir)
    manifest = Manifest([D(b"ro"), D(b"ro/sub"), F(b"ro/sub/f", b"x"), F(b"ok", b"y")])
    with FileStore(str(tmp_path), manifest) as store:
        store.prepare()
        assert store.errors == [FileError("ro", "cannot create directory: Read-only file system")]
        store.write(2, 0, b"x")
        store.write(3, 0, b"y")
        err = store.finish_file(2)
        assert err is not None and "ro" in err.reason
        assert store.finish_file(3) is None
        errors = store.finish_tree()
    assert [e.path for e in errors] == ["ro", "ro/sub/f"]
    assert (tmp_path / "ok").read_bytes() == b"y"


def test_undecodable_name_in_error(tmp_path: Path) -> None:
    with FileStore(str(tmp_path), Manifest([F(b"caf\xe9", b"data")])) as store:
        store.prepare()
        store.write(0, 0, b"DATA")
        err = store.finish_file(0)
    assert err == FileError("caf\\xe9", "digest mismatch")
    print(err.path)  # printable


def test_close_removes_unfinished_temps(tmp_path: Path) -> None:
    manifest = Manifest([D(b"d"), F(b"d/a", b"aaaa"), F(b"b", b"bbbb")])
    store = FileStore(str(tmp_path), manifest)
    store.prepare()
    store.write(1, 0, b"aa")
    store.write(2, 0, b"bb")
    assert len(leftovers(tmp_path)) == 2
    store.close()
    store.close()  # idempotent
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "d" / "a").exists() and not (tmp_path / "b").exists()


def test_copy_of_real_tree_with_shutil(src: Path, tmp_path: Path) -> None:
    """A destination copied by other means is recognised as up to date."""
    dest = tmp_path / "dest"
    shutil.copytree(src, dest, symlinks=True)
    os.utime(dest, ns=(MTIME, MTIME - 5))
    assert compare(scan_source(str(src) + "/"), str(dest)).data == []
    assert sync(str(src) + "/", dest) == []
    assert snapshot(dest) == snapshot(src)


def test_read_only_dest_dir_is_updated_and_restored(tmp_path: Path) -> None:
    """A dir whose final mode forbids writing (as non-root) still gets its files updated."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "f").write_bytes(b"old")
    os.chmod(tmp_path / "ro", 0o500)
    data = b"new data"
    manifest = Manifest([D(b"ro", 0o500), F(b"ro/f", data)])
    assert compare(manifest, str(tmp_path)).data == [1]
    with FileStore(str(tmp_path), manifest) as store:
        store.prepare()
        send(store, 1, data)
        assert store.finish_file(1) is None
        assert store.finish_tree() == []
    assert (tmp_path / "ro" / "f").read_bytes() == data
    st = os.stat(tmp_path / "ro")
    assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o500, MTIME)
    os.chmod(tmp_path / "ro", 0o700)  # let pytest clean up


def test_setuid_dropped_when_owner_cannot_be_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A set-uid file whose owner could not be applied must not stay set-uid (as root: a
    set-uid-root program). The failure is reported, the content installed."""
    data = b"#!/bin/sh\n"
    other = os.getuid() + 4242
    entry = Entry(b"prog", Kind.FILE, 0o6755, len(data), MTIME, other, other, b"", digest(data))

    def fchown(fd: int, uid: int, gid: int) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "fchown", fchown)
    with FileStore(str(tmp_path), Manifest([entry])) as store:
        store.prepare()
        store.write(0, 0, data)
        assert store.finish_file(0) is None
        errors = store.finish_tree()
    st = os.stat(tmp_path / "prog")
    assert st.st_mode & 0o7777 == 0o755
    assert (tmp_path / "prog").read_bytes() == data
    if os.geteuid() == 0:
        assert errors == [FileError("prog", "cannot set owner: Operation not permitted")]
    else:
        assert errors == []  # not root: owners are not ours to set


# ---------------------------------------------------------------------- delete


def test_delete_file_tree_symlink_and_missing(tmp_path: Path) -> None:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    (dest / "d" / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    (dest / "f").write_bytes(b"f")
    (dest / "d" / "h").write_bytes(b"h")
    (dest / "d" / "sub" / "g").write_bytes(b"g")
    (dest / "d" / "sub" / "ln").symlink_to(outside)
    (dest / "link").symlink_to(outside)
    (dest / "stay").write_bytes(b"stay")
    with FileStore(str(dest), Manifest([])) as store:
        store.prepare()
        store.delete([b"d/sub/g", b"link", b"d", b"f", b"missing", b"gone/x", b"d/sub"])
        assert store.errors == []
    assert sorted(os.listdir(dest)) == ["stay"]
    assert sorted(os.listdir(outside)) == ["keep"]  # symlink removed as a link, not followed
    assert (outside / "keep").read_bytes() == b"keep"


def test_delete_refuses_paths_outside_dest(tmp_path: Path) -> None:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (outside / "victim").write_bytes(b"v")
    (dest / "ld").symlink_to(outside)
    with FileStore(str(dest), Manifest([])) as store:
        store.prepare()
        store.delete([b"../outside/victim", b"/etc/passwd", b"ld/victim", b".", b"a//b"])
        assert [e.path for e in store.errors] == [
            "../outside/victim",
            "/etc/passwd",
            "ld/victim",
            ".",
            "a//b",
        ]
        assert "symlinks are not followed" in store.errors[2].reason
    assert (outside / "victim").read_bytes() == b"v"
    assert (dest / "ld").is_symlink()


def test_delete_failure_is_recorded_and_rest_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(b"x")
    real_unlink = os.unlink

    def unlink(path: bytes, *, dir_fd: int | None = None) -> None:
        if path == b"b":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)
    with FileStore(str(tmp_path), Manifest([])) as store:
        store.prepare()
        store.delete([b"a", b"b", b"c"])
        assert store.errors == [FileError("b", "cannot delete: Permission denied")]
    assert sorted(os.listdir(tmp_path)) == ["b"]


# ---------------------------------------------------------------------- backup


def test_backup_with_suffix_on_replace_and_delete(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"old f")
    (tmp_path / "f~").write_bytes(b"older backup")  # replaced, as rsync does
    (tmp_path / "e").write_bytes(b"old e")
    (tmp_path / "s").symlink_to("old-target")
    (tmp_path / "gone").write_bytes(b"gone")
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "x").write_bytes(b"x")
    (tmp_path / "tree" / "y~").write_bytes(b"a backup: protected")
    old_ino = os.stat(tmp_path / "f").st_ino
    opts = SyncOptions(backup=True, delete=True)
    manifest = Manifest([F(b"f", b"new f"), F(b"e", b""), L(b"s", b"new-target")])
    with FileStore(str(tmp_path), manifest, options=opts) as store:
        store.prepare()
        store.delete([b"gone", b"tree/sub/x", b"tree/sub", b"tree", b"f~"])
        send(store, 0, b"new f")
        assert store.finish_file(0) is None
        assert store.finish_tree() == []
    assert (tmp_path / "f").read_bytes() == b"new f"
    assert (tmp_path / "f~").read_bytes() == b"old f"
    assert os.stat(tmp_path / "f~").st_ino == old_ino  # linked, not copied
    assert (tmp_path / "e").read_bytes() == b""
    assert (tmp_path / "e~").read_bytes() == b"old e"
    assert os.readlink(tmp_path / "s") == "new-target"
    assert os.readlink(tmp_path / "s~") == "old-target"
    assert not (tmp_path / "gone").exists()
    assert (tmp_path / "gone~").read_bytes() == b"gone"
    # The tree's files are kept as backups, so the directories stay, holding only backups.
    assert (tmp_path / "tree" / "sub" / "x~").read_bytes() == b"x"
    assert sorted(os.listdir(tmp_path / "tree" / "sub")) == ["x~"]
    assert sorted(os.listdir(tmp_path / "tree")) == ["sub", "y~"]
    assert (tmp_path / "tree" / "y~").read_bytes() == b"a backup: protected"
    assert leftovers(tmp_path) == []


def test_backup_dir_with_nested_paths(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "a" / "b").mkdir(parents=True)
    (dest / "a" / "b" / "f").write_bytes(b"old f")
    (dest / "a" / "b" / "del").write_bytes(b"del")
    (dest / "t" / "u").mkdir(parents=True)
    (dest / "t" / "u" / "file").write_bytes(b"file")
    (dest / "t" / "ln").symlink_to("/etc")
    opts = SyncOptions(backup=True, backup_dir="bak/run1", suffix="")
    manifest = Manifest([D(b"a"), D(b"a/b"), F(b"a/b/f", b"new f")])
    with FileStore(str(dest), manifest, options=opts) as store:
        store.prepare()
        store.delete([b"a/b/del", b"t/u/file", b"t/u", b"t/ln", b"t", b"bak/run1", b"bak"])
        send(store, 2, b"new f")
        assert store.finish_file(2) is None
        assert store.finish_tree() == []
    bak = dest / "bak" / "run1"
    assert (dest / "a" / "b" / "f").read_bytes() == b"new f"
    assert (bak / "a" / "b" / "f").read_bytes() == b"old f"
    assert (bak / "a" / "b" / "del").read_bytes() == b"del"
    assert (bak / "t" / "u" / "file").read_bytes() == b"file"
    assert os.readlink(bak / "t" / "ln") == "/etc"
    assert not (dest / "t").exists() and not (dest / "a" / "b" / "del").exists()
    assert sorted(os.listdir(dest)) == ["a", "bak"]  # the backup dir is never deleted


def test_absolute_backup_dir_and_suffix(tmp_path: Path) -> None:
    dest, bak = tmp_path / "dest", tmp_path / "backups"
    (dest / "d").mkdir(parents=True)
    (dest / "d" / "f").write_bytes(b"old")
    opts = SyncOptions(backup=True, backup_dir=str(bak), suffix=".1")
    with FileStore(str(dest), Manifest([D(b"d"), F(b"d/f", b"new")]), options=opts) as store:
        store.prepare()
        send(store, 1, b"new")
        assert store.finish_file(1) is None
        assert store.finish_tree() == []
    assert (bak / "d" / "f.1").read_bytes() == b"old"
    assert stat.S_IMODE(os.stat(bak / "d").st_mode) == 0o700


def test_backup_across_filesystems_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "f").write_bytes(b"old" * 1000)
    os.utime(tmp_path / "f", ns=(MTIME, MTIME))
    real_link = os.link

    def link(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", link)
    opts = SyncOptions(backup=True, backup_dir="bak")
    with FileStore(str(tmp_path), Manifest([F(b"f", b"new")]), options=opts) as store:
        store.prepare()
        send(store, 0, b"new")
        assert store.finish_file(0) is None
    monkeypatch.setattr(os, "link", real_link)
    assert (tmp_path / "bak" / "f~").read_bytes() == b"old" * 1000
    assert os.stat(tmp_path / "bak" / "f~").st_mtime_ns == MTIME
    assert (tmp_path / "f").read_bytes() == b"new"
    assert leftovers(tmp_path) == []


def test_backup_failure_keeps_old_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"old")
    (tmp_path / "bak").write_bytes(b"not a directory")
    opts = SyncOptions(backup=True, backup_dir="bak")
    with FileStore(str(tmp_path), Manifest([F(b"f", b"new")]), options=opts) as store:
        store.prepare()
        send(store, 0, b"new")
        err = store.finish_file(0)
        assert err is not None and "cannot make backup" in err.reason
    assert (tmp_path / "f").read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_dir_in_the_way_moved_to_backup(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "y").write_bytes(b"y")
    opts = SyncOptions(backup=True)
    with FileStore(str(tmp_path), Manifest([F(b"x", b"file")]), options=opts) as store:
        store.prepare()
        send(store, 0, b"file")
        assert store.finish_file(0) is None
    assert (tmp_path / "x").read_bytes() == b"file"
    assert (tmp_path / "x~" / "y").read_bytes() == b"y"


def test_backup_option_checks(tmp_path: Path) -> None:
    m = Manifest([])
    with pytest.raises(ValueError, match="--backup and -X cannot be combined"):
        FileStore(str(tmp_path), m, options=SyncOptions(backup=True, delete_first=True))
    with pytest.raises(ValueError, match="slashes"):
        FileStore(str(tmp_path), m, options=SyncOptions(backup=True, suffix="a/b"))
    with pytest.raises(ValueError, match="empty"):
        FileStore(str(tmp_path), m, options=SyncOptions(backup=True, suffix=""))
    FileStore(str(tmp_path), m, options=SyncOptions(backup=True, suffix="", backup_dir="b"))
    assert FileStore(str(tmp_path), m, options=SyncOptions(numeric_ids=True)).numeric_ids
    assert not FileStore(
        str(tmp_path), m, options=SyncOptions(numeric_ids=True), numeric_ids=False
    ).numeric_ids


# ---------------------------------------------------------------------- -X (delete first)


def test_delete_first_unlinks_old_before_writing(tmp_path: Path) -> None:
    old = tmp_path / "f"
    old.write_bytes(b"o" * 5000)
    (tmp_path / "probe").hardlink_to(old)  # sees the old inode's link count
    data = b"n" * 3000
    opts = SyncOptions(delete_first=True)
    with FileStore(str(tmp_path), Manifest([F(b"f", data)]), options=opts) as store:
        store.prepare()
        assert os.stat(tmp_path / "probe").st_nlink == 2
        store.write(0, 0, data[:PAGE])
        assert not old.exists()
        assert os.stat(tmp_path / "probe").st_nlink == 1
        send(store, 0, data)
        assert store.finish_file(0) is None
    assert old.read_bytes() == data


def test_delete_first_failure_says_file_is_gone(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"old")
    opts = SyncOptions(delete_first=True)
    with FileStore(str(tmp_path), Manifest([F(b"f", b"new")]), options=opts) as store:
        store.prepare()
        store.write(0, 0, b"bad")
        err = store.finish_file(0)
    assert err is not None and err.reason.startswith("digest mismatch")
    assert "already removed (-X" in err.reason
    assert not (tmp_path / "f").exists()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------- hard links (-H)


def H(path: bytes, data: bytes, link: int) -> Entry:
    e = F(path, data)
    return Entry(e.path, e.kind, e.mode, e.size, e.mtime_ns, e.uid, e.gid, b"", e.digest, link)


def test_hard_links_share_an_inode(tmp_path: Path) -> None:
    data = b"shared content"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"old b")
    (tmp_path / "c").mkdir()  # a directory in the way
    manifest = Manifest([F(b"a", data), D(b"d"), H(b"d/b", data, 0), H(b"c", data, 2)])
    with FileStore(str(tmp_path), manifest, options=SyncOptions(hard_links=True)) as store:
        store.prepare()
        send(store, 0, data)
        assert store.finish_file(0) is None
        assert store.finish_tree() == []
    inos = {os.stat(tmp_path / p).st_ino for p in ("a", "d/b", "c")}
    assert len(inos) == 1
    assert os.stat(tmp_path / "a").st_nlink == 3
    assert (tmp_path / "d" / "b").read_bytes() == data
    assert os.stat(tmp_path / "d").st_mtime_ns == MTIME  # dir times set after the links
    # Already linked: left alone.
    with FileStore(str(tmp_path), manifest) as store:
        store.prepare()
        assert store.finish_tree() == []
    assert os.stat(tmp_path / "c").st_ino in inos
    assert leftovers(tmp_path) == []


def test_hard_link_to_failed_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "b").write_bytes(b"old b")
    manifest = Manifest([F(b"a", b"data"), H(b"b", b"data", 0)])
    with FileStore(str(tmp_path), manifest) as store:
        store.prepare()
        store.write(0, 0, b"junk")
        assert store.finish_file(0) is not None
        errors = store.finish_tree()
    assert errors[1] == FileError("b", "cannot hard link: a was not updated")
    assert (tmp_path / "b").read_bytes() == b"old b"


# ---------------------------------------------------------------------- sparse


def test_zero_pages_leave_holes(tmp_path: Path) -> None:
    size = 64 << 20
    data = bytearray(size)
    data[10 << 20 : (10 << 20) + 5] = b"hello"
    data[-3:] = b"end"
    page = 61440
    with FileStore(str(tmp_path), Manifest([F(b"sparse", bytes(data))])) as store:
        store.prepare()
        view = memoryview(data)
        for off in range(0, size, page):
            store.write(0, off, view[off : off + page])
        assert store.finish_file(0) is None
    st = os.stat(tmp_path / "sparse")
    assert st.st_size == size
    assert st.st_blocks * 512 < 1 << 20
    with open(tmp_path / "sparse", "rb") as f:
        assert f.read() == data


def test_is_zero() -> None:
    for n in (1, 1400, 61440):
        z = bytes(n)
        assert store_mod._is_zero(z, memoryview(z))
        assert store_mod._is_zero(bytearray(n), memoryview(bytearray(n)))
        assert store_mod._is_zero(memoryview(z), memoryview(z))
        for i in {0, n // 2, n - 1}:
            b = bytearray(n)
            b[i] = 1
            assert not store_mod._is_zero(b, memoryview(b))
            assert not store_mod._is_zero(memoryview(b), memoryview(b))


# ---------------------------------------------------------------------- real disk full


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_real_enospc_on_small_tmpfs(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.system(f"mount -t tmpfs -o size=1m tmpfs {mnt} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "big").write_bytes(b"old version")
        rng = random.Random(3)
        big = rng.randbytes(2 << 20)
        small = b"small file" * 10
        free_before = os.statvfs(mnt).f_bfree
        with FileStore(str(mnt), Manifest([F(b"big", big), F(b"small", small)])) as store:
            store.prepare()
            for off in range(0, len(big), 1400):
                store.write(0, off, big[off : off + 1400])
            assert store.is_failed(0)
            err = store.finish_file(0)
            assert err is not None and "No space left on device" in err.reason
            assert os.statvfs(mnt).f_bfree >= free_before - 1  # the temp's space came back
            store.write(1, 0, small)
            assert store.finish_file(1) is None
            assert store.finish_tree() == [err]
        assert (mnt / "big").read_bytes() == b"old version"
        assert (mnt / "small").read_bytes() == small
        assert leftovers(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_delete_before_prepare(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with FileStore(str(dest), Manifest([F(b"f", b"x")])) as store:
        store.delete([b"old"])  # no DEST yet: nothing to do, nothing created
        assert not dest.exists()
    dest.mkdir()
    (dest / "old").write_bytes(b"old")
    (dest / "f").mkdir()  # a dir where the new file goes
    (dest / "f" / "inner").write_bytes(b"i")
    with FileStore(str(dest), Manifest([F(b"f", b"x")])) as store:
        store.delete([b"f/inner", b"f", b"old"])
        with pytest.raises(RuntimeError, match="prepare"):
            store.write(0, 0, b"x")
        store.prepare()
        store.write(0, 0, b"x")
        assert store.finish_file(0) is None
        assert store.finish_tree() == []
    assert sorted(os.listdir(dest)) == ["f"]
    assert (dest / "f").read_bytes() == b"x"


def test_pwritev_all_resumes_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of pages goes out in one pwritev; when the kernel writes less (a signal, a
    nearly full disk), the rest follows from exactly where it stopped."""
    calls = 0

    def at_most_7_bytes(fd: int, buffers: list[bytes], offset: int) -> int:
        nonlocal calls
        calls += 1
        return os.pwrite(fd, b"".join(bytes(b) for b in buffers)[:7], offset)

    monkeypatch.setattr(store_mod.os, "pwritev", at_most_7_bytes)
    pages = [bytes([i + 1]) * 5 for i in range(6)]
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        store_mod._pwritev_all(fd, pages, 3)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == bytes(3) + b"".join(pages)
    assert calls == 5  # 30 bytes, 7 at a time
