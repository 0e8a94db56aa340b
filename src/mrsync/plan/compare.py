"""What a target needs: its own tree compared with the source manifest (rsync's quick check).

Also the first line of defence for "bytes you can trust": :func:`validate_manifest` refuses any
manifest whose paths could reach outside the target root. The file store checks again while
writing (it never writes through a symlink), so a bug here cannot turn into a write outside DEST.
"""

from __future__ import annotations

import os
import stat
from typing import NamedTuple

from mrsync.plan.manifest import Entry, Kind, Manifest
from mrsync.plan.scan import display

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


def _check_path(path: bytes, index: int) -> None:
    shown = display(path)
    if not path:
        raise UnsafePath(shown, "empty path")
    if b"\0" in path:
        raise UnsafePath(shown, "NUL byte in path")
    if path.startswith(b"/"):
        raise UnsafePath(shown, "absolute path")
    if path == b".":
        if index != 0:
            raise UnsafePath(shown, "'.' is only allowed as the first (root) entry")
        return
    for comp in path.split(b"/"):
        if comp == b"":
            raise UnsafePath(shown, "empty path component")
        if comp == b"..":
            raise UnsafePath(shown, "'..' component")
        if comp == b".":
            raise UnsafePath(shown, "'.' component")


def _check_fields(entry: Entry) -> None:
    shown = display(entry.path)
    if not 0 <= entry.mode <= _MAX_MODE:
        raise UnsafePath(shown, f"invalid mode {entry.mode:#o}")
    if entry.kind == Kind.FILE:
        if entry.size < 0:
            raise UnsafePath(shown, f"invalid size {entry.size}")
        if len(entry.digest) != 32:
            raise UnsafePath(shown, "file without a 32-byte digest")
    elif entry.size != 0:
        raise UnsafePath(shown, "non-file with a size")
    if not _MIN_NS <= entry.mtime_ns <= _MAX_NS:
        raise UnsafePath(shown, "mtime out of range")
    if not (0 <= entry.uid < _NO_ID and 0 <= entry.gid < _NO_ID):
        raise UnsafePath(shown, "uid or gid out of range")
    if entry.kind == Kind.SYMLINK and (not entry.target or b"\0" in entry.target):
        raise UnsafePath(shown, "empty symlink target or NUL byte in it")


def validate_manifest(manifest: Manifest) -> None:
    """Raise :class:`UnsafePath` unless every entry is safe to create under DEST.

    Refused: empty paths, NUL bytes, absolute paths, empty, ``.`` or ``..`` components; ``.``
    anywhere but as the first entry (and then it must be a DIR); duplicate paths; a child
    whose parent entry is missing, comes later, or is not a DIR. Top-level names
    (no ``/``) need no parent entry. Also refused, because the store relies on them: modes
    beyond 0o7777, mtimes beyond 64 bits, uids/gids outside 0..2**32-2, FILEs without a
    32-byte digest or with a negative size, sizes on non-files, empty symlink targets or
    targets containing NUL.

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
        _check_fields(entry)
        kinds[path] = entry.kind


def compare(manifest: Manifest, dest_root: str) -> Needs:
    """The FILEs whose content DEST lacks: missing, not a regular file, or size or mtime_ns
    differs. Zero-length files never need data. Nothing in DEST is followed (``lstat``) except
    DEST itself, as rsync does; a file below a symlink or a non-directory needs data (the store
    replaces the parent). Unreadable destination entries count as needing data: the store will
    then report the real error for that file.

    Call :func:`validate_manifest` first.
    """
    root = os.fsencode(dest_root)
    try:
        root_ok = stat.S_ISDIR(os.stat(root).st_mode)
    except OSError:
        root_ok = False
    # Whether each directory below DEST (relative path) is a real directory all the way up.
    # Parents come before children in a valid manifest, so one pass fills it in order.
    dir_ok: dict[bytes, bool] = {b"": root_ok}
    needs: list[int] = []
    for file_id, entry in enumerate(manifest.entries):
        path = entry.path
        parent = path.rpartition(b"/")[0]
        if entry.kind == Kind.DIR:
            if path != b".":
                ok = dir_ok.get(parent, False)
                if ok:
                    try:
                        ok = stat.S_ISDIR(os.lstat(root + b"/" + path).st_mode)
                    except OSError:
                        ok = False
                dir_ok[path] = ok
            continue
        if entry.kind != Kind.FILE or entry.size == 0:
            continue
        if not dir_ok.get(parent, False):
            needs.append(file_id)
            continue
        try:
            st = os.lstat(root + b"/" + path)
        except OSError:
            needs.append(file_id)
            continue
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_size != entry.size
            or st.st_mtime_ns != entry.mtime_ns
        ):
            needs.append(file_id)
    return Needs(needs)


__all__ = ["Needs", "UnsafePath", "compare", "validate_manifest"]
