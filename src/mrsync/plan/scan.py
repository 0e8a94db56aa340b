"""Scan the source tree into a :class:`Manifest`.

rsync's naming rules apply to SRC:

* ``dir/`` (trailing slash): the *contents* of ``dir``; the manifest starts with a root entry
  ``b"."`` (kind DIR) that carries ``dir``'s own mode and mtime, followed by ``b"a"``,
  ``b"a/b"``, ...  A SRC whose last component is ``.`` or ``..`` is treated the same way.
* ``dir`` (no slash): the directory itself: ``b"dir"``, ``b"dir/a"``, ...
* a regular file or a symlink: one entry named by its basename.

Nothing is ever followed: entries are ``lstat``-ed, symlinks are recorded with their target as
stored. Paths are bytes so that names that are not valid UTF-8 survive. Children are sorted by
their name bytes and every directory comes before its contents (pre-order).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from typing import Any

import blake3
import msgspec

from mrsync.plan.filters import Filter, only_matcher
from mrsync.plan.manifest import Entry, Kind, Manifest
from mrsync.plan.options import SyncOptions

# Chunked reads rather than ``blake3.update_mmap``: a mapped file that another process truncates
# while we hash it raises SIGBUS and would kill the whole master. With 4 MiB reads and
# multi-threaded hashing we measured ~4 GB/s from the page cache (mmap: ~10 GB/s), well above
# what a disk or a 10 GbE link delivers.
HASH_CHUNK = 4 << 20
THREADED_HASH_BYTES = 16 << 20  # files at least this large are hashed with threads

_O_NOATIME = getattr(os, "O_NOATIME", 0)


_ZEROS = bytes(HASH_CHUNK)
_SEEK_DATA = getattr(os, "SEEK_DATA", None)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", None)


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """[start, end) ranges of the file that may hold data; the rest are holes (zeros).

    Reading a hole still costs a page-cache fill (we saw ~350 MB/s on ext4 against ~4 GB/s
    for cached data), and sparse files are common (VM images; the store's pre-sized temp
    files), so hashing skips holes and feeds zeros instead. Without SEEK_DATA support the
    whole file is one extent.
    """
    if _SEEK_DATA is None or _SEEK_HOLE is None:
        return [(0, size)]
    extents: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, _SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole from here to the end
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, _SEEK_HOLE), size)
            extents.append((start, end))
            offset = end
    except OSError:
        return [(0, size)]
    return extents


def hash_fd(
    fd: int, size: int, *, start: int = 0, hasher: Any = None
) -> tuple[bytes, int]:
    """(blake3-256, bytes hashed) of the first ``size`` bytes of ``fd``, read with pread
    (holes are not read, see :func:`_data_extents`). Fewer than ``size`` bytes are hashed only
    if the file is shorter: bytes past its end are never made up as zeros. With ``hasher``,
    that already holds bytes [0, start): only the rest is read, into it."""
    size = min(size, os.fstat(fd).st_size)
    if hasher is None:
        # Threads pay only on large files: on small ones waking the pool costs more than the
        # hashing (a tree of 2,000 small files spent a tenth of a target's time on it).
        threads = blake3.blake3.AUTO if size >= THREADED_HASH_BYTES else 1
        hasher = blake3.blake3(max_threads=threads)
        start = 0
    buf = bytearray(min(HASH_CHUNK, max(size - start, 1)))
    view = memoryview(buf)
    zeros = memoryview(_ZEROS)
    offset = start
    extents = [(max(lo, start), hi) for lo, hi in _data_extents(fd, size) if hi > start]
    for data_at, end in [*extents, (size, size)]:
        while offset < data_at:  # a hole
            n = min(len(zeros), data_at - offset)
            hasher.update(zeros[:n])
            offset += n
        while offset < end:
            n = os.preadv(fd, [view[: min(len(buf), end - offset)]], offset)
            if n == 0:  # the file is shorter than ``size``
                digest: bytes = hasher.digest()
                return digest, offset
            hasher.update(view[:n])
            offset += n
    digest = hasher.digest()
    return digest, offset


class ScanError(Exception):
    """The source cannot be read completely; planning cannot go on with a partial source."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def display(path: bytes) -> str:
    """A printable form of a path that may not be UTF-8 (undecodable bytes as ``\\xNN``)."""
    return path.decode("utf-8", "backslashreplace")


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def hash_file(path: bytes, size: int, warnings: list[str] | None = None) -> bytes:
    """blake3-256 of at most ``size`` bytes of the regular file ``path`` (never a symlink).

    ``size`` is what ``lstat`` reported. If the file grew meanwhile we hash only those ``size``
    bytes, so that the manifest's (size, digest) pair describes one consistent prefix; if it
    shrank we hash what we could read. Either way a warning is added: the sender re-checks the
    file before sending it.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags | _O_NOATIME)
        except PermissionError:  # O_NOATIME needs ownership (or CAP_FOWNER)
            fd = os.open(path, flags)
    except OSError as exc:
        raise ScanError(display(path), _reason(exc)) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced by something else since lstat
            raise ScanError(display(path), "changed type during the scan")
        digest, offset = hash_fd(fd, size)
        after = os.fstat(fd)
    except OSError as exc:
        raise ScanError(display(path), _reason(exc)) from exc
    finally:
        os.close(fd)
    if warnings is not None and (
        offset != size or after.st_size != size or after.st_mtime_ns != st.st_mtime_ns
    ):
        warnings.append(f"{display(path)}: file changed while it was read")
    return digest


EMPTY_DIGEST: bytes = blake3.blake3(b"").digest()


def entry_path(root: bytes, path: bytes) -> bytes:
    """Where a manifest entry's ``path`` is on the master, under ``source_root``."""
    return root if path == b"." else os.path.join(root, path)


def _entry(
    rel: bytes, full: bytes, st: os.stat_result, warnings: list[str] | None, hash_files: bool
) -> Entry | None:
    """The manifest entry for one lstat result; None (and a warning) for special files.
    Without ``hash_files`` a non-empty file gets no digest: it follows the data."""
    mode = st.st_mode
    perm, mtime, uid, gid = stat.S_IMODE(mode), st.st_mtime_ns, st.st_uid, st.st_gid
    if stat.S_ISREG(mode):
        if hash_files:
            digest = hash_file(full, st.st_size, warnings)
        else:
            digest = EMPTY_DIGEST if st.st_size == 0 else b""
        return Entry(rel, Kind.FILE, perm, st.st_size, mtime, uid, gid, digest=digest)
    if stat.S_ISDIR(mode):
        return Entry(rel, Kind.DIR, perm, 0, mtime, uid, gid)
    if stat.S_ISLNK(mode):
        try:
            target = os.readlink(full)
        except OSError as exc:
            raise ScanError(display(full), _reason(exc)) from exc
        return Entry(rel, Kind.SYMLINK, perm, 0, mtime, uid, gid, target=target)
    if warnings is not None:
        what = (
            "socket"
            if stat.S_ISSOCK(mode)
            else "FIFO"
            if stat.S_ISFIFO(mode)
            else "device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "special file"
        )
        warnings.append(f"{display(full)}: skipping {what}")
    return None


def _children(
    dir_full: bytes, dir_rel: bytes, warnings: list[str] | None
) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
    """(relative path, full path, lstat) of each child of a directory, sorted by name bytes."""
    try:
        with os.scandir(dir_full) as it:
            names = sorted(e.name for e in it)
    except FileNotFoundError:
        # Removed since we lstat-ed it: recorded as an empty directory, like a vanished file.
        if warnings is not None:
            warnings.append(f"{display(dir_full)}: directory vanished during the scan")
        return
    except OSError as exc:
        raise ScanError(display(dir_full), _reason(exc)) from exc
    for name in names:
        full = dir_full + b"/" + name if not dir_full.endswith(b"/") else dir_full + name
        rel = dir_rel + b"/" + name if dir_rel else name
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            # Deleted between readdir and lstat: rsync's "file has vanished". Not an error.
            if warnings is not None:
                warnings.append(f"{display(full)}: file vanished during the scan")
            continue
        except OSError as exc:
            raise ScanError(display(full), _reason(exc)) from exc
        yield rel, full, st


def source_root(src: str) -> bytes:
    """The directory that manifest paths of :func:`scan_source` ``(src)`` are relative to.

    ``dir/`` -> ``dir/`` (so the root entry b"." is ``dir`` itself); ``a/dir`` or ``a/file``
    -> ``a``; ``file`` -> ``.``; ``/dir`` -> ``/``.
    """
    bsrc = os.fsencode(src)
    stripped = bsrc.rstrip(b"/")
    if bsrc.endswith(b"/") or os.path.basename(stripped) in (b".", b".."):
        return bsrc
    return os.path.dirname(stripped) or (b"/" if bsrc.startswith(b"/") else b".")


class _Frame:
    """One open directory of the walk: its remaining children and, for ``-l``, whether its
    entry is in the manifest yet and whether everything below it is selected."""

    __slots__ = ("children", "entry", "emitted", "whole")

    def __init__(
        self,
        children: Iterator[tuple[bytes, bytes, os.stat_result]],
        entry: Entry,
        emitted: bool,
        whole: bool,
    ) -> None:
        self.children = children
        self.entry = entry
        self.emitted = emitted
        self.whole = whole


def check_source(src: str) -> os.stat_result:
    """SRC's own lstat, or :class:`ScanError` (an empty path, or one that cannot be reached):
    the cheap part of :func:`scan_source`, for failing before any target is contacted."""
    bsrc = os.fsencode(src)
    if not bsrc:
        raise ScanError(src, "empty source path")
    try:
        return os.lstat(bsrc)
    except OSError as exc:
        raise ScanError(display(bsrc), _reason(exc)) from exc


def scan_source(
    src: str,
    warnings: list[str] | None = None,
    *,
    options: SyncOptions | None = None,
    hash_files: bool = True,
) -> Manifest:
    """Scan SRC (see the module docstring). Special files are skipped with a warning appended
    to ``warnings``; anything unreadable raises :class:`ScanError`.

    With ``options``:

    * ``rules``: excluded entries are left out and excluded directories are not descended
      (see :mod:`mrsync.plan.filters`); a SRC without a trailing slash whose own name is
      excluded gives an empty manifest, as rsync then transfers nothing;
    * ``only`` (``-l``): just the selected files, symlinks and directory subtrees, plus the
      directories leading to them (with their real metadata); globs are relative to SRC;
    * ``hard_links`` (``-H``): a FILE whose (st_dev, st_ino) was already seen in this scan
      gets ``link`` = the index of the first one, with its size and digest (not hashed
      again). A file whose other names are all outside the tree (or excluded) is a normal file.

    Without ``hash_files``, non-empty files get no digest and the manifest says so
    (``digests_follow``): the master hashes them while it sends them (``FilePages``), and the
    targets check them against the digests that follow, on the control stream. The source is
    then read once, and the transfer starts without reading it first.
    """
    opts = options if options is not None else SyncOptions()
    filt = Filter(opts.rules)
    only = only_matcher(opts.only) if opts.only else None
    bsrc = os.fsencode(src)
    st = check_source(src)
    stripped = bsrc.rstrip(b"/")
    base = os.path.basename(stripped)
    contents = bsrc.endswith(b"/") or base in (b".", b"..")

    if not contents and filt and filt.excluded(base, stat.S_ISDIR(st.st_mode)):
        return Manifest([])
    if stat.S_ISDIR(st.st_mode):
        rel_root = b"" if contents else base
        top = _entry(b"." if contents else base, bsrc, st, warnings, hash_files)
    elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        # A trailing slash on a non-directory already failed in lstat (ENOTDIR).
        top = _entry(base, bsrc, st, warnings, hash_files)
        assert top is not None
        return Manifest([top], digests_follow=not hash_files)
    else:
        raise ScanError(display(bsrc), "not a regular file, directory or symlink")
    assert top is not None

    entries = [top]
    inodes: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) -> index of its first FILE
    cut = len(rel_root) + 1 if rel_root else 0  # strips "name/" for -l globs

    # Pre-order walk with an explicit stack (no recursion limit on deep trees). Only the open
    # directories along the current path are held, each as its sorted list of children.
    stack = [_Frame(_children(bsrc, rel_root, warnings), top, True, only is None)]

    def emit_parents() -> None:
        for frame in stack:
            if not frame.emitted:
                entries.append(frame.entry)
                frame.emitted = True

    while stack:
        try:
            rel, full, cst = next(stack[-1].children)
        except StopIteration:
            stack.pop()
            continue
        is_dir = stat.S_ISDIR(cst.st_mode)
        if filt and filt.excluded(rel, is_dir):
            continue
        whole = stack[-1].whole
        if only is not None and not whole:
            if only(rel[cut:], is_dir):
                whole = True
            elif not (is_dir and only.may_contain(rel[cut:])):
                continue
        if is_dir:
            entry = Entry(
                rel,
                Kind.DIR,
                stat.S_IMODE(cst.st_mode),
                0,
                cst.st_mtime_ns,
                cst.st_uid,
                cst.st_gid,
            )
            if whole:
                emit_parents()
                entries.append(entry)
            stack.append(_Frame(_children(full, rel, warnings), entry, whole, whole))
            continue
        key = (cst.st_dev, cst.st_ino)
        first = inodes.get(key) if opts.hard_links and stat.S_ISREG(cst.st_mode) else None
        if first is not None:
            model = entries[first]
            new: Entry | None = Entry(
                rel,
                Kind.FILE,
                stat.S_IMODE(cst.st_mode),
                model.size,
                cst.st_mtime_ns,
                cst.st_uid,
                cst.st_gid,
                digest=model.digest,
                link=first,
            )
        else:
            new = _entry(rel, full, cst, warnings, hash_files)
        if new is None:
            continue
        emit_parents()
        if opts.hard_links and first is None and new.kind == Kind.FILE and cst.st_nlink > 1:
            inodes[key] = len(entries)
        entries.append(new)
    return Manifest(entries, digests_follow=not hash_files)


def hash_manifest(
    manifest: Manifest, root: bytes, warnings: list[str] | None = None
) -> Manifest:
    """The manifest with every file's digest filled in (``digests_follow`` off): for when
    the digests should travel in the manifest, once, after all."""
    entries = list(manifest.entries)
    for i, e in enumerate(entries):
        if e.kind != Kind.FILE or e.digest:
            continue
        if e.link >= 0:
            digest = entries[e.link].digest  # the model comes first and is hashed already
        else:
            digest = hash_file(entry_path(root, e.path), e.size, warnings)
        entries[i] = msgspec.structs.replace(e, digest=digest)
    return Manifest(entries)


__all__ = [
    "EMPTY_DIGEST",
    "HASH_CHUNK",
    "ScanError",
    "display",
    "entry_path",
    "hash_fd",
    "hash_file",
    "hash_manifest",
    "scan_source",
    "source_root",
]
