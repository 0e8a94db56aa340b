"""UDP sockets for the data plane: the master's multicast sender (which also receives the
targets' feedback) and a target's group member socket.

Local syncs pin everything to loopback: the group is sent through 127.0.0.1 (or ``lo`` for IPv6)
with a TTL / hop limit of 0, so no datagram can leave the machine even if routing is odd.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

DEFAULT_GROUP_V4 = "239.255.67.92"  # the original's default: administratively scoped
DEFAULT_GROUP_V6 = "ff15::6d72:7379:6e63"  # transient, site-local scope: "mrsync"
DEFAULT_PORT = 8888
BUFFER_BYTES = 32 * 1024 * 1024  # socket buffers: deep enough to absorb a scheduling hiccup
IP_UDP_HEADERS: dict[int, int] = {socket.AF_INET: 28, socket.AF_INET6: 48}

# Linux constants the socket module does not export everywhere.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


class Endpoint(NamedTuple):
    family: int
    group: str
    port: int
    interface: str  # IPv4: local address to send and join on; IPv6: interface name


def loopback_endpoint(family: int, group: str | None, port: int) -> Endpoint:
    if family == socket.AF_INET6:
        return Endpoint(family, group or DEFAULT_GROUP_V6, port, "lo")
    return Endpoint(family, group or DEFAULT_GROUP_V4, port, "127.0.0.1")


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


def interface_of_address(address: str) -> str:
    """Name of the interface that holds this IPv4 address (lo for 127.x)."""
    if address.startswith("127."):
        return "lo"
    for _index, name in socket.if_nameindex():
        try:
            import fcntl

            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                req = struct.pack("256s", name.encode()[:15])
                got = fcntl.ioctl(s.fileno(), 0x8915, req)  # SIOCGIFADDR
            if socket.inet_ntoa(got[20:24]) == address:
                return name
        except OSError:
            continue
    raise OSError(f"no interface has address {address}")


def open_sender(endpoint: Endpoint, *, ttl: int) -> socket.socket:
    """The master's socket: multicasts to the group and receives feedback on its own port."""
    sock = socket.socket(endpoint.family, socket.SOCK_DGRAM)
    try:
        if endpoint.family == socket.AF_INET6:
            index = socket.if_nametoindex(endpoint.interface)
            sock.bind(("::1" if endpoint.interface == "lo" else "::", 0, 0, 0))
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ttl)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)
        else:
            sock.bind((endpoint.interface, 0))
            sock.setsockopt(
                socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(endpoint.interface)
            )
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
            # Targets on this very host must hear the group too.
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        set_buffer(sock, BUFFER_BYTES, receive=False)
        set_buffer(sock, BUFFER_BYTES // 4, receive=True)
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
            mreq = socket.inet_aton(endpoint.group) + socket.inet_aton(endpoint.interface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        got = set_buffer(sock, BUFFER_BYTES, receive=True)
    except BaseException:
        sock.close()
        raise
    return sock, got
