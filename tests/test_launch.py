"""What a target's receiver (``mrsync --server``) imports before it can answer the master.

The master starts one receiver per target on every run, so their imports are start-up paid
N times per run (eight targets on two cores in the lab). The receiver goes straight to its
loop (``mrsync.launch``): no command-line parser, no configuration files, no typing backports.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

# Modules a receiver must not import: each was milliseconds of its start-up.
NOT_IN_A_RECEIVER = (
    "argparse",  # the command line: the master's
    "tomllib",  # configuration files: the master's
    "mrsync.cli",
    "mrsync.job",
    # msgspec's typing backports are refused (-X importtime still lists the attempt), and
    # with them what typing_extensions would import:
    "inspect",
    "ast",
    "dis",
    "dataclasses",
    "ctypes",  # the recvmmsg fallback, only without the compiled module
)


def _imports(*args: str) -> set[str]:
    # (A receiver answers on stdout with binary control frames: only stderr is read.)
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "mrsync", *args],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, timeout=60)
    err = res.stderr.decode(errors="replace")
    return set(re.findall(r"^import time:.*\|\s*(\S+)$", err, re.MULTILINE))


def test_a_receiver_imports_only_what_it_needs() -> None:
    imported = _imports("--server")
    assert "mrsync.remote.server" in imported  # (it did start the receiver)
    assert not imported & set(NOT_IN_A_RECEIVER), imported & set(NOT_IN_A_RECEIVER)


@pytest.mark.parametrize("entry", ["mrsync.launch:run", "mrsync.__main__"])
def test_the_command_and_python_m_share_the_entry_point(entry: str) -> None:
    # The console script and `python -m mrsync` both go through mrsync.launch.run.
    if entry == "mrsync.__main__":
        imported = _imports("--version")
        assert "mrsync.launch" in imported
        return
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("mrsync") == entry
