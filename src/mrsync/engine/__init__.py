"""The protocol core: sender and receiver state machines, free of I/O.

They take events (a datagram arrived, now = t) and return actions (send this, write that). The
thin layer in ``mrsync.io`` owns sockets, files and clocks; the simulator drives the same
machines with a virtual clock and a lossy virtual network.
"""
