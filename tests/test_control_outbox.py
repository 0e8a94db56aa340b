"""The master's control writes never wait for a target: a target that stops reading its
stdin (frozen, or behind a stalled remote shell) must not hold the master, and with it every
other target. Digests follow the data on the control streams, so a tree of many files puts
more on them than a pipe holds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from mrsync.control import Digests, FrameReader
from mrsync.io.net import loopback_endpoint
from mrsync.job import Job, JobOptions
from mrsync.remote.targets import TargetSpec
from mrsync.report import Reporter


def test_a_target_that_does_not_read_does_not_block_the_master(tmp_path: Path) -> None:
    # A stand-in receiver that reads nothing until told to (a child process that sleeps).
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; time.sleep(30)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        options = JobOptions(source=str(tmp_path), targets=[TargetSpec(None, None, "/x")],
                             endpoint=loopback_endpoint(socket.AF_INET, None, 9))
        job = Job(options, Reporter(verbose=0, progress=False), spawned=[proc])
        t = job.targets[0]
        t.proc = proc
        assert proc.stdin is not None
        os.set_blocking(proc.stdin.fileno(), False)
        message = Digests(2, list(range(2000)), [bytes(32)] * 2000)  # ~70 KB a message
        for _ in range(20):  # 1.4 MB: twenty times what a pipe holds
            job._send(t, message)
        assert len(t.outbox) > 1_000_000  # kept, not written, and the master went on
        assert t.alive
        # Once the target reads, the selector says its stdin is writable and the rest goes.
        received = bytearray()
        while t.outbox:
            received += _drain_child_stdin(proc)
            for key, _ in job.selector.select(1.0):
                if isinstance(key.data, tuple) and key.data[0] == "stdin":
                    job._flush_control(key.data[1])
        received += _drain_child_stdin(proc)
        frames = FrameReader().feed(bytes(received))
        assert frames == [message] * 20
    finally:
        proc.kill()
        proc.wait()


def _drain_child_stdin(proc: subprocess.Popen[bytes]) -> bytes:
    """Read, as the child would, what the master has put in the child's stdin pipe so far."""
    fd = os.open(f"/proc/{proc.pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        out = bytearray()
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return bytes(out)
            if not chunk:
                return bytes(out)
            out += chunk
    finally:
        os.close(fd)
