"""Where targets are and how their receivers start.

A target is a local directory, or ``[user@]host:path`` reached through a remote shell
(``--rsh``, ssh by default, like rsync's ``-e``) that runs ``mrsync --server`` there. The
control stream is that command's stdin/stdout; the destination path travels inside the
stream (never on the remote command line), so no quoting of odd names is ever needed.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from typing import NamedTuple

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})


class TargetSpec(NamedTuple):
    host: str | None  # None: a local directory on the master
    user: str | None
    path: str

    @property
    def name(self) -> str:
        """How the operator named it, for messages."""
        if self.host is None:
            return self.path
        return f"{self.user + '@' if self.user else ''}{self.host}:{self.path}"


def parse_target(text: str) -> TargetSpec:
    """rsync's rule: a colon before the first slash makes ``host:path``; anything else is a
    local path (so ``./a:b`` and ``/x:y`` stay local)."""
    head = text.split("/", 1)[0]
    if ":" not in head:
        return TargetSpec(None, None, text)
    if head.startswith("["):  # [v6::addr]:path
        close = text.find("]:")
        if close < 0:
            raise ValueError(f"bad target {text!r}")
        host, path = text[1:close], text[close + 2 :]
    else:
        host, path = text.split(":", 1)
    user = None
    if "@" in host:
        user, host = host.rsplit("@", 1)
    if not host:
        raise ValueError(f"bad target {text!r}: empty host")
    return TargetSpec(host, user or None, path or ".")


def host_target(host_entry: str, path: str) -> TargetSpec:
    """A ``-m`` entry (``host`` or ``user@host``) with the ``-t`` path; local host names are
    this machine."""
    user = None
    host = host_entry
    if "@" in host:
        user, host = host.rsplit("@", 1)
    if host in LOCAL_HOSTS and user is None:
        return TargetSpec(None, None, path)
    return TargetSpec(host, user, path)


def spawn_server(spec: TargetSpec, rsh: str, mrsync_path: str) -> subprocess.Popen[bytes] | OSError:
    """Start a target's receiver, its control stream on stdin/stdout; the OSError if it
    could not be run (the job reports it as that target's failure)."""
    try:
        return subprocess.Popen(
            server_command(spec, rsh, mrsync_path), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
            start_new_session=True,
        )
    except OSError as exc:
        return exc


def server_command(spec: TargetSpec, rsh: str, mrsync_path: str) -> list[str]:
    """The argv that starts a receiver for this target."""
    if spec.host is None:
        return [sys.executable, "-m", "mrsync", "--server"]
    argv = shlex.split(rsh)
    if spec.user:
        argv += ["-l", spec.user]
    return [*argv, spec.host, *shlex.split(mrsync_path), "--server"]
