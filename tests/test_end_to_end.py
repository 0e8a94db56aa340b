"""The real mrsync command, multicast over loopback, three local targets, judged by rsync."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

from conftest import make_tree, rsync_differences, run_mrsync

from mrsync import exitcodes
from mrsync.wire import encode_data, encode_poll


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def test_contents_to_three_targets(tmp_path: Path, port: int) -> None:
    src = make_tree(tmp_path / "src")
    dests = [tmp_path / f"t{i}" for i in range(3)]
    res = run_mrsync("-P", str(port), "-v", "1", f"{src}/", *map(str, dests))
    assert res.returncode == 0, res.stderr
    assert "3 of 3 targets identical" in res.stderr
    for d in dests:
        assert rsync_differences(src, d) == ""
        assert (d / "link").readlink() == Path("big.bin")
        assert (d / "dangling").readlink() == Path("does/not/exist")
        assert os.stat(d / "run.sh").st_mode & 0o777 == 0o755
        assert (d / "big.bin").read_bytes() == (src / "big.bin").read_bytes()

    # A second run finds every target identical and sends no file content at all.
    again = run_mrsync("-P", str(port), "-v", "1", f"{src}/", *map(str, dests))
    assert again.returncode == 0, again.stderr
    assert re.search(r"0 files, 0 B sent once to all", again.stderr), again.stderr


def test_without_trailing_slash_syncs_the_directory_itself(tmp_path: Path, port: int) -> None:
    src = make_tree(tmp_path / "tree")
    dests = [tmp_path / "d1", tmp_path / "d2"]
    res = run_mrsync("-P", str(port), str(src), *map(str, dests))
    assert res.returncode == 0, res.stderr
    for d in dests:
        assert sorted(os.listdir(d)) == ["tree"]
        assert rsync_differences(src, d / "tree") == ""


def test_original_form_with_localhost(tmp_path: Path, port: int) -> None:
    src = make_tree(tmp_path / "src")
    dest = tmp_path / "copy"
    res = run_mrsync("-P", str(port), "-s", f"{src}/", "-t", str(dest), "-m", "localhost")
    assert res.returncode == 0, res.stderr
    assert rsync_differences(src, dest) == ""


def test_changed_file_is_resent_and_only_it(tmp_path: Path, port: int) -> None:
    src = make_tree(tmp_path / "src")
    dests = [tmp_path / "t1", tmp_path / "t2"]
    assert run_mrsync("-P", str(port), f"{src}/", *map(str, dests)).returncode == 0
    (src / "a" / "small07").write_bytes(b"changed content\n")
    res = run_mrsync("-P", str(port), "-v", "1", f"{src}/", *map(str, dests))
    assert res.returncode == 0, res.stderr
    assert "1 files, 16 B sent once to all" in res.stderr
    for d in dests:
        assert rsync_differences(src, d) == ""


def test_forged_and_foreign_datagrams_are_dropped_and_counted(tmp_path: Path, port: int) -> None:
    """While a sync runs, spray the group with datagrams under a wrong key and under another
    session: every target must drop and count them, and still end identical."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(os.urandom(8 * 1024 * 1024))
    dests = [tmp_path / "t1", tmp_path / "t2", tmp_path / "t3"]
    stop = threading.Event()

    def spray() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
        forged = encode_data(b"k" * 32, 1, 2, 1, 0, 0, b"evil" * 100)
        while not stop.is_set():
            sock.sendto(forged, ("239.255.67.92", port))  # right session? unknown: MAC fails
            sock.sendto(encode_poll(b"x" * 32, 12345, 1, 1, 1), ("239.255.67.92", port))
            sock.sendto(b"garbage", ("239.255.67.92", port))
            time.sleep(0.0005)
        sock.close()

    thread = threading.Thread(target=spray)
    thread.start()
    try:
        res = run_mrsync("-P", str(port), "-v", "2", "--rate", "100M", f"{src}/",
                         *map(str, dests))
    finally:
        stop.set()
        thread.join()
    assert res.returncode == 0, res.stderr
    counters = re.findall(r"counters: (\{.*\})", res.stderr)
    assert len(counters) == 3
    for text in counters:
        c = eval(text, {})  # our own repr of a dict of ints
        # Forged data from "session 1" is foreign (wrong session) or fails the MAC; the poll
        # is foreign; the garbage is too short or not ours. All counted, none acted on.
        assert c.get("dropped_session", 0) + c.get("dropped_mac", 0) > 10, c
        assert c.get("dropped_short", 0) + c.get("dropped_magic", 0) > 10, c
    for d in dests:
        assert rsync_differences(src, d) == ""


def test_usage_errors(tmp_path: Path) -> None:
    assert run_mrsync(str(tmp_path)).returncode == exitcodes.USAGE
    missing = run_mrsync(str(tmp_path / "nope"), str(tmp_path / "d"))
    assert missing.returncode == exitcodes.USAGE
    assert "does not exist" in missing.stderr
    same = run_mrsync(f"{tmp_path}/", str(tmp_path))
    assert same.returncode == exitcodes.USAGE
    twice = run_mrsync(f"{tmp_path}/", str(tmp_path / "d"), str(tmp_path / "d"))
    assert twice.returncode == exitcodes.USAGE and "given twice" in twice.stderr


def test_unreachable_host_fails_fast_with_its_name(tmp_path: Path, port: int) -> None:
    """A remote shell that cannot reach the host: reported by name, with the shell's own words,
    and the local target still finishes."""
    src = make_tree(tmp_path / "src")
    rsh = "sh -c 'echo ssh: Could not resolve hostname $0 >&2; exit 255'"
    res = run_mrsync("-P", str(port), "-I", "lo", "-e", rsh, f"{src}/", "ghost.invalid:/data",
                     str(tmp_path / "local"))
    assert res.returncode == exitcodes.PARTIAL, res.stderr
    assert "ghost.invalid:/data: FAILED" in res.stderr
    assert "Could not resolve hostname ghost.invalid" in res.stderr
    assert rsync_differences(src, tmp_path / "local") == ""


def test_remote_shell_that_cannot_be_run_fails_that_target_only(tmp_path: Path,
                                                                port: int) -> None:
    """The receivers are started before the master sets up the rest: a remote shell that
    does not exist fails its target by name, and the local target still finishes."""
    src = make_tree(tmp_path / "src")
    res = run_mrsync("-P", str(port), "-I", "lo", "-e", str(tmp_path / "no-such-rsh"),
                     f"{src}/", "ghost.invalid:/data", str(tmp_path / "local"))
    assert res.returncode == exitcodes.PARTIAL, res.stderr
    assert re.search(r"ghost.invalid:/data: FAILED.*cannot run .*no-such-rsh", res.stderr), (
        res.stderr)
    assert rsync_differences(src, tmp_path / "local") == ""


def test_help_reads_well() -> None:
    res = run_mrsync("--help")
    assert res.returncode == 0
    for text in ("SRC DEST", "-s SRC -t DEST -m TARGETS", "-A ADDR", "-P PORT", "exit status"):
        assert text in res.stdout


FAKE_SERVER = """
import os, sys
sys.path[:0] = {path!r}
from mrsync.control import FrameReader, HelloOk, frame
reader = FrameReader()
while not reader.feed(os.read(0, 65536)):
    pass
os.write(1, frame(HelloOk(version=99, hostname="old", pid=os.getpid(), address="127.0.0.1",
                          data_port=9)))
os.read(0, 65536)
"""


def test_target_speaking_another_protocol_version_is_refused(tmp_path: Path, port: int) -> None:
    """A receiver that answers with a protocol version we do not speak: refused by name, with
    both versions, and nothing is written there."""
    import sys

    from mrsync import PROTOCOL_VERSION

    fake = tmp_path / "fake_server.py"
    fake.write_text(FAKE_SERVER.format(path=sys.path))
    src = make_tree(tmp_path / "src")
    res = run_mrsync("-P", str(port), "-I", "lo", "-e", f"{sys.executable} {fake}",
                     f"{src}/", "oldhost:/srv/x", str(tmp_path / "local"))
    assert res.returncode == exitcodes.PARTIAL, res.stderr
    assert re.search(rf"oldhost:/srv/x: FAILED: speaks protocol version 99; this mrsync speaks "
                     rf"{PROTOCOL_VERSION}", res.stderr), res.stderr
    assert rsync_differences(src, tmp_path / "local") == ""


def test_machines_file_with_comments(tmp_path: Path, port: int) -> None:
    src = make_tree(tmp_path / "src")
    machines = tmp_path / "machines"
    machines.write_text("# the fleet\nlocalhost   # this host\n\n")
    dest = tmp_path / "copy"
    res = run_mrsync("-P", str(port), "-s", str(src), "-t", str(dest), "-m", str(machines))
    assert res.returncode == 0, res.stderr
    assert rsync_differences(src, dest) == ""
