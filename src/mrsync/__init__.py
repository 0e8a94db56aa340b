"""mrsync: multicast rsync. One master sends a directory tree once, over IP multicast, to many
targets at the same time, and repairs what each target lost."""

__version__ = "0.1.0"

# Bumped whenever the control stream or the datagram format changes incompatibly.
PROTOCOL_VERSION = 2
