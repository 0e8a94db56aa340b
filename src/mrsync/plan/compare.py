"""What a target needs: its own tree compared with the source manifest (rsync's quick check).

Also the first line of defence for "bytes you can trust": :func:`validate_manifest` refuses any
manifest whose paths could reach outside the target root. The file store checks again while
writing (it never writes through a symlink), so a bug here cannot turn into a write outside DEST.
"""

from __future__ import annotations

import os
import stat
from typing import NamedTuple

from mrsync.plan.filters import Filter
from mrsync.plan.manifest import Entry, Kind, Manifest
from mrsync.plan.options import SyncOptions
from mrsync.plan.scan import ScanError, display, hash_file

_MAX_MODE = 0o7777
_MIN_NS, _MAX_NS = -(2**63), 2**63 - 1  # what a timespec of a 64-bit time_t holds
_NO_ID = 2**32 - 1  # (uid_t)-1 means "unchanged" to chown(2)


class UnsafePath(ValueError):
    """A manifest entry the receiver refuses to act on (the whole manifest is refused)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class Needs(NamedTuple):
    # ids (indices into manifest.entries) of FILEs whose content must be sent. Metadata-only
    # differences (mode, owner, mtime of unchanged files, symlinks, empty files, directories)
    # are fixed by the store's finish_tree() without any data.
    data: list[int]
    # With --delete (and not -l): paths relative to DEST to remove, children before their
    # parents. Excluded paths are never listed (rsync protects them on the receiver), nor
    # is a directory that still holds one.
    delete: list[bytes] = []  # never mutated: compare() passes fresh lists
    # One rsync ``-i`` style line per change, in manifest order, then "*deleting   path".
    itemized: list[str] = []
    # ids of entries the target must leave exactly as they are, metadata included: skipped by
    # --update (newer on the target) or --ignore-existing (already there), and everything
    # below a directory that --ignore-existing skipped. rsync does not touch these.
    keep: list[int] = []


def _check_path(path: bytes, index: int) -> None:
    # (The path is made printable only for an error: that was a third of checking a manifest.)
    if not path:
        raise UnsafePath(display(path), "empty path")
    if b"\0" in path:
        raise UnsafePath(display(path), "NUL byte in path")
    if path.startswith(b"/"):
        raise UnsafePath(display(path), "absolute path")
    if path == b".":
        if index != 0:
            raise UnsafePath(display(path), "'.' is only allowed as the first (root) entry")
        return
    for comp in path.split(b"/"):
        if comp == b"":
            raise UnsafePath(display(path), "empty path component")
        if comp == b"..":
            raise UnsafePath(display(path), "'..' component")
        if comp == b".":
            raise UnsafePath(display(path), "'.' component")


def _check_fields(entry: Entry, digests_follow: bool) -> None:
    if not 0 <= entry.mode <= _MAX_MODE:
        raise UnsafePath(display(entry.path), f"invalid mode {entry.mode:#o}")
    if entry.kind == Kind.FILE:
        if entry.size < 0:
            raise UnsafePath(display(entry.path), f"invalid size {entry.size}")
        if len(entry.digest) != 32 and not (digests_follow and entry.size and not entry.digest):
            raise UnsafePath(display(entry.path), "file without a 32-byte digest")
    elif entry.size != 0:
        raise UnsafePath(display(entry.path), "non-file with a size")
    if not _MIN_NS <= entry.mtime_ns <= _MAX_NS:
        raise UnsafePath(display(entry.path), "mtime out of range")
    if not (0 <= entry.uid < _NO_ID and 0 <= entry.gid < _NO_ID):
        raise UnsafePath(display(entry.path), "uid or gid out of range")
    if entry.kind == Kind.SYMLINK and (not entry.target or b"\0" in entry.target):
        raise UnsafePath(display(entry.path), "empty symlink target or NUL byte in it")


def validate_manifest(manifest: Manifest) -> None:
    """Raise :class:`UnsafePath` unless every entry is safe to create under DEST.

    Refused: empty paths, NUL bytes, absolute paths, empty, ``.`` or ``..`` components; ``.``
    anywhere but as the first entry (and then it must be a DIR); duplicate paths; a child
    whose parent entry is missing, comes later, or is not a DIR. Top-level names
    (no ``/``) need no parent entry. Also refused, because the store relies on them: modes
    beyond 0o7777, mtimes beyond 64 bits, uids/gids outside 0..2**32-2, FILEs without a
    32-byte digest (none at all is allowed on a non-empty one when the digests follow the
    data) or with a negative size, sizes on non-files, empty symlink targets or targets
    containing NUL.

    Symlink *targets* may be absolute or contain ``..``: they are recorded, never followed.
    """
    kinds: dict[bytes, Kind] = {}
    for index, entry in enumerate(manifest.entries):
        path = entry.path
        _check_path(path, index)
        if path == b"." and entry.kind != Kind.DIR:
            raise UnsafePath(".", "root entry must be a directory")
        if path in kinds:
            raise UnsafePath(display(path), "duplicate path")
        parent, sep, _ = path.rpartition(b"/")
        if sep:
            parent_kind = kinds.get(parent)
            if parent_kind is None:
                raise UnsafePath(display(path), "parent directory is not in the manifest before it")
            if parent_kind != Kind.DIR:
                raise UnsafePath(display(path), "parent is not a directory")
        _check_fields(entry, manifest.digests_follow)
        kinds[path] = entry.kind


_NEW = "+++++++++"


def _flags(
    entry: Entry,
    st: os.stat_result,
    *,
    changed: bool = False,
    size: bool = False,
    perms: bool = True,
) -> str:
    """rsync's ``cstpoguax`` columns for an existing destination entry."""
    uid = os.geteuid()
    root = uid == 0
    return "".join(
        (
            "c" if changed else ".",
            "s" if size else ".",
            "t" if st.st_mtime_ns != entry.mtime_ns else ".",
            "p" if perms and stat.S_IMODE(st.st_mode) != entry.mode else ".",
            "o" if root and st.st_uid != entry.uid else ".",
            "g" if st.st_gid != entry.gid and (root or entry.gid in _groups()) else ".",
            "...",
        )
    )


_GROUPS: set[int] | None = None


def _groups() -> set[int]:
    global _GROUPS
    if _GROUPS is None:
        _GROUPS = {os.getegid(), *os.getgroups()}
    return _GROUPS


def _shown(entry: Entry) -> str:
    if entry.path == b".":
        return "./"
    return display(entry.path) + ("/" if entry.kind == Kind.DIR else "")


def _lstat(path: bytes) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def compare(manifest: Manifest, dest_root: str, options: SyncOptions | None = None) -> Needs:
    """What DEST lacks to become what ``rsync -a [--delete] SRC DEST`` would make it.

    ``data``: the FILEs whose content must be sent. By default rsync's quick check: missing,
    not a regular file, or size or mtime_ns differs; ``checksum``: sizes differ or the blake3
    of DEST's file differs from the manifest digest; ``size_only``: sizes differ. ``update``
    skips a regular file that is newer on DEST, ``ignore_existing`` anything that exists on
    DEST (except a directory where a directory is) — both also into ``keep``. Zero-length
    files, symlinks and directories never need data, nor do hard links (``link >= 0``: the
    store links them to their first name).

    Nothing in DEST is followed (``lstat``) except DEST itself, as rsync does; a file below a
    symlink or a non-directory needs data (the store replaces the parent). Unreadable
    destination entries count as needing data: the store will then report the real error.

    ``delete``/``itemized``: see :class:`Needs`. Call :func:`validate_manifest` first.
    """
    opts = options if options is not None else SyncOptions()
    filt = Filter(opts.rules)
    root = os.fsencode(dest_root)
    try:
        root_ok = stat.S_ISDIR(os.stat(root).st_mode)
    except OSError:
        root_ok = False
    entries = manifest.entries
    # Whether each directory below DEST (relative path) is a real directory all the way up.
    # Parents come before children in a valid manifest, so one pass fills it in order.
    dir_ok: dict[bytes, bool] = {b"": root_ok}
    kept_dirs: set[bytes] = set()  # directories skipped by --ignore-existing
    dest_st: dict[int, os.stat_result] = {}  # regular files found on DEST, by id
    needs: list[int] = []
    needed: set[int] = set()  # files that will be rewritten (data or not)
    keep: list[int] = []
    items: list[str] = []
    for file_id, entry in enumerate(entries):
        path = entry.path
        parent = path.rpartition(b"/")[0]
        if parent in kept_dirs:
            keep.append(file_id)
            if entry.kind == Kind.DIR:
                kept_dirs.add(path)
            continue
        st: os.stat_result | None
        if path == b".":
            st = os.stat(root) if root_ok else None
        else:
            st = _lstat(root + b"/" + path) if dir_ok.get(parent, False) else None
        shown = _shown(entry)

        if entry.kind == Kind.DIR:
            ok = st is not None and stat.S_ISDIR(st.st_mode)
            dir_ok[b"" if path == b"." else path] = ok
            if path == b".":
                dir_ok[b"."] = ok
            if st is not None and not ok and opts.ignore_existing:
                keep.append(file_id)
                kept_dirs.add(path)
            elif st is None or not ok:
                items.append(f"cd{_NEW} {shown}")
            else:
                flags = _flags(entry, st)
                if flags.strip("."):
                    items.append(f".d{flags} {shown}")
            continue

        if opts.ignore_existing and st is not None:
            keep.append(file_id)
            continue

        if entry.kind == Kind.SYMLINK:
            suffix = f" {shown} -> {display(entry.target)}"
            if st is None or not stat.S_ISLNK(st.st_mode):
                items.append(f"cL{_NEW}{suffix}")
                continue
            try:
                same = os.readlink(root + b"/" + path) == entry.target
            except OSError:
                same = False
            if not same:  # recreated: rsync reports just the changed value
                items.append(f"cLc........{suffix}")
                continue
            flags = _flags(entry, st, perms=False)
            if flags.strip("."):
                items.append(f".L{flags}{suffix}")
            continue

        is_reg = st is not None and stat.S_ISREG(st.st_mode)
        if entry.link >= 0 and 0 <= entry.link < file_id:
            first = entries[entry.link]
            suffix = f" {shown} => {display(first.path)}"
            first_st = dest_st.get(entry.link)
            linked = (
                st is not None
                and is_reg
                and first_st is not None
                and (st.st_dev, st.st_ino) == (first_st.st_dev, first_st.st_ino)
                and entry.link not in needed
            )
            if linked:
                assert st is not None
                flags = _flags(entry, st)
                if flags.strip("."):
                    items.append(f".f{flags} {shown}")
            elif st is None or not is_reg:
                items.append(f"hf{_NEW}{suffix}")
            else:
                items.append(f"hf{_flags(entry, st, size=st.st_size != entry.size)}{suffix}")
            continue

        if st is None or not is_reg:
            if entry.size:
                needs.append(file_id)
            needed.add(file_id)
            items.append(f">f{_NEW} {shown}")
            continue
        dest_st[file_id] = st
        if opts.update and st.st_mtime_ns > entry.mtime_ns:
            keep.append(file_id)
            continue
        size_differs = st.st_size != entry.size
        content_differs = False
        if opts.size_only:
            transfer = size_differs
        elif opts.checksum:
            if size_differs:
                transfer = True
            else:
                try:
                    dest_digest = hash_file(root + b"/" + path, entry.size)
                except ScanError:
                    dest_digest = b""
                content_differs = transfer = dest_digest != entry.digest
        else:
            transfer = size_differs or st.st_mtime_ns != entry.mtime_ns
        flags = _flags(entry, st, changed=content_differs, size=size_differs)
        if transfer:
            if entry.size:
                needs.append(file_id)
            needed.add(file_id)
            items.append(f">f{flags} {shown}")
        elif flags.strip("."):
            items.append(f".f{flags} {shown}")

    deletions: list[bytes] = []
    if opts.delete and not opts.only:
        deletions = _deletions(manifest, root, dir_ok, filt, items)
    return Needs(needs, deletions, items, keep)


def _deletions(
    manifest: Manifest,
    root: bytes,
    dir_ok: dict[bytes, bool],
    filt: Filter,
    items: list[str],
) -> list[bytes]:
    """DEST paths below the manifest's directories that the source does not have (post-order),
    leaving alone what the filter excludes and the directories that hold such a path."""
    present = {e.path for e in manifest.entries}
    out: list[bytes] = []
    for entry in manifest.entries:
        if entry.kind != Kind.DIR or not dir_ok.get(entry.path, False):
            continue
        top = b"" if entry.path == b"." else entry.path
        full = root if not top else root + b"/" + top
        try:
            names = sorted(os.listdir(full))
        except OSError:
            continue
        for name in names:
            rel = top + b"/" + name if top else name
            if rel in present:
                continue
            st = _lstat(full + b"/" + name)
            if st is None:
                continue
            _delete_tree(root, rel, stat.S_ISDIR(st.st_mode), filt, out, items)
    return out


def _delete_tree(
    root: bytes, rel: bytes, is_dir: bool, filt: Filter, out: list[bytes], items: list[str]
) -> None:
    """Append ``rel`` and what is below it to ``out``, children first (no recursion)."""
    # Each frame: (path, remaining children, whether everything below could be deleted).
    if filt and filt.excluded(rel, is_dir):
        return
    if not is_dir:
        out.append(rel)
        items.append(f"*deleting   {display(rel)}")
        return
    stack: list[tuple[bytes, list[tuple[bytes, bool]], list[bool]]] = []

    def push(path: bytes) -> None:
        try:
            names = sorted(os.listdir(root + b"/" + path), reverse=True)
        except OSError:
            names = []
        children = []
        for name in names:
            st = _lstat(root + b"/" + path + b"/" + name)
            if st is not None:
                children.append((path + b"/" + name, stat.S_ISDIR(st.st_mode)))
        stack.append((path, children, [True]))

    push(rel)
    while stack:
        path, children, ok = stack[-1]
        if children:
            child, child_dir = children.pop()
            if filt and filt.excluded(child, child_dir):
                ok[0] = False
            elif child_dir:
                push(child)
            else:
                out.append(child)
                items.append(f"*deleting   {display(child)}")
            continue
        stack.pop()
        if ok[0]:
            out.append(path)
            items.append(f"*deleting   {display(path)}/")
        elif stack:
            stack[-1][2][0] = False


__all__ = ["Needs", "UnsafePath", "compare", "validate_manifest"]
