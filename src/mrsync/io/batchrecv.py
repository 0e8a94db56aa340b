"""Receive many datagrams per system call with Linux ``recvmmsg(2)``.

Python's socket module has no recvmmsg, and at 200 Mbit/s of 1,400-byte datagrams each target
receives ~18,000 datagrams a second: one ``recv`` system call each is a large share of what a
target spends. The compiled ``mrsync._speedups.recv_batch`` makes
the call when it was built; otherwise this binds the libc call through ctypes, and where that
is missing it falls back to ``recv_into``, one datagram at a time.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
from array import array
from typing import Any

from mrsync.speedups import speedups


@functools.cache
def _ctypes_recvmmsg() -> tuple[Any, Any, Any] | None:
    """libc's recvmmsg and the structures it takes, (function, iovec, mmsghdr), through
    ctypes; None where libc has none. Only when the compiled path is missing: importing ctypes
    was a thirtieth of a target's start-up, and find_library runs `ldconfig -p`, several
    milliseconds more."""
    import ctypes
    import ctypes.util

    class IOVec(ctypes.Structure):
        _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]

    class MsgHdr(ctypes.Structure):
        _fields_ = [
            ("msg_name", ctypes.c_void_p),
            ("msg_namelen", ctypes.c_uint32),
            ("msg_iov", ctypes.POINTER(IOVec)),
            ("msg_iovlen", ctypes.c_size_t),
            ("msg_control", ctypes.c_void_p),
            ("msg_controllen", ctypes.c_size_t),
            ("msg_flags", ctypes.c_int),
        ]

    class MMsgHdr(ctypes.Structure):
        _fields_ = [("msg_hdr", MsgHdr), ("msg_len", ctypes.c_uint)]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.recvmmsg
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.POINTER(MMsgHdr), ctypes.c_uint, ctypes.c_int,
                     ctypes.c_void_p]
    func.restype = ctypes.c_int
    return func, IOVec, MMsgHdr


class BatchReceiver:
    """``n = receiver.receive()`` puts up to ``slots`` waiting datagrams into ``view``, datagram
    i at ``i * slot`` with its length in ``lengths[i]``; 0 when none is waiting. The buffer is
    reused: consume a batch before asking for the next. The compiled ``recv_batch`` is used
    when built, else recvmmsg through ctypes, else one ``recv_into`` per call."""

    def __init__(self, sock: socket.socket, *, slot: int = 65536, slots: int = 64) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self.slot = slot
        self.slots = slots
        self._buf = bytearray(slot * slots)
        self.view = memoryview(self._buf)
        self.lengths = array("I", bytes(4 * slots))
        self.calls = 0
        self.datagrams = 0
        self._msgs = None
        if speedups is not None and slots <= speedups.MAX_BATCH:
            self._receive = self._receive_compiled
        elif (bound := _ctypes_recvmmsg()) is not None:
            import ctypes

            self._receive = self._receive_ctypes
            _, iovec, mmsghdr = bound
            base = ctypes.addressof(ctypes.c_char.from_buffer(self._buf))
            self._iovs = (iovec * slots)()
            self._msgs = (mmsghdr * slots)()
            for i in range(slots):
                self._iovs[i].iov_base = base + i * slot
                self._iovs[i].iov_len = slot
                self._msgs[i].msg_hdr.msg_iov = ctypes.pointer(self._iovs[i])
                self._msgs[i].msg_hdr.msg_iovlen = 1
        else:
            self._receive = self._receive_one

    def receive(self) -> int:
        n = self._receive()
        self.calls += 1
        self.datagrams += n
        return n

    def _receive_compiled(self) -> int:
        assert speedups is not None
        return int(speedups.recv_batch(self._fd, self._buf, self.slot, self.lengths))

    def _receive_ctypes(self) -> int:
        import ctypes

        msgs = self._msgs
        bound = _ctypes_recvmmsg()
        assert msgs is not None and bound is not None
        n = bound[0](self._fd, msgs, self.slots, socket.MSG_DONTWAIT, None)
        if n <= 0:
            err = ctypes.get_errno()
            if n < 0 and err not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                raise OSError(err, os.strerror(err))
            return 0
        lengths = self.lengths
        for i in range(n):
            lengths[i] = msgs[i].msg_len
        return int(n)

    def _receive_one(self) -> int:
        try:
            n = self._sock.recv_into(self._buf, self.slot, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0
        self.lengths[0] = n
        return 1
