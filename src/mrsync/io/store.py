"""The receiver's file store: temp files, verify, rename into place, metadata.

Lifecycle (driven by the receiver's event loop)::

    store = FileStore(dest_root, manifest)    # manifest already passed validate_manifest()
    store.prepare()                           # directories; raises StoreError if DEST is unusable
    store.write(file_id, offset, data) ...    # pages, any order, any number of files at once
    store.finish_file(file_id)                # digest check + rename; FileError or None
    store.finish_tree()                       # empty files, symlinks, metadata, dir times
    store.close()                             # always (also a context manager)

Never writing outside DEST
--------------------------
Every operation works relative to a directory file descriptor, and those are obtained by
walking from DEST one component at a time with ``openat(O_PATH | O_DIRECTORY | O_NOFOLLOW)``.
A symlink (or anything that is not a directory) anywhere below DEST therefore fails the walk
with ENOTDIR instead of being followed, whatever the manifest or a concurrent process put
there, and the final component is only ever touched with ``*at`` calls that do not follow it
(``O_NOFOLLOW``, ``follow_symlinks=False``, ``renameat``, ``unlinkat``). DEST itself is followed,
like rsync does: it is the operator's choice. Walked directory fds are cached (bounded LRU), so
the walk costs one ``openat`` per new directory, not per file.

Errors
------
Each filesystem error (ENOSPC, EACCES, EROFS, ...) is caught for the file it concerns, recorded
in ``errors`` as a :class:`FileError` and that file's old copy is kept; the rest goes on.
Programming errors (an id that is not a FILE, a write past the file's size, no ``prepare()``)
raise ``ValueError``/``RuntimeError``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections import OrderedDict
from types import TracebackType
from typing import NamedTuple

import blake3

from mrsync.plan.manifest import Entry, Kind, Manifest
from mrsync.plan.scan import display, hash_fd

MAX_OPEN_FILES = 64  # temp files kept open at once; more are closed and reopened on demand
MAX_DIR_FDS = 64  # cached directory fds (see module docstring)
EMPTY_DIGEST: bytes = blake3.blake3(b"").digest()

_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)
_DIR_WALK = _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_META = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_TEMP_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_REOPEN = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_BASE_MAX = 200  # bytes of the basename kept in a temp name (NAME_MAX is 255)


class FileError(NamedTuple):
    path: str  # relative to DEST, printable (undecodable bytes shown as \xNN)
    reason: str


class StoreError(Exception):
    """DEST itself cannot be created or opened: nothing can be stored on this target."""


class _Refused(Exception):
    """An operation refused for a reason that is not an errno (symlinked parent, ...)."""


# What a per-file operation may raise and we turn into a FileError. ValueError/OverflowError
# come from os.* on values the kernel cannot take (validate_manifest rules most out).
_ERRORS = (OSError, _Refused, ValueError, OverflowError)


def _strerror(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        if exc.errno:
            return os.strerror(exc.errno)
        return str(exc)
    return str(exc) or type(exc).__name__


def _split(path: bytes) -> tuple[bytes, bytes]:
    """(parent relative dir, basename); the parent of a top-level name is b"" (DEST)."""
    if path == b".":
        return b"", b"."
    parent, _, base = path.rpartition(b"/")
    return parent, base


def _temp_name(base: bytes, tag: str = "") -> bytes:
    return b"." + base[:_TEMP_BASE_MAX] + b".mrsync." + tag.encode() + secrets.token_hex(4).encode()


_SETID = stat.S_ISUID | stat.S_ISGID


def _safe_mode(entry: Entry, uid: int, gid: int) -> int:
    """The entry's mode, without set-user-ID (set-group-ID) when the owner (group) could not be
    set: a set-uid program must never end up owned by someone else, root least of all."""
    mode = entry.mode
    if uid != entry.uid:
        mode &= ~stat.S_ISUID
    if gid != entry.gid:
        mode &= ~stat.S_ISGID
    return mode


def _lstat_at(dfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


class FileStore:
    def __init__(self, dest_root: str, manifest: Manifest, *, numeric_ids: bool = True) -> None:
        self.dest_root = os.fsencode(dest_root)
        self.entries = manifest.entries
        # The manifest carries numeric ids only, so ids are always applied numerically; the
        # flag is kept for the caller's interface (rsync's name mapping would need names).
        self.numeric_ids = numeric_ids
        self.errors: list[FileError] = []
        self._is_root = os.geteuid() == 0
        self._root_fd: int | None = None
        self._dir_fds: OrderedDict[bytes, int] = OrderedDict()
        self._open: OrderedDict[int, int] = OrderedDict()  # file_id -> temp fd (LRU)
        self._temps: dict[int, tuple[bytes, bytes]] = {}  # file_id -> (parent dir, temp name)
        self._failed: dict[int, FileError] = {}
        self._done: set[int] = set()
        self._bad_dirs: dict[bytes, str] = {}  # dirs prepare() could not make -> reason

    # ------------------------------------------------------------------ public interface

    def prepare(self) -> None:
        """Create DEST (with parents) and every DIR entry. Existing directories are kept; a
        non-directory where a directory belongs is removed. New directories get
        ``mode | 0o700`` until :meth:`finish_tree` applies the real mode."""
        if self._root_fd is not None:
            raise RuntimeError("FileStore.prepare() called twice")
        try:
            os.makedirs(self.dest_root, exist_ok=True)
            self._root_fd = os.open(self.dest_root, _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(f"{display(self.dest_root)}: {_strerror(exc)}") from exc
        for entry in self.entries:
            if entry.kind != Kind.DIR or entry.path == b".":
                continue
            if self._bad_ancestor(entry.path) is not None:
                self._bad_dirs[entry.path] = "parent directory missing"
                continue
            parent, base = _split(entry.path)
            try:
                dfd = self._dirfd(parent)
                st = _lstat_at(dfd, base)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    if not self._is_root and st.st_mode & 0o700 != 0o700:
                        # We must be able to create entries in it; the real mode comes last.
                        os.chmod(base, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=dfd)
                    continue
                if st is not None:
                    os.unlink(base, dir_fd=dfd)  # file, symlink, fifo... in the way
                os.mkdir(base, (entry.mode & 0o7777) | 0o700, dir_fd=dfd)
            except _ERRORS as exc:
                reason = f"cannot create directory: {_strerror(exc)}"
                self._bad_dirs[entry.path] = reason
                self._record(entry.path, reason)

    def write(self, file_id: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write one page of a FILE at ``offset``. Errors are recorded (see :meth:`is_failed`)
        and later pages of that file are ignored, as are pages of a finished file."""
        entry = self._file_entry(file_id)
        view = memoryview(data).cast("B")
        if offset < 0 or offset + len(view) > entry.size:
            raise ValueError(
                f"write of {len(view)} bytes at {offset} is outside {display(entry.path)}"
                f" ({entry.size} bytes)"
            )
        if file_id in self._failed or file_id in self._done:
            return
        try:
            fd = self._temp_fd(file_id)
            while view:
                n = os.pwrite(fd, view, offset)
                if n <= 0:
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                view = view[n:]
                offset += n
        except _ERRORS as exc:
            self._fail(file_id, f"write failed: {_strerror(exc)}")

    def finish_file(self, file_id: int) -> FileError | None:
        """All pages are written: check the digest, set owner/mode/mtime, rename into place.

        Returns None when the new content is in place. On a digest mismatch or an I/O error
        the temp file is removed, the old copy kept, and the (recorded) error returned.
        Failing to set the owner (as root) after the content is in place is recorded in
        ``errors`` but does not make this return an error: the content is there.
        Calling it again for a finished or failed file returns the same outcome.
        """
        entry = self._file_entry(file_id)
        if file_id in self._failed:
            return self._failed[file_id]
        if file_id in self._done:
            return None
        parent, base = _split(entry.path)
        try:
            fd = self._temp_fd(file_id)
            st = os.fstat(fd)
            if st.st_size != entry.size or hash_fd(fd, entry.size)[0] != entry.digest:
                return self._fail(file_id, "digest mismatch")
            self._set_meta_fd(fd, entry, st)
            dfd = self._dirfd(parent)
            self._install(dfd, self._temps[file_id][1], entry)
        except _ERRORS as exc:
            return self._fail(file_id, f"cannot install: {_strerror(exc)}")
        self._drop_fd(file_id)
        del self._temps[file_id]
        self._done.add(file_id)
        return None

    def abort_file(self, file_id: int) -> None:
        """Drop the temp file (if any). Records nothing; a later write starts afresh."""
        self._file_entry(file_id)
        self._discard_temp(file_id)

    def is_failed(self, file_id: int) -> bool:
        """True once a write or finish of this file failed (its error is in ``errors``)."""
        return file_id in self._failed

    def finish_tree(self) -> list[FileError]:
        """After all data: empty files and symlinks (temp name + rename, an identical link is
        left alone), metadata of unchanged files (no content rewrite), then the mode, owner
        and mtime of directories, deepest first, DEST's own (entry b".") last.

        A non-empty FILE that was neither finished nor failed and that still fails the quick
        check (missing, wrong type, size or mtime) is reported as "not received".
        Returns every error of the session (a copy of ``errors``).
        """
        self._root()
        for file_id, entry in enumerate(self.entries):
            if entry.kind == Kind.DIR or file_id in self._done or file_id in self._failed:
                continue
            bad = self._bad_ancestor(entry.path)
            if bad is not None:
                self._fail(file_id, f"directory {display(bad)} could not be created")
                continue
            parent, base = _split(entry.path)
            try:
                dfd = self._dirfd(parent)
                st = _lstat_at(dfd, base)
                if entry.kind == Kind.SYMLINK:
                    self._finish_symlink(file_id, entry, dfd, base, st)
                elif entry.size == 0:
                    self._finish_empty(file_id, entry, dfd, base, st)
                elif (
                    st is not None
                    and stat.S_ISREG(st.st_mode)
                    and st.st_size == entry.size
                    and st.st_mtime_ns == entry.mtime_ns
                ):
                    self._fix_meta(entry, dfd, base, st)
                else:
                    self._fail(file_id, "not received")
                    continue
            except _ERRORS as exc:
                self._fail(file_id, f"cannot create: {_strerror(exc)}")
                continue
            self._done.add(file_id)

        dirs = [e for e in self.entries if e.kind == Kind.DIR]
        dirs.sort(key=lambda e: -1 if e.path == b"." else e.path.count(b"/"), reverse=True)
        for entry in dirs:
            if entry.path in self._bad_dirs or self._bad_ancestor(entry.path) is not None:
                continue  # already reported by prepare()
            parent, base = _split(entry.path)
            try:
                dfd = self._dirfd(parent)
                st = _lstat_at(dfd, base)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    raise _Refused("directory vanished")
                self._fix_meta(entry, dfd, base, st)
            except _ERRORS as exc:
                self._record(entry.path, f"cannot set attributes: {_strerror(exc)}")
        return list(self.errors)

    def close(self) -> None:
        """Close every fd and remove leftover temp files (unfinished or aborted files)."""
        for file_id in list(self._temps):
            self._discard_temp(file_id)
        for fd in self._dir_fds.values():
            os.close(fd)
        self._dir_fds.clear()
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    def __enter__(self) -> FileStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ errors

    def _record(self, path: bytes, reason: str) -> FileError:
        err = FileError(display(path), reason)
        self.errors.append(err)
        return err

    def _fail(self, file_id: int, reason: str) -> FileError:
        """Record a failure of one entry: its temp is dropped, its old copy kept."""
        self._discard_temp(file_id)
        err = self._record(self.entries[file_id].path, reason)
        self._failed[file_id] = err
        return err

    def _bad_ancestor(self, path: bytes) -> bytes | None:
        while b"/" in path:
            path = path.rpartition(b"/")[0]
            if path in self._bad_dirs:
                return path
        return None

    # ------------------------------------------------------------------ directory fds

    def _root(self) -> int:
        if self._root_fd is None:
            raise RuntimeError("FileStore.prepare() must be called first")
        return self._root_fd

    def _dirfd(self, rel: bytes) -> int:
        """An O_PATH fd of directory ``rel`` (b"" = DEST), walked without following symlinks.

        The fd belongs to the cache: use it at once, before the next ``_dirfd`` call.
        """
        root = self._root()
        if not rel:
            return root
        cached = self._dir_fds.get(rel)
        if cached is not None:
            self._dir_fds.move_to_end(rel)
            return cached
        comps = rel.split(b"/")
        fd, start = root, 0
        for i in range(len(comps) - 1, 0, -1):
            hit = self._dir_fds.get(b"/".join(comps[:i]))
            if hit is not None:
                fd, start = hit, i
                break
        for i in range(start, len(comps)):
            try:
                new = os.open(comps[i], _DIR_WALK, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    where = display(b"/".join(comps[: i + 1]))
                    raise _Refused(
                        f"{where} is not a directory (symlinks are not followed)"
                    ) from exc
                raise
            prefix = b"/".join(comps[: i + 1])
            self._dir_fds[prefix] = new  # may evict (close) ``fd``, which is no longer used
            if len(self._dir_fds) > MAX_DIR_FDS:
                os.close(self._dir_fds.popitem(last=False)[1])
            fd = new
        return fd

    def _forget_dirs(self, rel: bytes) -> None:
        """Drop cached fds of ``rel`` and below (it is being removed)."""
        below = rel + b"/"
        for key in [k for k in self._dir_fds if k == rel or k.startswith(below)]:
            os.close(self._dir_fds.pop(key))

    # ------------------------------------------------------------------ temp files

    def _file_entry(self, file_id: int) -> Entry:
        if not 0 <= file_id < len(self.entries):
            raise ValueError(f"no entry {file_id}")
        entry = self.entries[file_id]
        if entry.kind != Kind.FILE:
            raise ValueError(f"entry {file_id} ({display(entry.path)}) is not a file")
        return entry

    def _temp_fd(self, file_id: int) -> int:
        """The open fd of the file's temp, created (pre-sized, sparse) on first use."""
        fd = self._open.get(file_id)
        if fd is not None:
            self._open.move_to_end(file_id)
            return fd
        temp = self._temps.get(file_id)
        if temp is not None:  # evicted from the LRU: reopen (never through a symlink)
            fd = os.open(temp[1], _TEMP_REOPEN, dir_fd=self._dirfd(temp[0]))
        else:
            entry = self.entries[file_id]
            bad = self._bad_ancestor(entry.path)
            if bad is not None:
                raise _Refused(f"directory {display(bad)} could not be created")
            parent, base = _split(entry.path)
            dfd = self._dirfd(parent)
            fd, name = self._create_temp(dfd, base)
            self._temps[file_id] = (parent, name)
            try:
                os.ftruncate(fd, entry.size)  # holes read as zeros; no blocks allocated yet
            except OSError:
                os.close(fd)
                raise
        self._open[file_id] = fd
        if len(self._open) > MAX_OPEN_FILES:
            os.close(self._open.popitem(last=False)[1])
        return fd

    @staticmethod
    def _create_temp(dfd: int, base: bytes) -> tuple[int, bytes]:
        for _ in range(100):
            name = _temp_name(base)
            try:
                return os.open(name, _TEMP_FLAGS, 0o600, dir_fd=dfd), name
            except FileExistsError:
                continue
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))

    def _drop_fd(self, file_id: int) -> None:
        fd = self._open.pop(file_id, None)
        if fd is not None:
            os.close(fd)

    def _discard_temp(self, file_id: int) -> None:
        self._drop_fd(file_id)
        temp = self._temps.pop(file_id, None)
        if temp is not None:
            # Gone already, or its directory is: nothing left to clean.
            with contextlib.suppress(*_ERRORS):
                os.unlink(temp[1], dir_fd=self._dirfd(temp[0]))

    # ------------------------------------------------------------------ installing

    def _install(self, dfd: int, temp: bytes, entry: Entry) -> None:
        """Rename ``temp`` onto the entry's name in ``dfd``. A real directory in the way is
        moved aside first and removed after the rename (moved back if the rename fails)."""
        base = _split(entry.path)[1]
        st = _lstat_at(dfd, base)
        if st is None or not stat.S_ISDIR(st.st_mode):
            os.replace(temp, base, src_dir_fd=dfd, dst_dir_fd=dfd)
            return
        self._forget_dirs(entry.path)
        aside = _temp_name(base, "old.")
        os.rename(base, aside, src_dir_fd=dfd, dst_dir_fd=dfd)
        try:
            os.replace(temp, base, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError:
            os.rename(aside, base, src_dir_fd=dfd, dst_dir_fd=dfd)
            raise
        try:
            shutil.rmtree(aside, dir_fd=dfd)
        except OSError as exc:
            self._record(entry.path, f"old directory left as {display(aside)}: {_strerror(exc)}")

    def _finish_empty(
        self, file_id: int, entry: Entry, dfd: int, base: bytes, st: os.stat_result | None
    ) -> None:
        if entry.digest != EMPTY_DIGEST:
            raise _Refused("digest mismatch")
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == 0:
            self._fix_meta(entry, dfd, base, st)
            return
        fd, name = self._create_temp(dfd, base)
        self._temps[file_id] = (_split(entry.path)[0], name)
        self._open[file_id] = fd
        self._set_meta_fd(fd, entry, os.fstat(fd))
        self._install(dfd, name, entry)
        self._drop_fd(file_id)
        del self._temps[file_id]

    def _finish_symlink(
        self, file_id: int, entry: Entry, dfd: int, base: bytes, st: os.stat_result | None
    ) -> None:
        if (
            st is not None
            and stat.S_ISLNK(st.st_mode)
            and os.readlink(base, dir_fd=dfd) == entry.target
        ):
            self._fix_meta(entry, dfd, base, st)
            return
        for _ in range(100):
            name = _temp_name(base)
            try:
                os.symlink(entry.target, name, dir_fd=dfd)
                break
            except FileExistsError:
                continue
        else:
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
        self._temps[file_id] = (_split(entry.path)[0], name)
        self._set_meta_link(entry, dfd, name, os.stat(name, dir_fd=dfd, follow_symlinks=False))
        self._install(dfd, name, entry)
        del self._temps[file_id]

    # ------------------------------------------------------------------ metadata

    def _chown_args(self, entry: Entry, st: os.stat_result) -> tuple[int, int] | None:
        """(uid, gid) to apply, or None. Root sets both; others only try the group (which
        works when they belong to it, as rsync does) and ignore failures."""
        if self._is_root:
            if (st.st_uid, st.st_gid) != (entry.uid, entry.gid):
                return entry.uid, entry.gid
            return None
        return (-1, entry.gid) if st.st_gid != entry.gid else None

    def _set_meta_fd(self, fd: int, entry: Entry, st: os.stat_result) -> None:
        """Owner, then mode (chown clears set-id bits), then mtime, through an open fd."""
        ids = self._chown_args(entry, st)
        if ids is not None:
            try:
                os.fchown(fd, *ids)
            except OSError as exc:
                if self._is_root:
                    self._record(entry.path, f"cannot set owner: {_strerror(exc)}")
        mode = entry.mode
        if mode & _SETID:
            now = os.fstat(fd) if ids is not None else st
            mode = _safe_mode(entry, now.st_uid, now.st_gid)
        if ids is not None or stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
        if st.st_mtime_ns != entry.mtime_ns:
            os.utime(fd, ns=(st.st_atime_ns, entry.mtime_ns))

    def _set_meta_link(self, entry: Entry, dfd: int, name: bytes, st: os.stat_result) -> None:
        ids = self._chown_args(entry, st)
        if ids is not None:
            try:
                os.chown(name, *ids, dir_fd=dfd, follow_symlinks=False)
            except OSError as exc:
                if self._is_root:
                    self._record(entry.path, f"cannot set owner: {_strerror(exc)}")
        if st.st_mtime_ns != entry.mtime_ns:
            os.utime(name, ns=(st.st_atime_ns, entry.mtime_ns), dir_fd=dfd, follow_symlinks=False)

    def _fix_meta(self, entry: Entry, dfd: int, name: bytes, st: os.stat_result) -> None:
        """Bring an existing entry's owner/mode/mtime in line, without touching content."""
        if stat.S_ISLNK(st.st_mode):
            self._set_meta_link(entry, dfd, name, st)
            return
        if (
            self._chown_args(entry, st) is None
            and stat.S_IMODE(st.st_mode) == _safe_mode(entry, st.st_uid, st.st_gid)
            and st.st_mtime_ns == entry.mtime_ns
        ):
            return
        flags = _OPEN_META | (os.O_DIRECTORY if stat.S_ISDIR(st.st_mode) else 0)
        try:
            fd = os.open(name, flags, dir_fd=dfd)
        except PermissionError:
            if self._is_root:
                raise
            # Not readable by us (e.g. mode 0o200). Only files we own can be chmod-ed by a
            # non-root user, so the name-based fallback cannot be turned against others'.
            ids = self._chown_args(entry, st)
            if ids is not None:
                with contextlib.suppress(OSError):
                    os.chown(name, *ids, dir_fd=dfd, follow_symlinks=False)
            now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            os.chmod(name, _safe_mode(entry, now.st_uid, now.st_gid), dir_fd=dfd)
            os.utime(name, ns=(st.st_atime_ns, entry.mtime_ns), dir_fd=dfd, follow_symlinks=False)
            return
        try:
            fst = os.fstat(fd)
            if stat.S_IFMT(fst.st_mode) != stat.S_IFMT(st.st_mode):
                raise _Refused("changed type while being updated")
            self._set_meta_fd(fd, entry, fst)
        finally:
            os.close(fd)


__all__ = ["EMPTY_DIGEST", "MAX_OPEN_FILES", "FileError", "FileStore", "StoreError"]
