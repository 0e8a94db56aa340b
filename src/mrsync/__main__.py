import sys

from mrsync.exitcodes import exit_now

if sys.argv[1:] == ["--server"]:
    # A target, started by the master over the remote shell: straight to the receiver,
    # without the command line's parser and configuration files (a fifth of its start-up,
    # paid once per target per run).
    from mrsync.remote.server import run_server

    exit_now(run_server())

from mrsync.cli import main

exit_now(main())
