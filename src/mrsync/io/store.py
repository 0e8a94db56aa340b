"""The receiver's file store: temp files, verify, rename into place, metadata.

Lifecycle (driven by the receiver's event loop)::

    store = FileStore(dest_root, manifest, options=opts)  # manifest passed validate_manifest()
    store.prepare()                           # directories; raises StoreError if DEST is unusable
    store.delete(paths)                       # --delete: what the source no longer has
    store.write(file_id, offset, data) ...    # pages, any order, any number of files at once
    store.finish_file(file_id)                # digest check + rename; FileError or None
    store.finish_tree()                       # empty files, symlinks, hard links, metadata
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

Backups (--backup, --suffix, --backup-dir)
------------------------------------------
An existing non-directory about to be replaced (by a file, an empty file, a symlink or a hard
link) or deleted is first *hard-linked* to its backup name: ``name + suffix`` in the same
directory, or ``backup_dir/<relative path> + suffix``. Only then is the new file renamed over the
name (``rename`` replaces atomically), so the name never disappears, as the original did
(``ln file file<suffix>`` then ``rename``); a deleted file is linked then unlinked. Where a hard
link is impossible (another filesystem: EXDEV) the old file is copied to the backup name; where
it is refused (EPERM from fs.protected_hardlinks, EMLINK) it is renamed to it and moved back if
the install then fails. An older backup of the same name is replaced. A failed backup fails
that entry (old copy kept), as rsync does. A directory in the way of a new file is moved whole
to its backup name; a deleted directory is not backed up itself, its files are (with a suffix
and no backup dir, their backups keep the directory alive, as with rsync). Backup directories
are created 0o700; a relative backup dir is walked from DEST without following symlinks.

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
import stat
from collections import OrderedDict
from collections.abc import Iterable
from types import TracebackType
from typing import NamedTuple

from mrsync.io.running_digest import MIN_SIZE as RUNNING_DIGEST_MIN
from mrsync.io.running_digest import RunningDigest
from mrsync.plan.manifest import Entry, Kind, Manifest
from mrsync.plan.options import SyncOptions
from mrsync.plan.scan import EMPTY_DIGEST, display, hash_fd

MAX_OPEN_FILES = 64  # temp files kept open at once; more are closed and reopened on demand
MAX_DIR_FDS = 64  # cached directory fds (see module docstring)

_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)
_DIR_WALK = _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_META = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_TEMP_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_REOPEN = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_BASE_MAX = 200  # bytes of the basename kept in a temp name (NAME_MAX is 255)
_DIR_LIST = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # readable, for listdir

# Cached all-zero pages by length. A page is only compared when its first and last bytes are
# zero. Measured (CPython 3.11, x86-64) per 1400 / 61440-byte page: ``bytes == zero`` 0.04 /
# 0.8 us (memcmp), ``bytes(memoryview) == zero`` 0.12 / 2.2 us, ``bytearray.count(0)`` 0.6 / 24
# us, ``bytes(v).strip(b"\0")`` 1.8 / 72 us, ``memoryview == zero`` 1.4 / 56 us (element-wise),
# ``not any(v)`` 7.7 / 336 us. Hence: compare bytes/bytearray directly, copy a memoryview first.
_ZERO_PAGES: dict[int, bytes] = {}


def _pwritev_all(fd: int, buffers: list[memoryview] | list[bytes], offset: int) -> None:
    """All of ``buffers`` at ``offset``; a short write (a signal, a full disk) is resumed
    where it stopped, and a write that makes no progress is an error. Usually one call."""
    views: list[memoryview | bytes] = list(buffers)
    first = 0  # views before it are written
    while first < len(views):
        n = os.pwritev(fd, views[first : first + _IOV_MAX], offset)
        if n <= 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        offset += n
        while first < len(views) and n >= len(views[first]):
            n -= len(views[first])
            first += 1
        if n:
            views[first] = memoryview(views[first])[n:]


_IOV_MAX = 1024


def _is_zero(data: bytes | bytearray | memoryview, view: memoryview) -> bool:
    n = len(view)
    if view[0] or view[n - 1]:
        return False
    zero = _ZERO_PAGES.get(n)
    if zero is None:
        if len(_ZERO_PAGES) >= 16:
            _ZERO_PAGES.clear()
        zero = _ZERO_PAGES[n] = bytes(n)
    if isinstance(data, bytes | bytearray):
        return data == zero
    return bytes(view) == zero


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
    return b"." + base[:_TEMP_BASE_MAX] + b".mrsync." + tag.encode() + os.urandom(4).hex().encode()


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


def _bad_rel_path(path: bytes) -> bool:
    """True for anything but a plain relative path below DEST (no "", ".", "..", NUL, "/x")."""
    if not path or path.startswith(b"/") or b"\0" in path:
        return True
    return any(c in (b"", b".", b"..") for c in path.split(b"/"))


def _lstat_at(dfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


class FileStore:
    def __init__(
        self,
        dest_root: str,
        manifest: Manifest,
        *,
        options: SyncOptions | None = None,
        numeric_ids: bool | None = None,
    ) -> None:
        """``options`` gives --backup/--suffix/--backup-dir, -X (``delete_first``) and
        --numeric-ids; the rest of it is the caller's business (compare, dry run).

        Raises ``ValueError`` for option combinations the original refused too.
        """
        self.options = options if options is not None else SyncOptions()
        opts = self.options
        if opts.backup and opts.delete_first:
            raise ValueError("--backup and -X cannot be combined")
        self._suffix = os.fsencode(opts.suffix)
        if opts.backup and b"/" in self._suffix:
            raise ValueError("--suffix cannot contain slashes")
        if opts.backup and not opts.backup_dir and not self._suffix:
            raise ValueError("--suffix cannot be empty without --backup-dir")
        self.dest_root = os.fsencode(dest_root)
        self.entries = manifest.entries
        # The manifest carries numeric ids only, so ids are always applied numerically; the
        # flag is kept for the caller's interface (rsync's name mapping would need names).
        # The old keyword still works and wins over ``options.numeric_ids``.
        self.numeric_ids = opts.numeric_ids if numeric_ids is None else numeric_ids
        self._backup_on = opts.backup
        self._delete_first = opts.delete_first
        self._bak_dir = os.fsencode(opts.backup_dir) if opts.backup and opts.backup_dir else None
        self._bak_root_fd: int | None = None
        self._bak_fds: OrderedDict[bytes, int] = OrderedDict()  # rel dir -> fd below backup dir
        self._predeleted: set[int] = set()  # -X: files whose old copy is already unlinked
        self._presized: set[int] = set()  # temps made by ftruncate: unwritten ranges are holes
        self._running: dict[int, RunningDigest] = {}  # large files: digest while written
        # Gathered pages, see write(): (file id, offset, bytes, the file's size).
        self._pending: tuple[int, int, bytearray, int] | None = None
        self._expected: set[int] | None = None  # see plan()
        self._keep: set[int] = set()
        self.errors: list[FileError] = []
        self._is_root = os.geteuid() == 0
        self._root_fd: int | None = None
        self._prepared = False
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
        if self._prepared:
            raise RuntimeError("FileStore.prepare() called twice")
        self._open_root(create=True)
        self._prepared = True
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

    def delete(self, paths: list[bytes]) -> None:
        """--delete: remove these paths (relative to DEST, as the comparison listed them):
        files, symlinks (never followed: a symlink to a directory goes as a link) and whole
        directory trees. A path already gone is ignored, as rsync ignores vanished files. Each
        failure is recorded in ``errors`` and the rest goes on. With --backup every deleted
        non-directory is kept under its backup name instead. Left alone, as rsync protects
        them: a backup dir inside DEST, its contents and its ancestors; with a suffix and no
        backup dir, names ending in the suffix.
        """
        if not paths or not self._open_root(create=False):
            return  # no DEST: nothing to delete
        for path in paths:
            if _bad_rel_path(path):
                self._record(path, "cannot delete: not a path inside the destination")
                continue
            if self._in_backup_dir(path) or self._protected(_split(path)[1]):
                continue
            parent, base = _split(path)
            try:
                try:
                    dfd = self._dirfd(parent)
                except FileNotFoundError:
                    continue  # parent already gone (deleted with its tree, or vanished)
                st = _lstat_at(dfd, base)
                if st is None:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    self._forget_dirs(path)
                    # The walk uses its own fds: dfd may be evicted meanwhile, so keep a dup.
                    keep = os.dup(dfd)
                    try:
                        self._remove_tree(keep, base, path)
                    finally:
                        os.close(keep)
                    continue
                if self._backup_on and self._backup(dfd, base, path, st):
                    continue  # renamed to the backup name: nothing left to unlink
                os.unlink(base, dir_fd=dfd)
            except _ERRORS as exc:
                self._record(path, f"cannot delete: {_strerror(exc)}")

    # Pages arrive a datagram at a time (1,400 bytes on an Ethernet path); one pwrite each
    # would cost a system call per datagram. Contiguous pages of one file are gathered and
    # written together, up to COALESCE bytes; anything that reads or settles a file flushes.
    COALESCE = 1024 * 1024

    def write(self, file_id: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write one page of a FILE at ``offset``. Errors are recorded (see :meth:`is_failed`)
        and later pages of that file are ignored, as are pages of a finished file."""
        pending = self._pending
        if pending is not None:
            # The hot path: the next page of the file being gathered (checked when gathering
            # began: the file is open, neither failed nor done; the bound is its size).
            pid, poff, pbuf, psize = pending
            n = len(data)
            if (
                pid == file_id
                and poff + len(pbuf) == offset
                and offset + n <= psize
                and len(pbuf) < self.COALESCE
                and n
                and (data[0] or data[n - 1] or file_id not in self._presized)
            ):
                pbuf += data
                return
        entry = self._file_entry(file_id)
        view = memoryview(data).cast("B")
        if offset < 0 or offset + len(view) > entry.size:
            raise ValueError(
                f"write of {len(view)} bytes at {offset} is outside {display(entry.path)}"
                f" ({entry.size} bytes)"
            )
        if file_id in self._failed or file_id in self._done or not view:
            return
        pending = self._pending
        if pending is not None:
            pid, poff, pbuf, _ = pending
            if (
                pid == file_id
                and poff + len(pbuf) == offset
                and len(pbuf) < self.COALESCE
                and not (file_id in self._presized and _is_zero(data, view))
            ):
                pbuf += view
                return
            self.flush()
            if file_id in self._failed:  # the flush was this file's, and it failed
                return
        try:
            fd = self._temp_fd(file_id)
            if file_id in self._presized and _is_zero(data, view):
                # A hole already reads as zeros: keep sparse files sparse.
                self._wrote(file_id, fd, offset, len(view))
                return
        except _ERRORS as exc:
            self._fail(file_id, f"write failed: {_strerror(exc)}")
            return
        self._pending = (file_id, offset, bytearray(view), entry.size)

    DIRECT_RUN = 8  # pages: a run at least this long goes out in one pwritev, uncopied

    def write_pages(
        self, file_id: int, offset: int, pages: list[memoryview] | list[bytes]
    ) -> None:
        """:meth:`write` for consecutive pages, the first at ``offset``. A long run with no
        page that could be a hole (first and last byte of each nonzero) is written straight
        from the caller's buffers with one ``pwritev``; anything else page by page."""
        total = sum(map(len, pages))
        if (
            len(pages) >= self.DIRECT_RUN
            and all(page[0] and page[-1] for page in pages)
            and file_id not in self._failed
            and file_id not in self._done
            and offset >= 0
            and offset + total <= self._file_entry(file_id).size
        ):
            self.flush()  # what was gathered goes first (it may be the same file's)
            if file_id in self._failed:
                return
            try:
                fd = self._temp_fd(file_id)
                _pwritev_all(fd, pages, offset)
                self._wrote(file_id, fd, offset, total)
            except _ERRORS as exc:
                self._fail(file_id, f"write failed: {_strerror(exc)}")
            return
        write = self.write
        for page in pages:
            write(file_id, offset, page)
            offset += len(page)

    def flush(self) -> None:
        """Write out gathered pages."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        file_id, offset, buf, _ = pending
        view = memoryview(buf)
        try:
            fd = self._temp_fd(file_id)
            at = offset
            while view:
                n = os.pwrite(fd, view, at)
                if n <= 0:
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                view = view[n:]
                at += n
            self._wrote(file_id, fd, offset, len(buf))
        except _ERRORS as exc:
            self._fail(file_id, f"write failed: {_strerror(exc)}")

    def finish_file(self, file_id: int, digest: bytes | None = None) -> FileError | None:
        """All pages are written: check the digest (``digest``, or the manifest's), set
        owner/mode/mtime, rename into place.

        Returns None when the new content is in place. On a digest mismatch or an I/O error
        the temp file is removed, the old copy kept, and the (recorded) error returned.
        Failing to set the owner (as root) after the content is in place is recorded in
        ``errors`` but does not make this return an error: the content is there.
        Calling it again for a finished or failed file returns the same outcome.
        """
        self.flush()
        entry = self._file_entry(file_id)
        if file_id in self._failed:
            return self._failed[file_id]
        if file_id in self._done:
            return None
        parent, base = _split(entry.path)
        try:
            fd = self._temp_fd(file_id)
            st = os.fstat(fd)
            running = self._running.pop(file_id, None)
            got = running.digest(fd) if running is not None else hash_fd(fd, entry.size)[0]
            want = entry.digest if digest is None else digest
            if st.st_size != entry.size or got != want:
                return self._fail(file_id, "digest mismatch")
            self._set_meta_fd(fd, entry, st)
            dfd = self._dirfd(parent)
            self._install(dfd, self._temps[file_id][1], entry)
        except _ERRORS as exc:
            return self._fail(file_id, f"cannot install: {_strerror(exc)}")
        self._drop_fd(file_id)
        del self._temps[file_id]
        self._presized.discard(file_id)
        self._predeleted.discard(file_id)
        self._done.add(file_id)
        return None

    def abort_file(self, file_id: int) -> None:
        """Drop the temp file (if any). Records nothing; a later write starts afresh."""
        self._file_entry(file_id)
        if self._pending is not None and self._pending[0] == file_id:
            self._pending = None
        self._discard_temp(file_id)

    def is_failed(self, file_id: int) -> bool:
        """True once a write or finish of this file failed (its error is in ``errors``)."""
        return file_id in self._failed

    def plan(self, data: Iterable[int], keep: Iterable[int] = ()) -> None:
        """What the comparison decided: ``data`` are the files whose content is coming (one
        that never arrives is reported "not received"); ``keep`` are entries to leave exactly
        as they are (--update, --ignore-existing). Any other file's content is current (the
        quick check, -c or --size-only said so) and only its metadata is brought in line, as
        rsync does. Without a plan, every file that fails the quick check is "not received"."""
        self._expected = set(data)
        self._keep = set(keep)

    def finish_tree(self) -> list[FileError]:
        """After all data: empty files and symlinks (temp name + rename, an identical link is
        left alone), metadata of unchanged files (no content rewrite), then the mode, owner
        and mtime of directories, deepest first, DEST's own (entry b".") last.

        A non-empty FILE that was neither finished nor failed and that still fails the quick
        check (missing, wrong type, size or mtime) is reported as "not received".
        Returns every error of the session (a copy of ``errors``).
        """
        self.flush()
        self._root()
        links: list[int] = []
        for file_id, entry in enumerate(self.entries):
            if entry.kind == Kind.DIR or file_id in self._failed or file_id in self._keep:
                continue
            if entry.kind == Kind.FILE and entry.link >= 0:
                links.append(file_id)  # after every other entry is in place
                continue
            if file_id in self._done:
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
                    and (
                        (st.st_size == entry.size and st.st_mtime_ns == entry.mtime_ns)
                        or (self._expected is not None and file_id not in self._expected)
                    )
                ):
                    self._fix_meta(entry, dfd, base, st)
                else:
                    self._fail(file_id, "not received")
                    continue
            except _ERRORS as exc:
                self._fail(file_id, f"cannot create: {_strerror(exc)}")
                continue
            self._done.add(file_id)

        for file_id in links:
            try:
                self._finish_link(file_id)
            except _ERRORS as exc:
                self._fail(file_id, f"cannot hard link: {_strerror(exc)}")
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
        self._pending = None
        for file_id in list(self._temps):
            self._discard_temp(file_id)
        for fd in [*self._dir_fds.values(), *self._bak_fds.values()]:
            os.close(fd)
        self._dir_fds.clear()
        self._bak_fds.clear()
        if self._bak_root_fd is not None:
            os.close(self._bak_root_fd)
            self._bak_root_fd = None
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
        if file_id in self._predeleted:
            reason += "; the old file was already removed (-X, --delete-first)"
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

    def _open_root(self, *, create: bool) -> bool:
        """Open DEST (followed, the operator's choice), creating it with parents if ``create``.
        False when it does not exist and ``create`` is off; StoreError when it is unusable."""
        if self._root_fd is not None:
            return True
        try:
            if create:
                os.makedirs(self.dest_root, exist_ok=True)
            self._root_fd = os.open(self.dest_root, _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            if not create:
                return False
            raise StoreError(f"{display(self.dest_root)}: {_strerror(exc)}") from exc
        except OSError as exc:
            raise StoreError(f"{display(self.dest_root)}: {_strerror(exc)}") from exc
        return True

    def _root(self) -> int:
        if not self._prepared or self._root_fd is None:
            raise RuntimeError("FileStore.prepare() must be called first")
        return self._root_fd

    def _dirfd(self, rel: bytes) -> int:
        """An O_PATH fd of directory ``rel`` (b"" = DEST), walked without following symlinks.

        The fd belongs to the cache: use it at once, before the next ``_dirfd`` call.
        """
        root = self._root_fd  # open once delete() or prepare() ran
        if root is None:
            raise RuntimeError("FileStore.prepare() must be called first")
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
            self._root()  # directories must exist: prepare() first
            entry = self.entries[file_id]
            bad = self._bad_ancestor(entry.path)
            if bad is not None:
                raise _Refused(f"directory {display(bad)} could not be created")
            parent, base = _split(entry.path)
            dfd = self._dirfd(parent)
            if self._delete_first:
                # -X: free the old file's blocks before the new one takes any (a directory in
                # the way is left to _install, which only swaps it at the end).
                st = _lstat_at(dfd, base)
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    os.unlink(base, dir_fd=dfd)
                    self._predeleted.add(file_id)
            fd, name = self._create_temp(dfd, base)
            self._temps[file_id] = (parent, name)
            try:
                os.ftruncate(fd, entry.size)  # holes read as zeros; no blocks allocated yet
            except OSError:
                os.close(fd)
                raise
            self._presized.add(file_id)
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

    def _wrote(self, file_id: int, fd: int, offset: int, length: int) -> None:
        """Bytes of a file reached their final content: a large file's digest runs along."""
        running = self._running.get(file_id)
        if running is None:
            size = self.entries[file_id].size
            if size < RUNNING_DIGEST_MIN:
                return
            running = self._running[file_id] = RunningDigest(size)
        running.wrote(fd, offset, length)

    def _discard_temp(self, file_id: int) -> None:
        self._running.pop(file_id, None)
        self._drop_fd(file_id)
        self._presized.discard(file_id)
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
        if st is None:
            os.replace(temp, base, src_dir_fd=dfd, dst_dir_fd=dfd)
            return
        if self._backup_on:
            if stat.S_ISDIR(st.st_mode):
                self._forget_dirs(entry.path)
            moved = self._backup(dfd, base, entry.path, st)
            try:
                os.replace(temp, base, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError:
                if moved:  # put the old one back under its name
                    with contextlib.suppress(OSError):
                        self._unbackup(dfd, base, entry.path)
                raise
            return
        if not stat.S_ISDIR(st.st_mode):
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
            import shutil  # rarely needed; imported then, not at every target's start

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

    # ------------------------------------------------------------------ deletion

    def _remove_tree(self, dfd: int, base: bytes, rel: bytes) -> None:
        """Remove directory ``base`` in ``dfd`` (``rel`` from DEST) and everything below it,
        never following a symlink; every failure is recorded and the walk goes on."""
        try:
            fd = os.open(base, _DIR_LIST, dir_fd=dfd)
        except _ERRORS as exc:
            self._record(rel, f"cannot delete: {_strerror(exc)}")
            return
        kept = False  # a backup (suffix, no backup dir) or a failure keeps the dir non-empty
        try:
            for name in sorted(os.fsencode(n) for n in os.listdir(fd)):
                child = rel + b"/" + name
                try:
                    st = _lstat_at(fd, name)
                    if st is None:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        self._remove_tree(fd, name, child)
                        continue
                    if self._protected(name):
                        kept = True
                        continue
                    if self._backup_on:
                        moved = self._backup(fd, name, child, st)
                        kept = kept or self._bak_dir is None
                        if moved:
                            continue
                    os.unlink(name, dir_fd=fd)
                except _ERRORS as exc:
                    self._record(child, f"cannot delete: {_strerror(exc)}")
        except _ERRORS as exc:
            self._record(rel, f"cannot delete: {_strerror(exc)}")
        finally:
            os.close(fd)
        try:
            os.rmdir(base, dir_fd=dfd)
        except OSError as exc:
            if kept and exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return  # it holds the backups of its files
            self._record(rel, f"cannot delete: {_strerror(exc)}")

    # ------------------------------------------------------------------ backups

    def _protected(self, name: bytes) -> bool:
        """With --backup and no backup dir, names ending in the suffix are backups and are not
        deleted (rsync adds the protect rule ``P *<suffix>`` for the same reason)."""
        return self._backup_on and self._bak_dir is None and name.endswith(self._suffix)

    def _in_backup_dir(self, path: bytes) -> bool:
        if self._bak_dir is None or os.path.isabs(self._bak_dir):
            return False
        bak = os.path.normpath(self._bak_dir)
        if bak.startswith(b".."):
            return False
        # The backup dir, anything in it, and its ancestors (whose removal would take it along).
        return path == bak or path.startswith(bak + b"/") or bak.startswith(path + b"/")

    def _backup_slot(self, dfd: int, rel: bytes) -> tuple[int, bytes]:
        """(dir fd, name) of the backup of ``rel`` whose directory is ``dfd``. The fd is ``dfd``
        itself or one from the backup cache, which never evicts the caller's ``dfd``."""
        parent, base = _split(rel)
        name = base + self._suffix
        if self._bak_dir is None:
            return dfd, name
        return self._bak_dirfd(parent), name

    def _bak_dirfd(self, rel: bytes) -> int:
        """The fd of ``backup_dir/rel``, created (0o700) as needed, never through a symlink."""
        if self._bak_root_fd is None:
            bd = self._bak_dir
            assert bd is not None
            if os.path.isabs(bd):  # the operator's own path: followed, like DEST
                os.makedirs(bd, exist_ok=True)
                self._bak_root_fd = os.open(bd, _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            else:
                self._bak_root_fd = self._walk_create(self._dirfd(b""), bd)
        if not rel:
            return self._bak_root_fd
        cached = self._bak_fds.get(rel)
        if cached is not None:
            self._bak_fds.move_to_end(rel)
            return cached
        fd = self._walk_create(self._bak_root_fd, rel)
        self._bak_fds[rel] = fd
        if len(self._bak_fds) > MAX_DIR_FDS:
            os.close(self._bak_fds.popitem(last=False)[1])
        return fd

    @staticmethod
    def _walk_create(start: int, rel: bytes) -> int:
        """A new fd of directory ``rel`` below ``start``, made with mkdir where missing."""
        fd = start
        try:
            for comp in rel.split(b"/"):
                if comp in (b"", b"."):
                    continue
                try:
                    new = os.open(comp, _DIR_WALK, dir_fd=fd)
                except FileNotFoundError:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(comp, 0o700, dir_fd=fd)
                    new = os.open(comp, _DIR_WALK, dir_fd=fd)
                if fd != start:
                    os.close(fd)
                fd = new
        except OSError as exc:
            if fd != start:
                os.close(fd)
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise _Refused(
                    f"backup directory {display(rel)} is not a directory"
                    " (symlinks are not followed)"
                ) from exc
            raise
        return fd if fd != start else os.dup(start)

    def _backup(self, dfd: int, base: bytes, rel: bytes, st: os.stat_result) -> bool:
        """Keep ``base`` (in ``dfd``, ``rel`` from DEST) under its backup name. Returns True
        when it was *moved* there (the name is gone), False when it was linked or copied (the
        name still holds it). Raises on failure: the caller must then leave ``base`` alone."""
        try:
            bfd, bak = self._backup_slot(dfd, rel)
            if stat.S_ISDIR(st.st_mode):
                self._clear_slot(bfd, bak)
                os.rename(base, bak, src_dir_fd=dfd, dst_dir_fd=bfd)
                return True
            try:
                self._link_backup(dfd, base, bfd, bak)
                return False
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    self._copy_backup(dfd, base, bfd, bak, st)
                    return False
                if exc.errno not in (errno.EPERM, errno.EMLINK):
                    raise
            os.replace(base, bak, src_dir_fd=dfd, dst_dir_fd=bfd)  # no link allowed: move
            return True
        except OSError as exc:
            raise OSError(exc.errno, f"cannot make backup: {_strerror(exc)}") from exc
        except _Refused as exc:
            raise _Refused(f"cannot make backup: {exc}") from exc

    def _link_backup(self, dfd: int, base: bytes, bfd: int, bak: bytes) -> None:
        try:
            os.link(base, bak, src_dir_fd=dfd, dst_dir_fd=bfd, follow_symlinks=False)
        except FileExistsError:
            self._clear_slot(bfd, bak)  # an older backup of that name: rsync replaces it
            os.link(base, bak, src_dir_fd=dfd, dst_dir_fd=bfd, follow_symlinks=False)

    def _unbackup(self, dfd: int, base: bytes, rel: bytes) -> None:
        bfd, bak = self._backup_slot(dfd, rel)
        os.rename(bak, base, src_dir_fd=bfd, dst_dir_fd=dfd)

    @staticmethod
    def _clear_slot(bfd: int, bak: bytes) -> None:
        st = _lstat_at(bfd, bak)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            import shutil

            shutil.rmtree(bak, dir_fd=bfd)
        else:
            os.unlink(bak, dir_fd=bfd)

    def _copy_backup(self, dfd: int, base: bytes, bfd: int, bak: bytes, st: os.stat_result) -> None:
        """The backup dir is on another filesystem: copy (file or symlink), then rename."""
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(base, dir_fd=dfd)
            for _ in range(100):
                tmp = _temp_name(bak)
                try:
                    os.symlink(target, tmp, dir_fd=bfd)
                    break
                except FileExistsError:
                    continue
            else:
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
        elif stat.S_ISREG(st.st_mode):
            src = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                dst, tmp = self._create_temp(bfd, bak)
                try:
                    offset = 0
                    while offset < st.st_size:
                        n = os.sendfile(dst, src, offset, min(st.st_size - offset, 1 << 30))
                        if n <= 0:
                            break
                        offset += n
                    if self._is_root:
                        with contextlib.suppress(OSError):
                            os.fchown(dst, st.st_uid, st.st_gid)
                    os.fchmod(dst, stat.S_IMODE(st.st_mode))
                    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
                except BaseException:
                    os.close(dst)
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=bfd)
                    raise
                os.close(dst)
            finally:
                os.close(src)
        else:
            raise _Refused("special files cannot be backed up to another filesystem")
        try:
            self._clear_slot(bfd, bak)
            os.rename(tmp, bak, src_dir_fd=bfd, dst_dir_fd=bfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=bfd)
            raise

    # ------------------------------------------------------------------ hard links

    def _finish_link(self, file_id: int) -> None:
        """-H: make the entry a hard link to the installed file of ``entries[entry.link]``
        (followed to the first of the group), unless it already is one."""
        entry = self.entries[file_id]
        tid = entry.link
        while 0 <= tid < file_id and self.entries[tid].kind == Kind.FILE:
            if self.entries[tid].link < 0:
                break
            tid = self.entries[tid].link
        else:
            raise _Refused(f"bad hard link target {entry.link}")
        target = self.entries[tid]
        if tid in self._failed or tid not in self._done:
            raise _Refused(f"{display(target.path)} was not updated")
        bad = self._bad_ancestor(entry.path)
        if bad is not None:
            raise _Refused(f"directory {display(bad)} could not be created")
        tparent, tbase = _split(target.path)
        tfd = os.dup(self._dirfd(tparent))  # dup: the next _dirfd call may evict it
        try:
            tst = _lstat_at(tfd, tbase)
            if tst is None or not stat.S_ISREG(tst.st_mode):
                raise _Refused(f"{display(target.path)} is missing")
            parent, base = _split(entry.path)
            dfd = self._dirfd(parent)
            st = _lstat_at(dfd, base)
            if st is not None and (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino):
                return
            for _ in range(100):
                name = _temp_name(base)
                try:
                    os.link(tbase, name, src_dir_fd=tfd, dst_dir_fd=dfd, follow_symlinks=False)
                    break
                except FileExistsError:
                    continue
            else:
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
            self._temps[file_id] = (parent, name)
            self._install(dfd, name, entry)
            del self._temps[file_id]
        finally:
            os.close(tfd)

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
