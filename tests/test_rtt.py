"""mrsync-rtt: the probe machine alone, then the real command over loopback and across the
network lab with loss set per host, its counts checked against that loss."""

from __future__ import annotations

import math
import re
import socket
import subprocess
import sys

import pytest
from netlab import RSH, Lab, missing_requirements
from test_lab_sync import sshd as ssh_lab  # noqa: F401 (a fixture: sshd on a lab host)

from mrsync import exitcodes
from mrsync.job import page_size_for_mtu
from mrsync.rtt import RttProbe, SendPollDatagram, SendProbePage
from mrsync.wire import FLAG_COMPLETE, Feedback

RTT = [sys.executable, "-m", "mrsync.rtt"]
MRSYNC_PATH = f"{sys.executable} -m mrsync"


def _feedback(rid: int, seq: int, *, poll: int = 0, missing: int = 0, flags: int = 0) -> Feedback:
    return Feedback(transfer=1, receiver=rid, poll=poll, seq_seen=seq, missing=missing,
                    received=0, flags=flags, ranges=())


def test_probe_paces_pages_measures_round_trips_and_polls_at_the_end() -> None:
    probe = RttProbe(transfer=1, pages=5, receivers=[0, 1], key=b"k" * 32, session=7,
                     interval=0.001, now=10.0, poll_every=0.2, final_wait=1.0)
    assert probe.poll(10.0) == [SendProbePage(0, 1)]
    assert probe.poll(10.0005) == []  # paced: the next page is due at 10.001
    assert probe.next_wakeup(10.0005) == pytest.approx(10.001)
    probe.receive_feedback(_feedback(0, 1), 10.0003)
    probe.receive_feedback(_feedback(0, 1), 10.0009)  # a repeat is not a second sample
    late = probe.poll(10.0042)  # late wake-up: every page due by now goes out
    assert late == [SendProbePage(1, 2), SendProbePage(2, 3), SendProbePage(3, 4),
                    SendProbePage(4, 5), *late[4:]]
    assert len(late) == 5 and isinstance(late[4], SendPollDatagram)  # then the final poll
    for seq in (2, 3):
        probe.receive_feedback(_feedback(0, seq), 10.0050)
    probe.receive_feedback(_feedback(0, 5), 10.0060)
    probe.receive_feedback(_feedback(1, 5, flags=FLAG_COMPLETE), 10.0060)
    assert not probe.done
    probe.receive_feedback(_feedback(0, 5, poll=1, missing=1), 10.0070)
    assert probe.done
    host0, host1 = probe.hosts[0], probe.hosts[1]
    assert host0.missing == 1 and host0.answered == 4
    assert host0.rtts[0] == pytest.approx(0.0003)
    assert host1.missing == 0 and host1.answered == 1
    assert sum(n for _, n in host0.histogram()) == 4
    assert host0.histogram() == [(0, 3), (1, 1)]  # 0.3, 0.8, 0.8 ms; 1.8 ms


def test_probe_gives_up_on_a_silent_host_after_the_final_wait() -> None:
    probe = RttProbe(transfer=1, pages=1, receivers=[0], key=b"k" * 32, session=7,
                     interval=0.001, now=0.0, poll_every=0.2, final_wait=1.0)
    actions = probe.poll(0.0)
    assert isinstance(actions[-1], SendPollDatagram)
    assert [a for a in probe.poll(0.1)] == []
    assert isinstance(probe.poll(0.2)[0], SendPollDatagram)  # polled again
    assert not probe.done
    probe.poll(1.01)
    assert probe.done and probe.hosts[0].missing is None


def _parse(out: str) -> dict[str, dict[str, object]]:
    """Per host: missing, answered, the histogram rows, the path MTU."""
    hosts: dict[str, dict[str, object]] = {}
    for block in re.split(r"\n(?=== )", out):
        m = re.match(r"== ([^\s:]+)", block)
        if not m:
            continue
        info: dict[str, object] = {"text": block}
        if (miss := re.search(r"Missing pages = +(\d+) \( *([\d.]+)%\) out of total pages = "
                              r"(\d+)", block)):
            info["missing"], info["total"] = int(miss[1]), int(miss[3])
        if (ans := re.search(r"Answered pages = (\d+)", block)):
            info["answered"] = int(ans[1])
        if (mtu := re.search(r"Path MTU = (\d+)", block)):
            info["mtu"] = int(mtu[1])
        rows = block.split("---- --------\n", 1)
        if len(rows) == 2:
            lines = rows[1].split("\n\n", 1)[0].splitlines()
            assert all(re.fullmatch(r"[ \d]{3}\d [ \d]{7}\d", r) for r in lines), lines
            info["histogram"] = [tuple(map(int, r.split())) for r in lines]
        hosts[m[1]] = info
    return hosts


def test_rtt_localhost_over_loopback(port: int) -> None:
    res = subprocess.run([*RTT, "-P", str(port), "-n", "500", "localhost"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    hosts = _parse(res.stdout)
    local = hosts["localhost"]
    assert local["missing"] == 0 and local["total"] == 500
    assert local["answered"] == 500
    assert sum(n for _, n in local["histogram"]) == 500  # type: ignore[attr-defined]
    assert "rtt histogram\nmsec counts\n---- --------\n" in res.stdout
    assert re.search(r"Page size mrsync would pick: \d+ bytes", res.stdout)
    assert re.search(r"rtt min [\d.]+ / median [\d.]+ / p99 [\d.]+ / max [\d.]+ ms", res.stdout)


def test_rtt_usage_errors() -> None:
    for argv in (["host:/path"], ["-n", "0", "localhost"], ["localhost", "localhost"], []):
        res = subprocess.run([*RTT, *argv], capture_output=True, text=True, timeout=60)
        assert res.returncode == exitcodes.USAGE, (argv, res.stderr)


_missing = missing_requirements()


@pytest.mark.skipif(_missing is not None, reason=_missing or "")
def test_rtt_across_the_lab_counts_the_loss_that_was_set() -> None:
    pages = 2000
    loss = 0.05
    with Lab(3) as lab:
        lossy, clean, _ = lab.targets
        lab.set_loss(lossy, loss)
        lab.set_loss(clean, 0.0)
        rsh_fail = [*RTT, "-e", RSH, "--mrsync-path", MRSYNC_PATH, "-n", str(pages),
                    *(lab.hostname(h) for h in lab.targets), "no-such-host"]
        res = lab.exec(lab.master, rsh_fail, capture_output=True, text=True, timeout=120)
        drops = lab.loss_drops(lossy)
    assert res.returncode == exitcodes.PARTIAL, res.stdout + res.stderr
    hosts = _parse(res.stdout)
    assert "FAILED" in str(hosts["no-such-host"]["text"])
    # The lossless hosts lost nothing; every page was answered.
    for h in (clean, lab.targets[2]):
        info = hosts[h.name]
        assert info["missing"] == 0 and info["answered"] == pages, info["text"]
    # The lossy one: within 5 sigma of the binomial loss (the final poll may be dropped too,
    # and then re-sent; the count is pages, not datagrams).
    info = hosts[lossy.name]
    sigma = math.sqrt(pages * loss * (1 - loss))
    missing = info["missing"]
    assert isinstance(missing, int)
    assert abs(missing - pages * loss) < 5 * sigma, info["text"]
    assert missing <= drops  # every missing page was one the loss rule dropped
    for name in (lossy.name, clean.name):
        info = hosts[name]
        histogram = info["histogram"]
        assert isinstance(histogram, list)
        # The histogram's rows add up to the pages answered, and those to the pages that came.
        assert sum(n for _, n in histogram) == info["answered"]
        assert info["answered"] == pages - info["missing"]  # type: ignore[operator]
        assert info["mtu"] == 1500
    page = page_size_for_mtu(1500, socket.AF_INET)
    assert f"Page size mrsync would pick: {page} bytes (MTU 1500 on eth0)" in res.stdout
    print(res.stdout)


@pytest.mark.skipif(_missing is not None, reason=_missing or "")
def test_rtt_through_real_ssh(request: pytest.FixtureRequest) -> None:
    lab, keys = request.getfixturevalue("ssh_lab")
    rsh = (f"ssh -p 2222 -i {keys / 'user'} -o BatchMode=yes -o StrictHostKeyChecking=no "
           "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
    host = f"root@{lab.targets[0].addr}"
    res = lab.exec(lab.master, [*RTT, "-v", "1", "-e", rsh, "--mrsync-path", MRSYNC_PATH,
                                "-n", "300", host], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    info = _parse(res.stdout)[host]
    assert info["missing"] == 0 and info["answered"] == 300, info["text"]
    assert f"using {rsh!r} to start the receiver on {lab.targets[0].addr}" in res.stderr


def test_probe_stops_when_every_host_has_failed() -> None:
    probe = RttProbe(transfer=1, pages=1000, receivers=[0, 1], key=b"k" * 32, session=7,
                     interval=0.001, now=0.0)
    probe.poll(0.0)
    probe.receiver_failed(0)
    assert not probe.done
    probe.receiver_failed(1)
    assert probe.done
