"""UDP sockets for the data plane: the master's multicast sender (which also receives the
targets' feedback) and a target's group member socket.

Local syncs pin everything to loopback: the group is sent through 127.0.0.1 (or ``lo`` for IPv6)
with a TTL / hop limit of 0, so no datagram can leave the machine even if routing is odd.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import NamedTuple

DEFAULT_GROUP_V4 = "239.255.67.92"  # the original's default: administratively scoped
DEFAULT_GROUP_V6 = "ff15::6d72:7379:6e63"  # transient, site-local scope: "mrsync"
DEFAULT_PORT = 8888
BUFFER_BYTES = 32 * 1024 * 1024  # receive buffers: deep enough to absorb a scheduling hiccup
# A small send buffer: when the local link (or its shaper) is the bottleneck, a full queue
# blocks the sender instead of growing without bound and dropping (TCP small queues, for UDP).
SEND_BUFFER_BYTES = 512 * 1024
IP_UDP_HEADERS: dict[int, int] = {socket.AF_INET: 28, socket.AF_INET6: 48}

# Linux constants the socket module does not export everywhere.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


class Endpoint(NamedTuple):
    family: int
    group: str
    port: int
    interface: str  # interface name the group is sent and joined on
    address: str  # this host's address on that interface


def loopback_endpoint(family: int, group: str | None, port: int) -> Endpoint:
    if family == socket.AF_INET6:
        return Endpoint(family, group or DEFAULT_GROUP_V6, port, "lo", "::1")
    return Endpoint(family, group or DEFAULT_GROUP_V4, port, "lo", "127.0.0.1")


def default_group(family: int) -> str:
    return DEFAULT_GROUP_V6 if family == socket.AF_INET6 else DEFAULT_GROUP_V4


def source_address_towards(family: int, host: str, port: int) -> str:
    """The local address the routing table would use to reach ``host``. A connected UDP
    socket asks the kernel without sending anything."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, port))
        except OSError as exc:
            raise OSError(f"no route to {host}: {exc.strerror}") from None
        address: str = probe.getsockname()[0]
    return address


def interface_addresses() -> dict[str, tuple[list[str], list[str]]]:
    """{interface name: ([IPv4 addresses], [IPv6 addresses])} from the kernel."""
    import fcntl

    result: dict[str, tuple[list[str], list[str]]] = {}
    for _index, name in socket.if_nameindex():
        v4: list[str] = []
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                req = struct.pack("256s", name.encode()[:15])
                got = fcntl.ioctl(s.fileno(), 0x8915, req)  # SIOCGIFADDR: the primary address
            v4.append(socket.inet_ntoa(got[20:24]))
        except OSError:
            pass
        result[name] = (v4, [])
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr, _idx, _plen, _scope, _flags, name = line.split()
                addr = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(hexaddr))
                result.setdefault(name, ([], []))[1].append(addr)
    except OSError:
        pass
    return result


def interface_of(family: int, address: str) -> str:
    for name, (v4, v6) in interface_addresses().items():
        if address in (v6 if family == socket.AF_INET6 else v4):
            return name
    raise OSError(f"no interface holds address {address}")


def address_of(family: int, interface: str) -> str:
    addrs = interface_addresses().get(interface)
    if addrs is None:
        raise OSError(f"no interface named {interface!r}")
    candidates = addrs[1] if family == socket.AF_INET6 else addrs[0]
    if family == socket.AF_INET6:  # a link-local address needs a scope; prefer a routable one
        candidates = [a for a in candidates if not a.startswith("fe80")] or candidates
    if not candidates:
        raise OSError(f"interface {interface} has no IPv{6 if family == socket.AF_INET6 else 4} "
                      "address")
    return candidates[0]


def network_endpoint(family: int, group: str | None, port: int, interface: str | None) -> Endpoint:
    """The master's endpoint for real targets: the named interface, or the one the route to
    the group goes through."""
    group = group or default_group(family)
    if interface:
        return Endpoint(family, group, port, interface, address_of(family, interface))
    address = source_address_towards(family, group, port)
    return Endpoint(family, group, port, interface_of(family, address), address)


def member_endpoint(family: int, group: str, port: int, master: str) -> Endpoint:
    """A target's endpoint: the interface its route to the master goes through."""
    address = source_address_towards(family, master, 9)
    return Endpoint(family, group, port, interface_of(family, address), address)


def set_buffer(sock: socket.socket, size: int, *, receive: bool) -> int:
    """Ask for a large buffer; as root, bypass net.core.[rw]mem_max. Returns what we got."""
    opt, force = (
        (socket.SO_RCVBUF, SO_RCVBUFFORCE) if receive else (socket.SO_SNDBUF, SO_SNDBUFFORCE)
    )
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)
    # The kernel reports twice what it accounts against (bookkeeping overhead).
    return sock.getsockopt(socket.SOL_SOCKET, opt) // 2


def interface_mtu(name: str) -> int:
    with open(f"/sys/class/net/{name}/mtu") as f:
        return int(f.read())


def open_sender(endpoint: Endpoint, *, ttl: int) -> socket.socket:
    """The master's socket: multicasts to the group and receives feedback on its own port."""
    sock = socket.socket(endpoint.family, socket.SOCK_DGRAM)
    try:
        if endpoint.family == socket.AF_INET6:
            index = socket.if_nametoindex(endpoint.interface)
            sock.bind((endpoint.address, 0, 0, 0))
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ttl)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)
        else:
            sock.bind((endpoint.address, 0))
            sock.setsockopt(
                socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(endpoint.address)
            )
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
            # Targets on this very host must hear the group too.
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        set_buffer(sock, SEND_BUFFER_BYTES, receive=False)
        set_buffer(sock, BUFFER_BYTES // 4, receive=True)
    except BaseException:
        sock.close()
        raise
    return sock


def open_unicast(endpoint: Endpoint) -> socket.socket:
    """A target's own unicast socket: catch-up data for a target that sat out comes here, and
    its feedback leaves from here."""
    sock = socket.socket(endpoint.family, socket.SOCK_DGRAM)
    try:
        sock.bind((endpoint.address, 0))
        set_buffer(sock, BUFFER_BYTES, receive=True)
    except BaseException:
        sock.close()
        raise
    return sock


def open_member(endpoint: Endpoint) -> tuple[socket.socket, int]:
    """A target's socket: bound to the group and port (so another session's group or port is
    never delivered to it) and joined on the endpoint's interface. Returns the socket and the
    receive buffer size obtained."""
    sock = socket.socket(endpoint.family, socket.SOCK_DGRAM)
    try:
        # Several targets on one host (local syncs, tests) share the group and port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if endpoint.family == socket.AF_INET6:
            index = socket.if_nametoindex(endpoint.interface)
            sock.bind((endpoint.group, endpoint.port, 0, index))
            mreq = socket.inet_pton(socket.AF_INET6, endpoint.group) + struct.pack("@I", index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        else:
            sock.bind((endpoint.group, endpoint.port))
            mreq = socket.inet_aton(endpoint.group) + socket.inet_aton(endpoint.address)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        got = set_buffer(sock, BUFFER_BYTES, receive=True)
    except BaseException:
        sock.close()
        raise
    return sock, got


UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # linux/udp.h
SOL_UDP = getattr(socket, "SOL_UDP", 17)
GSO_MAX_BYTES = 65000  # one GSO send stays within a single (unfragmented) UDP payload
GSO_MAX_SEGMENTS = 64


class Batcher:
    """Datagrams for one destination, sent with as few system calls as possible.

    Consecutive datagrams of one size go out as a single ``sendmsg`` with ``UDP_SEGMENT``
    (Linux UDP segmentation offload, GSO): the kernel cuts the buffer back into the same
    datagrams, on the wire or before it when the interface cannot, so receivers see exactly
    what separate sends would have produced, for a fraction of the per-datagram cost. Where the
    kernel refuses GSO, it falls back to one ``sendto`` per datagram for good.
    """

    def __init__(self, sock: socket.socket, *, gso: bool = True) -> None:
        self._sock = sock
        self._gso = gso
        self._dest: tuple[object, ...] | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self._bytes = 0
        self.sends = 0  # system calls made

    def add(self, datagram: bytes, dest: tuple[object, ...]) -> None:
        n = len(datagram)
        if self._parts and (
            dest != self._dest
            or n > self._size
            or len(self._parts[-1]) != self._size  # a short datagram ends a GSO run
            or self._bytes + n > GSO_MAX_BYTES
            or len(self._parts) >= GSO_MAX_SEGMENTS
        ):
            self.flush()
        if not self._parts:
            self._dest, self._size = dest, n
        self._parts.append(datagram)
        self._bytes += n

    def add_run(self, datagrams: bytes, size: int, dest: tuple[object, ...]) -> None:
        """Datagrams of ``size`` bytes back to back (the last may be shorter), as
        ``encode_data_run`` makes them: sent with as few GSO sends as the limits allow."""
        self.flush()
        view = memoryview(datagrams)
        step = size * max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size))
        for at in range(0, len(view), step):
            chunk = view[at : at + step]
            if len(chunk) > size and self._gso:
                try:
                    self._sock.sendmsg(
                        [chunk], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, dest
                    )
                    self.sends += 1
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT,
                                         errno.EIO):
                        raise
                    self._gso = False  # as in flush: plain sends from now on
            for one in range(0, len(chunk), size):
                self._sock.sendto(chunk[one : one + size], dest)
                self.sends += 1

    def flush(self) -> None:
        parts, dest = self._parts, self._dest
        if not parts or dest is None:
            return
        self._parts, self._bytes = [], 0
        if len(parts) > 1 and self._gso:
            try:
                self._sock.sendmsg(
                    [b"".join(parts)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", self._size))],
                    0, dest,
                )
                self.sends += 1
                return
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT, errno.EIO):
                    raise
                self._gso = False  # this kernel or route cannot: plain sends from now on
        for part in parts:
            self._sock.sendto(part, dest)
            self.sends += 1
