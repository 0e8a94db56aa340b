"""The receiver's file store: temp files, digest check, rename, metadata, refusing symlinks."""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
from pathlib import Path

import blake3
import pytest

from mrsync.io import store as store_mod
from mrsync.io.store import FileError, FileStore, StoreError
from mrsync.plan.compare import compare, validate_manifest
from mrsync.plan.manifest import Entry, Kind, Manifest
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
