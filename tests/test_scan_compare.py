"""Source scan (rsync naming, bytes paths, symlinks not followed) and the target's quick check."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import blake3
import pytest

from mrsync.plan.compare import Needs, UnsafePath, compare, validate_manifest
from mrsync.plan.manifest import Entry, Kind, Manifest, decode_manifest, encode_manifest
from mrsync.plan.options import SyncOptions
from mrsync.plan.scan import ScanError, hash_file, scan_source, source_root

B = os.fsencode


def digest(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """src/ with files, an empty dir, a nested dir, odd names and symlinks."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"hello")
    (src / "empty").write_bytes(b"")
    (src / "with space").write_bytes(b"spaced out")
    (src / "emptydir").mkdir()
    (src / "sub").mkdir()
    (src / "sub" / "deep").mkdir()
    (src / "sub" / "deep" / "z.bin").write_bytes(os.urandom(100_000))
    (src / "sub" / "b.txt").write_bytes(b"bee")
    os.symlink("a.txt", src / "link")
    os.symlink("/nonexistent/target", src / "dangling")
    os.symlink("sub", src / "dirlink")
    with open(os.path.join(B(str(src)), b"caf\xe9"), "wb") as f:
        f.write(b"latin-1 name")
    return src


def paths(manifest: Manifest) -> list[bytes]:
    return [e.path for e in manifest.entries]


def by_path(manifest: Manifest) -> dict[bytes, Entry]:
    return {e.path: e for e in manifest.entries}


def test_trailing_slash_lists_contents_with_root(tree: Path) -> None:
    m = scan_source(str(tree) + "/")
    assert m.entries[0].path == b"." and m.entries[0].kind == Kind.DIR
    assert paths(m) == [
        b".",
        b"a.txt",
        b"caf\xe9",
        b"dangling",
        b"dirlink",
        b"empty",
        b"emptydir",
        b"link",
        b"sub",
        b"sub/b.txt",
        b"sub/deep",
        b"sub/deep/z.bin",
        b"with space",
    ]
    validate_manifest(m)
    assert source_root(str(tree) + "/") == B(str(tree)) + b"/"


def test_no_slash_names_the_directory(tree: Path) -> None:
    m = scan_source(str(tree))
    assert paths(m)[0] == b"src"
    assert all(p == b"src" or p.startswith(b"src/") for p in paths(m))
    assert b"src/sub/deep/z.bin" in paths(m)
    assert b"." not in paths(m)
    validate_manifest(m)
    assert source_root(str(tree)) == B(str(tree.parent))


def test_parents_before_children_and_sorted(tree: Path) -> None:
    m = scan_source(str(tree) + "/")
    seen: set[bytes] = {b""}
    for p in paths(m)[1:]:
        assert p.rpartition(b"/")[0] in seen
        seen.add(p)
    names = [p for p in paths(m)[1:] if b"/" not in p]
    assert names == sorted(names)


def test_single_file_and_symlink_source(tree: Path) -> None:
    m = scan_source(str(tree / "a.txt"))
    assert paths(m) == [b"a.txt"]
    e = m.entries[0]
    assert e.kind == Kind.FILE and e.size == 5 and e.digest == digest(b"hello")
    m = scan_source(str(tree / "link"))
    assert m.entries == [by_path(scan_source(str(tree) + "/"))[b"link"]]
    assert source_root(str(tree / "a.txt")) == B(str(tree))
    with pytest.raises(ScanError):
        scan_source(str(tree / "a.txt") + "/")


def test_entries_metadata_and_digests(tree: Path) -> None:
    m = by_path(scan_source(str(tree) + "/"))
    for rel in (b"a.txt", b"with space", b"caf\xe9", b"sub/deep/z.bin", b"empty"):
        full = os.path.join(B(str(tree)), rel)
        st = os.lstat(full)
        e = m[rel]
        with open(full, "rb") as f:
            content = f.read()
        assert e.kind == Kind.FILE
        assert e.digest == digest(content)
        assert e.size == len(content) == st.st_size
        assert e.mtime_ns == st.st_mtime_ns
        assert e.mode == st.st_mode & 0o7777
        assert (e.uid, e.gid) == (st.st_uid, st.st_gid)
    assert m[b"empty"].size == 0 and m[b"empty"].digest == digest(b"")
    assert m[b"emptydir"].kind == Kind.DIR and m[b"emptydir"].size == 0


def test_symlinks_recorded_not_followed(tree: Path) -> None:
    m = by_path(scan_source(str(tree) + "/"))
    assert m[b"link"].kind == Kind.SYMLINK and m[b"link"].target == b"a.txt"
    assert m[b"dangling"].kind == Kind.SYMLINK
    assert m[b"dangling"].target == b"/nonexistent/target"
    assert m[b"dirlink"].kind == Kind.SYMLINK
    assert not any(p.startswith(b"dirlink/") for p in m)
    assert all(e.digest == b"" and e.size == 0 for e in m.values() if e.kind != Kind.FILE)


def test_special_files_skipped_with_warning(tree: Path) -> None:
    os.mkfifo(tree / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tree / "sock"))
    try:
        warnings: list[str] = []
        m = scan_source(str(tree) + "/", warnings)
    finally:
        sock.close()
    assert b"fifo" not in paths(m) and b"sock" not in paths(m)
    assert any("fifo" in w and "FIFO" in w for w in warnings)
    assert any("sock" in w and "socket" in w for w in warnings)


def test_unreadable_raises_scan_error(tree: Path) -> None:
    with pytest.raises(ScanError) as info:
        scan_source(str(tree / "missing") + "/")
    assert "No such file" in info.value.reason
    if os.geteuid() != 0:  # root reads anything
        (tree / "sub" / "b.txt").chmod(0)
        with pytest.raises(ScanError):
            scan_source(str(tree) + "/")


def test_manifest_roundtrip_keeps_non_utf8(tree: Path) -> None:
    m = scan_source(str(tree) + "/")
    assert decode_manifest(encode_manifest(m)) == m


# ---------------------------------------------------------------------- compare


def copy_tree(src: Path, dest: Path) -> None:
    """A faithful copy (content, mtime, mode, symlinks) as a finished sync would leave it."""
    shutil.copytree(src, dest, symlinks=True, copy_function=shutil.copy2)


def test_compare_empty_dest_needs_all_nonempty_files(tree: Path, tmp_path: Path) -> None:
    m = scan_source(str(tree) + "/")
    needs = compare(m, str(tmp_path / "nothing-here"))
    assert isinstance(needs, Needs)
    want = [i for i, e in enumerate(m.entries) if e.kind == Kind.FILE and e.size > 0]
    assert needs.data == want
    assert {m.entries[i].path for i in want} == {
        b"a.txt",
        b"caf\xe9",
        b"sub/b.txt",
        b"sub/deep/z.bin",
        b"with space",
    }


def test_compare_identical_copy_needs_nothing(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    copy_tree(tree, dest)
    m = scan_source(str(tree) + "/")
    assert compare(m, str(dest)).data == []
    # Without the slash, DEST receives "src/..."
    m2 = scan_source(str(tree))
    dest2 = tmp_path / "dest2"
    copy_tree(tree, dest2 / "src")
    assert compare(m2, str(dest2)).data == []


def test_compare_size_or_mtime_change(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    copy_tree(tree, dest)
    m = scan_source(str(tree) + "/")
    ids = {e.path: i for i, e in enumerate(m.entries)}
    (dest / "a.txt").write_bytes(b"hello!")  # size differs
    st = os.lstat(dest / "sub" / "b.txt")
    os.utime(dest / "sub" / "b.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # 1 ns off
    (dest / "with space").unlink()
    (dest / "with space").mkdir()  # type differs
    os.utime(dest / "empty", ns=(0, 0))  # empty files never need data
    assert sorted(compare(m, str(dest)).data) == sorted(
        [ids[b"a.txt"], ids[b"sub/b.txt"], ids[b"with space"]]
    )


def test_compare_does_not_follow_dest_symlinks(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    copy_tree(tree, dest)
    m = scan_source(str(tree) + "/")
    ids = {e.path: i for i, e in enumerate(m.entries)}
    # sub -> a faithful copy elsewhere: still needs data, the store replaces the symlink.
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(dest / "sub"), elsewhere)
    os.symlink(elsewhere, dest / "sub")
    # a.txt -> symlink to an identical file: not a regular file, needs data.
    os.replace(dest / "a.txt", tmp_path / "a-copy")
    os.symlink(tmp_path / "a-copy", dest / "a.txt")
    assert sorted(compare(m, str(dest)).data) == sorted(
        [ids[b"a.txt"], ids[b"sub/b.txt"], ids[b"sub/deep/z.bin"]]
    )


def test_compare_parent_is_a_file(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    copy_tree(tree, dest)
    shutil.rmtree(dest / "sub")
    (dest / "sub").write_bytes(b"not a dir")
    m = scan_source(str(tree) + "/")
    got = {m.entries[i].path for i in compare(m, str(dest)).data}
    assert got == {b"sub/b.txt", b"sub/deep/z.bin"}


# ---------------------------------------------------------------------- validate


def F(path: bytes, **kw: object) -> Entry:
    fields: dict[str, object] = {
        "mode": 0o644,
        "size": 1,
        "mtime_ns": 0,
        "uid": 0,
        "gid": 0,
        "digest": digest(b"x"),
    }
    fields.update(kw)
    return Entry(path, Kind.FILE, **fields)  # type: ignore[arg-type]


def D(path: bytes) -> Entry:
    return Entry(path, Kind.DIR, 0o755, 0, 0, 0, 0)


def test_validate_accepts_good_manifests() -> None:
    validate_manifest(Manifest([]))
    validate_manifest(Manifest([D(b"."), F(b"a"), D(b"d"), F(b"d/b"), F(b"..x"), F(b"x..")]))
    validate_manifest(Manifest([D(b"top"), D(b"top/d"), F(b"top/d/f")]))
    link = Entry(b"l", Kind.SYMLINK, 0o777, 0, 0, 0, 0, target=b"../../etc/passwd")
    validate_manifest(Manifest([link]))  # targets are stored, never followed


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([F(b"")], "empty path"),
        ([F(b"..")], "'..'"),
        ([D(b"d"), F(b"d/../../x")], "'..'"),
        ([D(b"d"), F(b"d/..")], "'..'"),
        ([F(b"/etc/passwd")], "absolute"),
        ([D(b"d"), F(b"d//x")], "empty path component"),
        ([D(b"d"), F(b"d/")], "empty path component"),
        ([F(b"a\0b")], "NUL"),
        ([D(b"d"), F(b"d/.")], "'.'"),
        ([D(b"d"), D(b"d/./e")], "'.'"),
        ([F(b"./a")], "'.'"),
        ([F(b"a"), D(b".")], "root"),
        ([F(b".")], "root"),
        ([F(b"d/x")], "parent"),
        ([F(b"d"), F(b"d/x")], "not a directory"),
        ([Entry(b"l", Kind.SYMLINK, 0o777, 0, 0, 0, 0, target=b"t"), F(b"l/x")], "not a dir"),
        ([F(b"d/x"), D(b"d")], "parent"),
        ([F(b"a"), F(b"a")], "duplicate"),
        ([F(b"a", digest=b"")], "digest"),
        ([F(b"a", size=-1)], "size"),
        ([F(b"a", mode=0o170644)], "mode"),
        ([F(b"a", uid=-1)], "uid"),
        ([F(b"a", gid=2**32 - 1)], "gid"),
        ([Entry(b"l", Kind.SYMLINK, 0o777, 0, 0, 0, 0, target=b"")], "symlink"),
        ([Entry(b"l", Kind.SYMLINK, 0o777, 0, 0, 0, 0, target=b"a\0")], "symlink"),
    ],
)
def test_validate_rejects(entries: list[Entry], reason: str) -> None:
    with pytest.raises(UnsafePath) as info:
        validate_manifest(Manifest(entries))
    assert reason in info.value.reason


def test_unreadable_file_or_dir_raises(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated EACCES (we may be root): a clear ScanError naming the path."""
    real_open, real_scandir = os.open, os.scandir

    def deny_open(path: bytes, flags: int, *args: object, **kw: object) -> int:
        if path.endswith(b"b.txt"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", deny_open)
    with pytest.raises(ScanError) as info:
        scan_source(str(tree) + "/")
    assert info.value.path.endswith("sub/b.txt") and info.value.reason == "Permission denied"
    monkeypatch.setattr(os, "open", real_open)

    def deny_scandir(path: bytes) -> object:
        if path.endswith(b"deep"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", deny_scandir)
    with pytest.raises(ScanError) as info:
        scan_source(str(tree) + "/")
    assert info.value.path.endswith("sub/deep")


def test_file_changed_while_hashing(tree: Path) -> None:
    """lstat said 3 bytes, the file now has 5: hash the 3 promised bytes, and warn."""
    warnings: list[str] = []
    assert hash_file(B(str(tree / "a.txt")), 3, warnings) == digest(b"hel")
    assert warnings and "changed" in warnings[0]
    warnings.clear()
    assert hash_file(B(str(tree / "a.txt")), 9, warnings) == digest(b"hello")  # shrank
    assert warnings


# ---------------------------------------------------------------------- compare modes


def bump(path: Path, ns: int) -> None:
    st = os.lstat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + ns), follow_symlinks=False)


def ids_of(m: Manifest) -> dict[bytes, int]:
    return {e.path: i for i, e in enumerate(m.entries)}


@pytest.fixture
def synced(tree: Path, tmp_path: Path) -> tuple[Manifest, Path, dict[bytes, int]]:
    dest = tmp_path / "dest"
    copy_tree(tree, dest)
    m = scan_source(str(tree) + "/")
    return m, dest, ids_of(m)


def test_quick_check_same_size_other_content_is_up_to_date(synced) -> None:
    m, dest, ids = synced
    st = os.lstat(dest / "a.txt")
    (dest / "a.txt").write_bytes(b"HELLO")
    os.utime(dest / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert compare(m, str(dest)).data == []
    opts = SyncOptions(checksum=True)
    needs = compare(m, str(dest), opts)
    assert needs.data == [ids[b"a.txt"]]
    assert needs.itemized == [">fc........ a.txt"]


def test_checksum_ignores_mtime_when_content_matches(synced) -> None:
    m, dest, ids = synced
    bump(dest / "a.txt", 10**9)
    (dest / "sub" / "b.txt").write_bytes(b"beeee")  # other size: needs data without hashing
    needs = compare(m, str(dest), SyncOptions(checksum=True))
    assert needs.data == [ids[b"sub/b.txt"]]
    assert ".f..t...... a.txt" in needs.itemized
    assert compare(m, str(dest)).data == sorted([ids[b"a.txt"], ids[b"sub/b.txt"]])


def test_size_only(synced) -> None:
    m, dest, ids = synced
    bump(dest / "a.txt", 10**9)
    (dest / "sub" / "b.txt").write_bytes(b"BEEx")
    needs = compare(m, str(dest), SyncOptions(size_only=True))
    assert needs.data == [ids[b"sub/b.txt"]]
    assert needs.itemized[0] == ".f..t...... a.txt"  # metadata only


def test_update_skips_newer_dest_files(synced) -> None:
    m, dest, ids = synced
    (dest / "a.txt").write_bytes(b"newer and longer")
    bump(dest / "a.txt", 10**9)
    (dest / "sub" / "b.txt").write_bytes(b"older, longer")
    bump(dest / "sub" / "b.txt", -(10**9))
    needs = compare(m, str(dest), SyncOptions(update=True))
    assert needs.data == [ids[b"sub/b.txt"]]
    assert needs.keep == [ids[b"a.txt"]]
    # a different type on the target is always replaced
    (dest / "with space").unlink()
    (dest / "with space").mkdir()
    bump(dest / "with space", 10**10)
    assert ids[b"with space"] in compare(m, str(dest), SyncOptions(update=True)).data


def test_ignore_existing(synced) -> None:
    m, dest, ids = synced
    (dest / "a.txt").write_bytes(b"different")
    (dest / "sub" / "b.txt").unlink()
    os.unlink(dest / "link")
    os.symlink("elsewhere", dest / "link")
    needs = compare(m, str(dest), SyncOptions(ignore_existing=True))
    assert needs.data == [ids[b"sub/b.txt"]]
    assert ids[b"a.txt"] in needs.keep and ids[b"link"] in needs.keep
    assert ids[b"sub"] not in needs.keep  # existing directories are still entered
    assert [line for line in needs.itemized if "f" in line[:2]] == [">f+++++++++ sub/b.txt"]


# ---------------------------------------------------------------------- deletions


def test_delete_extra_file_dir_tree_and_symlink(synced) -> None:
    m, dest, _ = synced
    (dest / "extra").write_bytes(b"x")
    (dest / "xd" / "y").mkdir(parents=True)
    (dest / "xd" / "y" / "f").write_bytes(b"f")
    (dest / "xd" / "g").write_bytes(b"g")
    os.symlink("a.txt", dest / "sub" / "xl")
    os.symlink("/", dest / "sub" / "deep" / "rootlink")
    needs = compare(m, str(dest), SyncOptions(delete=True))
    assert needs.data == []
    assert needs.delete == [
        b"extra",
        b"xd/g",
        b"xd/y/f",
        b"xd/y",
        b"xd",
        b"sub/xl",
        b"sub/deep/rootlink",
    ]
    assert [line for line in needs.itemized if line.startswith("*")] == [
        "*deleting   extra",
        "*deleting   xd/g",
        "*deleting   xd/y/f",
        "*deleting   xd/y/",
        "*deleting   xd/",
        "*deleting   sub/xl",
        "*deleting   sub/deep/rootlink",
    ]
    assert compare(m, str(dest)).delete == []  # only with --delete
    assert compare(m, str(dest), SyncOptions(delete=True, only=("a.txt",))).delete == []


def test_delete_keeps_excluded(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    copy_tree(tree, dest)
    (dest / "extra.o").write_bytes(b"x")
    (dest / "extra").write_bytes(b"x")
    (dest / "xd").mkdir()
    (dest / "xd" / "keep.o").write_bytes(b"k")
    (dest / "xd" / "gone").write_bytes(b"g")
    opts = SyncOptions(delete=True, rules=(("-", "*.o"), ("-", "sub/")))
    m = scan_source(str(tree) + "/", options=opts)
    assert b"sub/b.txt" not in ids_of(m)
    needs = compare(m, str(dest), opts)
    # sub/ is excluded: kept whole although the manifest lacks it; xd/ still holds keep.o
    assert needs.delete == [b"extra", b"xd/gone"]


def test_delete_without_trailing_slash_only_below_name(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    copy_tree(tree, dest / "src")
    (dest / "other").write_bytes(b"not ours")
    (dest / "src" / "extra").write_bytes(b"ours")
    m = scan_source(str(tree))
    assert compare(m, str(dest), SyncOptions(delete=True)).delete == [b"src/extra"]


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
def test_delete_matches_rsync(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    copy_tree(tree, dest)
    for rel in ["extra", "x.o", "d/x.o", "d/y", "d/e/z", "sub/deep/q", "sub/n.o"]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(b"q")
    os.symlink("x", dest / "sub" / "lnk")
    rules = (("-", "*.o"),)
    m = scan_source(str(tree) + "/", options=SyncOptions(rules=rules))
    ours = set(compare(m, str(dest), SyncOptions(delete=True, rules=rules)).delete)
    out = subprocess.run(
        ["rsync", "-an", "--delete", "--exclude=*.o", "--out-format=%o %n", f"{tree}/", f"{dest}/"],
        capture_output=True,
        check=True,
    ).stdout
    theirs = {
        line.split(b" ", 1)[1].rstrip(b"/")
        for line in out.splitlines()
        if line.startswith(b"del. ")
    }
    assert ours == theirs == {b"extra", b"d/y", b"d/e/z", b"d/e", b"sub/deep/q", b"sub/lnk"}


# ---------------------------------------------------------------------- itemize


def test_itemized_add_change_metadata(synced, tree: Path) -> None:
    m, dest, _ = synced
    (dest / "a.txt").write_bytes(b"hello world")  # size (and mtime) differ
    shutil.rmtree(dest / "sub" / "deep")
    os.chmod(dest / "with space", 0o600)
    os.chmod(tree / "with space", 0o644)
    os.unlink(dest / "link")
    os.unlink(dest / "dangling")
    os.symlink("elsewhere", dest / "dangling")
    m = scan_source(str(tree) + "/")
    lines = compare(m, str(dest)).itemized
    assert ">f.st...... a.txt" in lines
    assert "cd+++++++++ sub/deep/" in lines
    assert ">f+++++++++ sub/deep/z.bin" in lines
    assert ".f...p..... with space" in lines
    assert "cL+++++++++ link -> a.txt" in lines
    assert "cLc........ dangling -> /nonexistent/target" in lines
    assert lines.index("cd+++++++++ sub/deep/") < lines.index(">f+++++++++ sub/deep/z.bin")
    fresh = compare(m, str(tmp_dest := dest.parent / "fresh")).itemized
    assert not tmp_dest.exists()
    assert fresh[0] == "cd+++++++++ ./"
    assert ">f+++++++++ empty" in fresh and "cd+++++++++ emptydir/" in fresh


def test_itemized_nothing_for_identical(synced) -> None:
    m, dest, _ = synced
    needs = compare(m, str(dest), SyncOptions(delete=True, checksum=True))
    assert needs == Needs([], [], [], [])


# ---------------------------------------------------------------------- hard links


@pytest.fixture
def linked(tmp_path: Path) -> Path:
    src = tmp_path / "hl"
    src.mkdir()
    (src / "a").write_bytes(b"shared")
    os.link(src / "a", src / "b")
    (src / "d").mkdir()
    os.link(src / "a", src / "d" / "c")
    (src / "solo").write_bytes(b"solo")
    os.link(src / "solo", tmp_path / "outside")  # nlink 2, partner outside the tree
    return src


def test_scan_hard_links(linked: Path) -> None:
    plain = scan_source(str(linked) + "/")
    assert all(e.link == -1 for e in plain.entries)
    m = scan_source(str(linked) + "/", options=SyncOptions(hard_links=True))
    ids = ids_of(m)
    a = m.entries[ids[b"a"]]
    for name in (b"b", b"d/c"):
        e = m.entries[ids[name]]
        assert e.link == ids[b"a"] and e.digest == a.digest and e.size == a.size
    assert a.link == -1 and m.entries[ids[b"solo"]].link == -1
    # the first name excluded: the next one leads the group
    ex = scan_source(str(linked) + "/", options=SyncOptions(hard_links=True, rules=(("-", "/a"),)))
    eids = ids_of(ex)
    assert ex.entries[eids[b"b"]].link == -1 and ex.entries[eids[b"d/c"]].link == eids[b"b"]


def test_compare_hard_links(linked: Path, tmp_path: Path) -> None:
    opts = SyncOptions(hard_links=True)
    m = scan_source(str(linked) + "/", options=opts)
    ids = ids_of(m)
    dest = tmp_path / "hd"
    needs = compare(m, str(dest), opts)
    assert needs.data == [ids[b"a"], ids[b"solo"]]  # links never need data
    assert "hf+++++++++ b => a" in needs.itemized
    # DEST already linked the same way: nothing at all
    subprocess.run(["cp", "-a", f"{linked}/.", str(dest)], check=True)
    assert compare(m, str(dest), opts) == Needs([], [], [], [])
    # DEST has b as a separate copy: relink it, still no data
    os.unlink(dest / "b")
    shutil.copy2(linked / "a", dest / "b")
    needs = compare(m, str(dest), opts)
    assert needs.data == []
    assert [line for line in needs.itemized if line.startswith("hf")] == ["hf......... b => a"]
