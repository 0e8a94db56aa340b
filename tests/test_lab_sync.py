"""Issue 4: real targets on a network lab of namespaces. `ip netns exec` stands in for ssh (and
one test runs real ssh); every byte of file data must cross the master's link, which the
master's qdisc counters prove. Root only; `make test` installs the tools."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import RSH, Host, Lab, missing_requirements

_missing = missing_requirements()
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")

MiB = 1024 * 1024
MRSYNC = [sys.executable, "-m", "mrsync"]
MRSYNC_PATH = f"{sys.executable} -m mrsync"  # what the targets run, found without PATH


def _make_tree(root: Path, big_mib: int, small: int) -> int:
    """One big random file and `small` random files of 1 B .. 16 KiB; returns total bytes."""
    rng = random.Random(4)
    (root / "small").mkdir(parents=True)
    with open(root / "big.bin", "wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(MiB))
    for i in range(small):
        (root / "small" / f"f{i:04d}").write_bytes(os.urandom(rng.randint(1, 16384)))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("lab") / "src"
    return root, _make_tree(root, 256, 2000)


@pytest.fixture(scope="module")
def mid_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("lab") / "src"
    return root, _make_tree(root, 48, 200)


def _identical(src: Path, dest: Path) -> str:
    out = subprocess.run(["rsync", "-anci", "--delete", f"{src}/", f"{dest}/"],
                         capture_output=True, check=True)
    return out.stdout.decode(errors="backslashreplace")


def _targets(lab: Lab, base: Path, hosts: list[Host] | None = None) -> list[tuple[str, Path]]:
    out = []
    for i, host in enumerate(hosts or lab.targets):
        dest = base / f"t{i}"
        shutil.rmtree(dest, ignore_errors=True)
        out.append((f"{host.name}:{dest}", dest))
    return out


def _mrsync_argv(src: Path, targets: list[tuple[str, Path]], *extra: str) -> list[str]:
    return [*MRSYNC, "-v", "2", "--no-progress", "-e", RSH, "--mrsync-path", MRSYNC_PATH,
            *extra, f"{src}/", *(spec for spec, _ in targets)]


class _Watched:
    """mrsync running on the master, its stderr lines time-stamped as they come."""

    def __init__(self, lab: Lab, argv: list[str]) -> None:
        self.start = time.monotonic()
        self.proc = lab.popen(lab.master, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic() - self.start, line.rstrip("\n")))

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._thread.join(5)
        return code

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def when(self, pattern: str) -> float | None:
        for t, line in self.lines:
            if re.search(pattern, line):
                return t
        return None


def _receiver_pid(lab: Lab, host: Host, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["ip", "netns", "pids", host.name], capture_output=True, text=True)
        for pid in out.stdout.split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"--server" in cmdline:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no receiver in {host.name}")


def _wait_for_temp(dest: Path, timeout: float = 60) -> None:
    """Until the big file's temp file exists there: data is flowing to that target."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dest.is_dir() and any(".mrsync." in n for n in os.listdir(dest)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no data reached {dest}")


def test_eight_targets_200mbit_1pct_loss(big_tree: tuple[Path, int], tmp_path: Path) -> None:
    src, tree_bytes = big_tree
    with Lab(8, rate_mbit=200, loss=0.01) as lab:
        targets = _targets(lab, tmp_path)
        before = lab.master_tx_bytes()
        t0 = time.monotonic()
        res = lab.exec(lab.master, _mrsync_argv(src, targets), capture_output=True, text=True,
                       timeout=900)
        wall = time.monotonic() - t0
        wire = lab.master_tx_bytes() - before
        drops = [lab.loss_drops(h) for h in lab.targets]
    assert res.returncode == 0, res.stderr[-3000:]
    for _, dest in targets:
        assert _identical(src, dest) == ""
    # The data crossed the master's link (not the control pipes): at least the tree's bytes,
    # and not much more than the tree plus headers and the union of repairs.
    assert tree_bytes <= wire <= 1.5 * tree_bytes
    assert all(d > 0 for d in drops)  # the loss rules really dropped datagrams
    limit = wire * 8 / 200e6
    print(f"\n8 targets, 200 Mbit/s, 1% loss: {wall:.1f} s wall, {wire} bytes on the wire, "
          f"physical limit {limit:.1f} s, ratio {wall / limit:.2f}")


def test_frozen_target_sits_out_then_catches_up(mid_tree: tuple[Path, int],
                                                 tmp_path: Path) -> None:
    src, _ = mid_tree
    with Lab(4, rate_mbit=200, loss=0.01) as lab:
        targets = _targets(lab, tmp_path)
        run = _Watched(lab, _mrsync_argv(src, targets))
        frozen = _receiver_pid(lab, lab.targets[0])
        _wait_for_temp(targets[0][1])
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = time.monotonic() - run.start
        time.sleep(10)
        resumed_at = time.monotonic() - run.start
        os.kill(frozen, signal.SIGCONT)
        code = run.wait(timeout=300)
    assert code == 0, run.text[-3000:]
    for _, dest in targets:
        assert _identical(src, dest) == ""
    frozen_name = re.escape(targets[0][0])
    assert run.when(frozen_name + r": sitting out") is not None, run.text
    assert run.when(frozen_name + r": caught up") is not None, run.text
    # The others finished while the frozen one was still stopped: nobody waited for it.
    for spec, _ in targets[1:]:
        done = run.when(re.escape(spec) + r": complete")
        assert done is not None and stopped_at < done < resumed_at, (done, stopped_at, run.text)


def test_killed_target_is_reported_and_others_finish(mid_tree: tuple[Path, int],
                                                     tmp_path: Path) -> None:
    src, _ = mid_tree
    with Lab(4, rate_mbit=200) as lab:
        targets = _targets(lab, tmp_path)
        run = _Watched(lab, _mrsync_argv(src, targets))
        victim = _receiver_pid(lab, lab.targets[1])
        _wait_for_temp(targets[1][1])
        os.kill(victim, signal.SIGKILL)
        code = run.wait(timeout=300)
        assert code == 23, run.text[-3000:]
        assert re.search(re.escape(targets[1][0]) + r": FAILED: receiver exited",
                         run.text), run.text
        for i, (_, dest) in enumerate(targets):
            if i != 1:
                assert _identical(src, dest) == ""
        # SIGKILL leaves the receiver no chance to remove its temp file (rsync's neither);
        # the next run with --delete brings the target back, leftovers included.
        again = lab.exec(lab.master, _mrsync_argv(src, targets[1:2], "--delete"),
                         capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _identical(src, targets[1][1]) == ""


def test_host_that_does_not_exist_fails_fast(mid_tree: tuple[Path, int], tmp_path: Path) -> None:
    src, _ = mid_tree
    with Lab(1) as lab:
        targets = [*_targets(lab, tmp_path), ("no-such-host:/tmp/x", tmp_path / "x")]
        t0 = time.monotonic()
        res = lab.exec(lab.master, _mrsync_argv(src, targets), capture_output=True, text=True,
                       timeout=300)
        elapsed = time.monotonic() - t0
    assert res.returncode == 23, res.stderr
    assert re.search(r"no-such-host:/tmp/x: FAILED: .*no-such-host", res.stderr), res.stderr
    assert _identical(src, targets[0][1]) == ""
    assert elapsed < 60


def test_two_sessions_at_once_on_the_same_hosts(mid_tree: tuple[Path, int],
                                                tmp_path: Path) -> None:
    src, _ = mid_tree
    with Lab(3, rate_mbit=200) as lab:
        a = _targets(lab, tmp_path / "a")
        b = _targets(lab, tmp_path / "b")
        run_a = _Watched(lab, _mrsync_argv(src, a, "-A", "239.255.67.92", "-P", "8888"))
        run_b = _Watched(lab, _mrsync_argv(src, b, "-A", "239.255.67.93", "-P", "8890"))
        assert run_a.wait(timeout=300) == 0, run_a.text[-2000:]
        assert run_b.wait(timeout=300) == 0, run_b.text[-2000:]
    for _, dest in a + b:
        assert _identical(src, dest) == ""
    # Neither heard the other's datagrams as its own: no target counted a MAC failure.
    for run in (run_a, run_b):
        for counters in re.findall(r"counters: (\{.*\})", run.text):
            assert "dropped_mac" not in counters, counters


def test_ipv6_data_plane(mid_tree: tuple[Path, int], tmp_path: Path) -> None:
    src, _ = mid_tree
    with Lab(2, rate_mbit=200, ipv6=True) as lab:
        targets = _targets(lab, tmp_path)
        before = lab.master_tx_bytes()
        res = lab.exec(lab.master, _mrsync_argv(src, targets, "-6"), capture_output=True,
                       text=True, timeout=300)
        wire = lab.master_tx_bytes() - before
    assert res.returncode == 0, res.stderr[-3000:]
    for _, dest in targets:
        assert _identical(src, dest) == ""
    assert wire > 48 * MiB


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[Lab, Path]]:
    if shutil.which("ssh") is None or not Path("/usr/sbin/sshd").exists():
        pytest.skip("openssh is not installed (scripts/test-deps.sh installs it)")
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)],
                       check=True)
    shutil.copy(keys / "user.pub", keys / "authorized_keys")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    with Lab(1) as lab:
        target = lab.targets[0]
        config = keys / "sshd_config"
        config.write_text(
            f"Port 2222\nListenAddress {target.addr}\nHostKey {keys / 'host'}\n"
            f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            f"PasswordAuthentication no\nUsePAM no\nStrictModes no\nPidFile {keys / 'pid'}\n"
            "AcceptEnv none\n"
        )
        daemon = lab.popen(target, ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                           stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            yield lab, keys
        finally:
            daemon.kill()
            daemon.wait()


def test_real_ssh(sshd: tuple[Lab, Path], mid_tree: tuple[Path, int], tmp_path: Path) -> None:
    lab, keys = sshd
    src, _ = mid_tree
    dest = tmp_path / "via-ssh"
    rsh = (f"ssh -p 2222 -i {keys / 'user'} -o BatchMode=yes -o StrictHostKeyChecking=no "
           "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
    before = lab.master_tx_bytes()
    res = lab.exec(lab.master, [*MRSYNC, "-v", "1", "-e", rsh, "--mrsync-path", MRSYNC_PATH,
                                f"{src}/", f"root@{lab.targets[0].addr}:{dest}"],
                   capture_output=True, text=True, timeout=300)
    wire = lab.master_tx_bytes() - before
    assert res.returncode == 0, res.stderr[-3000:]
    assert _identical(src, dest) == ""
    assert wire > 48 * MiB  # over the lab's link, multicast, not through the ssh stream only
