"""The MAC of DATA and PARITY datagrams: AES-256-GMAC, and the nonces that keep it safe.

GMAC is broken by one nonce used with two different messages under one key, so the tests
check the construction against an independent computation (compiled and pure-Python alike),
and that the master never gives two different datagrams of a session the same
(transfer, seq): in the multicast flow, with repairs and parity, and across the unicast
catch-up flows that follow it.
"""

from __future__ import annotations

import os

import blake3
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mrsync.engine import simulator
from mrsync.engine.sender import CATCH_UP_SEQS, catch_up_first_seq
from mrsync.speedups import speedups
from mrsync.wire import (
    DATA_MAC_SIZE,
    MAC_SIZE,
    DecodeError,
    DropReason,
    decode,
    encode_data,
    encode_parity,
    encode_poll,
    packets,
)

KEY = bytes(range(32))
SESSION = 0x89ABCDEF


def _reference_tag(key: bytes, message: bytes) -> bytes:
    """The construction as documented in wire/packets.py, computed independently."""
    derived = blake3.blake3(b"mrsync 2: the AES-256-GMAC key of DATA and PARITY datagrams",
                            key=key).digest()
    return AESGCM(derived).encrypt(message[8:20], b"", message)[:12]


def _authenticators() -> list[object]:
    derived = blake3.blake3(packets._DATA_MAC_KEY_CONTEXT, key=KEY).digest()
    found: list[object] = [packets._PythonGmac(derived)]
    if speedups is not None:
        found.append(speedups.Gmac(derived))
    return found


@pytest.mark.parametrize("size", [20, 32, 100, 1460, 9000])
def test_every_authenticator_computes_the_documented_tag(size: int) -> None:
    message = os.urandom(size)
    want = _reference_tag(KEY, message)
    for mac in _authenticators():
        assert mac.tag(message) == want  # type: ignore[attr-defined]
        assert mac.tag(memoryview(message)) == want  # type: ignore[attr-defined]


def test_the_compiled_module_is_built_where_libcrypto_headers_are() -> None:
    if os.environ.get("MRSYNC_PURE_PYTHON", "") not in ("", "0"):
        pytest.skip("compiled modules turned off")
    if not os.path.exists("/usr/include/openssl/evp.h"):
        pytest.skip("no OpenSSL headers here")
    assert speedups is not None and hasattr(speedups, "Gmac")


def test_gmac_refuses_what_it_cannot_authenticate() -> None:
    for mac in _authenticators():
        with pytest.raises(ValueError):
            mac.tag(bytes(19))  # type: ignore[attr-defined]
    if speedups is not None:
        with pytest.raises(ValueError):
            speedups.Gmac(bytes(16))
        with pytest.raises(TypeError):  # the compiled paths take only their own authenticator
            speedups.seal_run(blake3.blake3(key=KEY), SESSION, 1, 0, 0, 1, b"x" * 10, 10)


def test_data_and_parity_carry_the_gmac_polls_a_keyed_blake3() -> None:
    data = encode_data(KEY, SESSION, 3, 41, 7, 9, b"page bytes")
    parity = encode_parity(KEY, SESSION, 3, 42, 0, 200, b"symbol bytes")
    poll = encode_poll(KEY, SESSION, 3, 5, 42)
    for datagram in (data, parity):
        assert datagram[-DATA_MAC_SIZE:] == _reference_tag(KEY, datagram[:-DATA_MAC_SIZE])
    assert poll[-MAC_SIZE:] == blake3.blake3(poll[:-MAC_SIZE], key=KEY).digest(length=MAC_SIZE)


def test_any_changed_byte_fails_the_mac() -> None:
    good = encode_data(KEY, SESSION, 3, 41, 7, 9, bytes(range(200)))
    assert decode(good, KEY, SESSION).seq == 41  # type: ignore[union-attr]
    for at in range(4, len(good)):  # magic, version and type fail earlier checks
        bad = bytearray(good)
        bad[at] ^= 0x20
        with pytest.raises(DecodeError) as e:
            decode(bytes(bad), KEY, SESSION)
        assert e.value.reason in (DropReason.MAC, DropReason.SESSION), at
    with pytest.raises(DecodeError) as e:
        decode(good, bytes(32), SESSION)  # another session's key
    assert e.value.reason is DropReason.MAC


def test_catch_up_flows_number_from_ranges_of_their_own() -> None:
    group_last = 123_456
    firsts = [catch_up_first_seq(group_last, rid) for rid in range(50)]
    # Each flow's range lies past the group's seqs and before the next flow's.
    assert firsts[0] > group_last
    for a, b in zip(firsts, firsts[1:], strict=False):
        assert b - a == CATCH_UP_SEQS
    assert firsts[-1] + CATCH_UP_SEQS < 1 << 64
    with pytest.raises(ValueError):
        catch_up_first_seq(CATCH_UP_SEQS, 0)
    with pytest.raises(ValueError):
        catch_up_first_seq(0, 1 << 23)


@pytest.mark.parametrize("fec", [True, False])
def test_no_nonce_carries_two_messages(monkeypatch: pytest.MonkeyPatch, fec: bool) -> None:
    """The real sender, at 5 % loss on 6 receivers (repairs, parity rounds, polls): every
    (transfer, seq) of a DATA or PARITY datagram is sent with one message only."""
    seen: dict[tuple[int, int], bytes] = {}
    real_data, real_parity = simulator.encode_data, simulator.encode_parity

    def record(datagram: bytes) -> bytes:
        nonce = (int.from_bytes(datagram[8:12], "big"), int.from_bytes(datagram[12:20], "big"))
        assert seen.setdefault(nonce, datagram) == datagram, nonce
        return datagram

    monkeypatch.setattr(simulator, "encode_data", lambda *a: record(real_data(*a)))
    monkeypatch.setattr(simulator, "encode_parity", lambda *a: record(real_parity(*a)))
    size = 1400 * 600

    def content(obj: int, page: int) -> bytes:
        return bytes([page % 251]) * min(1400, size - page * 1400)

    result = simulator.simulate(objects=[(0, size)], content=content, receivers=6, loss=0.05,
                                seed=3, page_size=1400, fec=fec)
    assert result.all_identical
    assert len(seen) > 600  # every page once, and repairs on top
