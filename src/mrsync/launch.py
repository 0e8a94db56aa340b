"""The ``mrsync`` command (``python -m mrsync`` too): a target goes straight to its receiver.

A master starts one receiver per target (``mrsync --server`` over the remote shell), on every
run, so what a receiver imports before it can answer is start-up paid once per target per
run. The command-line parser and the configuration files are none of its business: its
settings all come from the master.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from mrsync.exitcodes import exit_now


def run() -> NoReturn:
    if sys.argv[1:] == ["--server"]:
        # msgspec imports typing_extensions when it is installed, for backports of typing
        # features that Python 3.11 has, and typing_extensions imports inspect, ast and dis:
        # a fifth of a receiver's imports (~8 of ~39 ms of CPU, eight targets on two cores
        # paying it at once on the lab). Without it msgspec uses typing's, which is all the
        # control messages need. A receiver runs nothing else.
        sys.modules.setdefault("typing_extensions", None)  # type: ignore[arg-type]
        from mrsync.remote.server import run_server

        exit_now(run_server())
    from mrsync.cli import main

    exit_now(main())
