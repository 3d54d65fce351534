"""read_startup_packet: the four untyped opening packets, and everything PostgreSQL refuses."""

from __future__ import annotations

import random
import struct

import pytest

from proxy.protocol.framing import ProtocolViolation
from proxy.protocol.startup import (
    MAX_STARTUP_LENGTH,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    read_startup_packet,
)

# Int32 length (counting itself), Int32 196608 = protocol 3.0, name/value strings, one NUL.
STARTUP = (
    b"\x00\x00\x00\x36\x00\x03\x00\x00"
    b"user\x00alice\x00database\x00db\x00application_name\x00psql\x00\x00"
)
# Int32(8), Int32(80877103) = 1234 << 16 | 5679
SSL = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
# Int32(8), Int32(80877104) = 1234 << 16 | 5680
GSSENC = b"\x00\x00\x00\x08\x04\xd2\x16\x30"
# Int32(16), Int32(80877102) = 1234 << 16 | 5678, Int32 pid 4242, secret key
CANCEL = b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x10\x92\xde\xad\xbe\xef"


def startup(body: bytes, protocol: int = 0x00030000) -> bytes:
    """A startup packet with the given parameter bytes, length computed by hand."""
    return struct.pack("!iI", 8 + len(body), protocol) + body


def test_startup_message() -> None:
    """Parameters parsed, the version split, and the whole length consumed."""
    packet, used = read_startup_packet(STARTUP)
    assert used == len(STARTUP) == 0x36
    assert packet == StartupMessage(
        0x00030000, {"user": "alice", "database": "db", "application_name": "psql"}
    )
    assert isinstance(packet, StartupMessage)
    assert (packet.major, packet.minor) == (3, 0)
    assert packet.encode() == STARTUP


def test_following_bytes_are_left_alone() -> None:
    """Only the packet's own length is consumed; what follows stays for the caller."""
    packet, used = read_startup_packet(bytearray(SSL + STARTUP))
    assert (packet, used) == (SSLRequest(), 8)
    assert read_startup_packet(STARTUP + b"Q\x00\x00")[1] == len(STARTUP)


@pytest.mark.parametrize(
    "wire", [STARTUP, SSL, GSSENC, CANCEL], ids=["startup", "ssl", "gss", "cancel"]
)
def test_incomplete_returns_none(wire: bytes) -> None:
    """Every proper prefix of a packet reads as (None, 0): wait for more."""
    for cut in range(len(wire)):
        assert read_startup_packet(wire[:cut]) == (None, 0)


def test_encryption_and_cancel_requests() -> None:
    """SSLRequest, GSSENCRequest and CancelRequest decode from their documented bytes."""
    assert read_startup_packet(SSL) == (SSLRequest(), 8)
    assert read_startup_packet(GSSENC) == (GSSENCRequest(), 8)
    assert read_startup_packet(CANCEL) == (CancelRequest(4242, b"\xde\xad\xbe\xef"), 16)
    assert SSLRequest().encode() == SSL
    assert GSSENCRequest().encode() == GSSENC
    assert CancelRequest(4242, b"\xde\xad\xbe\xef").encode() == CANCEL


@pytest.mark.parametrize(
    "packet",
    [
        SSLRequest(),
        GSSENCRequest(),
        CancelRequest(1, b"\x00\x00\x00\x01"),
        CancelRequest(-5, bytes(range(32))),  # protocol 3.2: longer secret keys
        StartupMessage(0x00030000, {"user": "u"}),
        StartupMessage(0x00030002, {"user": "u", "_pq_.opt": "", "options": "-c x=1"}),
        StartupMessage(0x00030000, {"user": "r\udce9mi", "database": "caf\udce9"}),  # LATIN1
    ],
    ids=repr,
)
def test_encode_round_trips(
    packet: StartupMessage | SSLRequest | GSSENCRequest | CancelRequest,
) -> None:
    """read_startup_packet(p.encode()) gives p back, consuming all of it."""
    wire = packet.encode()
    assert struct.unpack("!i", wire[:4])[0] == len(wire)
    assert read_startup_packet(wire) == (packet, len(wire))


def test_protocol_3_2_is_accepted() -> None:
    """A newer 3.x minor is PostgreSQL's to negotiate, not a violation."""
    packet, _ = read_startup_packet(startup(b"user\x00u\x00\x00", 0x00030002))
    assert isinstance(packet, StartupMessage)
    assert packet.minor == 2


def test_longest_allowed_packet() -> None:
    """A packet of exactly MAX_STARTUP_LENGTH bytes is accepted."""
    filler = b"x" * (MAX_STARTUP_LENGTH - 8 - len(b"user\x00u\x00options\x00\x00\x00"))
    wire = startup(b"user\x00u\x00options\x00" + filler + b"\x00\x00")
    assert len(wire) == MAX_STARTUP_LENGTH == 10000
    packet, used = read_startup_packet(wire)
    assert used == 10000
    assert isinstance(packet, StartupMessage)
    assert packet.parameters["options"] == filler.decode()


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
        pytest.param(b"GET / HT", id="http-first-8-bytes"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01", id="tls-client-hello"),
        pytest.param(struct.pack("!iI", 10001, 0x00030000), id="length-10001"),
        pytest.param(struct.pack("!iI", 0x7FFFFFFF, 0x00030000), id="length-huge"),
        pytest.param(struct.pack("!iI", 7, 0x00030000), id="length-7"),
        pytest.param(struct.pack("!iI", 4, 0x00030000) + b"\x00" * 8, id="length-4"),
        pytest.param(struct.pack("!iI", 0, 0), id="length-0"),
        pytest.param(struct.pack("!iI", -1, 0x00030000), id="length-negative"),
        pytest.param(startup(b"user\x00u\x00\x00", 0x00020000), id="protocol-2.0"),
        pytest.param(startup(b"user\x00u\x00\x00", 0x00040000), id="protocol-4.0"),
        pytest.param(startup(b"user\x00u\x00\x00", 0x04D2162D), id="unknown-request-code"),
        pytest.param(startup(b"database\x00db\x00\x00"), id="missing-user"),
        pytest.param(startup(b"user\x00\x00\x00"), id="empty-user"),
        pytest.param(startup(b"\x00"), id="no-parameters"),
        pytest.param(startup(b""), id="empty-body"),
        pytest.param(startup(b"user\x00u"), id="unterminated-value"),
        pytest.param(startup(b"user"), id="unterminated-name"),
        pytest.param(startup(b"user\x00u\x00"), id="missing-terminator"),
        pytest.param(startup(b"user\x00u\x00database\x00"), id="missing-value-and-terminator"),
        pytest.param(startup(b"a\x00b\x00user\x00u\x00database\x00"), id="dangling-name"),
        pytest.param(startup(b"user\x00u\x00\x00extra"), id="bytes-after-terminator"),
        pytest.param(startup(b"user\x00u\x00\x00\x00"), id="two-terminators"),
        pytest.param(startup(b"\x00x\x00user\x00u\x00\x00"), id="empty-name"),
        pytest.param(SSL[:3] + b"\x0c" + SSL[4:] + b"\x00" * 4, id="ssl-length-12"),
        pytest.param(GSSENC[:3] + b"\x09" + GSSENC[4:] + b"\x00", id="gss-length-9"),
        pytest.param(b"\x00\x00\x00\x0c\x04\xd2\x16\x2e\x00\x00\x00\x01", id="cancel-no-key"),
    ],
)
def test_refused(wire: bytes) -> None:
    """Anything PostgreSQL refuses raises ProtocolViolation."""
    with pytest.raises(ProtocolViolation):
        read_startup_packet(wire)


def test_refused_after_8_bytes() -> None:
    """Garbage is judged on its first 8 bytes; fewer are simply incomplete."""
    assert read_startup_packet(b"GET / H") == (None, 0)
    with pytest.raises(ProtocolViolation):
        read_startup_packet(b"GET / HT")


def test_fuzz_random_bytes_raise_only_protocol_violation() -> None:
    """Random and corrupted packets: a packet, (None, 0) or ProtocolViolation, nothing else."""
    rng = random.Random(8)
    seeds = [STARTUP, SSL, GSSENC, CANCEL]
    outcomes = {"packet": 0, "incomplete": 0, "violation": 0}
    for i in range(4000):
        if i % 3 == 0:
            wire = rng.randbytes(rng.randint(0, 40))
        elif i % 3 == 1:  # a valid header around a random body
            body = rng.randbytes(rng.randint(0, 30))
            if rng.random() < 0.5:
                body = b"user\x00" + body
            wire = startup(body, rng.choice([0x00030000, 0x00030002, 80877102]))
        else:  # a valid packet with a few bytes changed, cut or added
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(len(data))
                if rng.random() < 0.6:
                    data[at] = rng.randrange(256)
                elif rng.random() < 0.5:
                    del data[at]
                else:
                    data.insert(at, rng.choice([0, rng.randrange(256)]))
            wire = bytes(data)
        try:
            packet, used = read_startup_packet(wire)
        except ProtocolViolation:
            outcomes["violation"] += 1
            continue
        if packet is None:
            assert used == 0
            outcomes["incomplete"] += 1
        else:
            assert 8 <= used <= len(wire)
            outcomes["packet"] += 1
    assert min(outcomes.values()) > 50, outcomes
