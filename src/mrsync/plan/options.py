"""The rsync-semantics options that both sides need: the master to scan, every target to
compare its tree and apply the result. Sent to each target inside the control Hello."""

from __future__ import annotations

import msgspec


class SyncOptions(msgspec.Struct, frozen=True):
    # change detection (default: rsync's quick check, size and mtime)
    checksum: bool = False  # -c: compare content digests
    size_only: bool = False  # --size-only: a file with the same size is up to date
    update: bool = False  # -u: never replace a file that is newer on the target
    ignore_existing: bool = False  # --ignore-existing: never replace an existing file
    # what to apply
    delete: bool = False  # --delete: remove what the source no longer has
    delete_first: bool = False  # -X: unlink the old file before writing the new one
    backup: bool = False  # --backup: keep replaced and deleted files
    suffix: str = "~"  # --suffix (rsync's default is "~", or "" with --backup-dir)
    backup_dir: str | None = None  # --backup-dir: relative to DEST unless absolute
    hard_links: bool = False  # -H
    numeric_ids: bool = False  # --numeric-ids (owner and group apply when root)
    dry_run: bool = False  # -n: itemize, touch nothing
    # selection: ("+" or "-", pattern) in command-line order, rsync's first match wins
    rules: tuple[tuple[str, str], ...] = ()
    only: tuple[str, ...] = ()  # -l: shell globs relative to SRC; no tree comparison, no delete
