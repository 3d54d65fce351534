"""The handshake, sans-I/O and playbook style: the client's startup packets (StartupReader)
and the server's authentication (AuthRelay), these bytes in, these bytes and this state out.

Startup packets are built with tests/support/rawpg.py (independent of pgwarden's codec);
the server's messages with pgwarden's codec, checked against hand-built bytes where an
edit is expected.
"""

from __future__ import annotations

import struct

import pytest

from proxy.protocol import messages as m
from proxy.protocol.framing import FrameDecoder, ProtocolViolation
from proxy.protocol.startup import CancelRequest, SSLRequest, StartupMessage
from proxy.session.handshake import AuthRelay, StartupReader
from proxy.session.relay import Relay
from proxy.tracking.round_trips import CLIENT_INTEREST, SERVER_INTEREST, RoundTrips
from tests.support.rawpg import PROTOCOL_3_0, query_message, ssl_request, startup_message

LIMIT = 1 << 16
MAX_MESSAGE = 1 << 30  # the default limits.max_message_size

STARTUP = startup_message(user="alice", database="shop", application_name="web")


def raw_message(mtype: bytes, body: bytes) -> bytes:
    return mtype + struct.pack("!I", 4 + len(body)) + body


# ---------------------------------------------------------------------- StartupReader


def test_startup_message_whole() -> None:
    """One feed holding the whole packet: the packet and its exact bytes, then nothing."""
    reader = StartupReader(LIMIT)
    reader.feed(STARTUP)
    packet, raw = reader.next_packet()  # type: ignore[misc]
    assert packet == StartupMessage(
        PROTOCOL_3_0, {"user": "alice", "database": "shop", "application_name": "web"}
    )
    assert raw == STARTUP
    assert reader.next_packet() is None
    assert reader.take() == b""


def test_startup_message_byte_by_byte() -> None:
    """Nothing until the last byte arrives, then the packet."""
    reader = StartupReader(LIMIT)
    for i in range(len(STARTUP) - 1):
        reader.feed(STARTUP[i : i + 1])
        assert reader.next_packet() is None, i
    reader.feed(STARTUP[-1:])
    found = reader.next_packet()
    assert found is not None
    assert found[1] == STARTUP
    assert isinstance(found[0], StartupMessage) and found[0].parameters["user"] == "alice"


@pytest.mark.parametrize("cut", [1, 4, 7, 8, 9, 20])
def test_ssl_request_then_startup_split_across_feeds(cut: int) -> None:
    """SSLRequest and StartupMessage in one stream, cut anywhere: each comes out once, in
    order, with its own bytes; bytes of the second packet stay buffered meanwhile."""
    stream = ssl_request() + STARTUP
    reader = StartupReader(LIMIT)
    reader.feed(stream[:cut])
    got = []
    while (found := reader.next_packet()) is not None:
        got.append(found)
    reader.feed(stream[cut:])
    while (found := reader.next_packet()) is not None:
        got.append(found)
    assert [type(p) for p, _ in got] == [SSLRequest, StartupMessage]
    assert [raw for _, raw in got] == [ssl_request(), STARTUP]
    assert reader.buf == b""


def test_ssl_request_followed_by_bytes_leaves_them_buffered() -> None:
    """What follows an SSLRequest in the same feed stays in `buf` (the session refuses it:
    CVE-2021-23214), it is not consumed with the request."""
    reader = StartupReader(LIMIT)
    reader.feed(ssl_request() + STARTUP[:3])
    packet, raw = reader.next_packet()  # type: ignore[misc]
    assert packet == SSLRequest() and raw == ssl_request()
    assert bytes(reader.buf) == STARTUP[:3]


def test_cancel_request() -> None:
    request = CancelRequest(4242, b"\x01\x02\x03\x04")
    reader = StartupReader(LIMIT)
    reader.feed(request.encode())
    assert reader.next_packet() == (request, request.encode())


def test_startup_garbage_is_a_protocol_violation() -> None:
    """Garbage (here an HTTP request) is refused after 8 bytes."""
    reader = StartupReader(LIMIT)
    reader.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProtocolViolation, match="invalid length of startup packet"):
        reader.next_packet()


def test_take_returns_what_followed_the_startup_packet() -> None:
    """A client that pipelines a Query behind its StartupMessage: the Query is kept, byte
    for byte, for when the upstream is connected, and `take` empties the buffer."""
    query = query_message("SELECT 1")
    reader = StartupReader(LIMIT)
    reader.feed(STARTUP + query[:4])
    found = reader.next_packet()
    assert found is not None and found[1] == STARTUP
    reader.hold(query[4:])  # arrives while connecting
    assert reader.take() == query
    assert reader.take() == b""


def test_hold_up_to_the_limit_then_protocol_violation() -> None:
    """`hold` keeps exactly `limit` bytes; one more is a ProtocolViolation."""
    reader = StartupReader(10)
    reader.hold(b"x" * 6)
    reader.hold(b"y" * 4)
    assert bytes(reader.buf) == b"xxxxxxyyyy"
    with pytest.raises(ProtocolViolation, match="too much data before authentication"):
        reader.hold(b"z")


# -------------------------------------------------------------------------- AuthRelay

SASL_PLUS = m.AuthenticationRequest.sasl(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")).encode()
# AuthenticationSASL offering SCRAM-SHA-256 alone, by hand: code 10, names, a final NUL
SASL_PLAIN = raw_message(b"R", struct.pack("!i", 10) + b"SCRAM-SHA-256\x00\x00")
SASL_CONTINUE = m.AuthenticationRequest(
    m.AUTH_SASL_CONTINUE, b"r=abcdefghijklmnopqrstuvwxyz,s=c2FsdA==,i=4096"
).encode()
SASL_FINAL = m.AuthenticationRequest(m.AUTH_SASL_FINAL, b"v=c2lnbmF0dXJl").encode()
AUTH_OK = m.AuthenticationRequest(m.AUTH_OK).encode()
KEY = m.BackendKeyData(31337, b"\xde\xad\xbe\xef").encode()
READY = m.ReadyForQuery(b"I").encode()
PARAMS = [
    m.ParameterStatus("server_version", "16.4").encode(),
    m.ParameterStatus("client_encoding", "UTF8").encode(),
    m.ParameterStatus("application_name", "web").encode(),
]
# a reply to a Query the client pipelined behind its startup packet
REPLY = [
    m.RowDescription((m.Column("?column?", 0, 0, 23, 4, -1, 0),)).encode(),
    m.DataRow((b"1",)).encode(),
    m.CommandComplete("SELECT 1").encode(),
    m.ReadyForQuery(b"I").encode(),
]
# the server's side of a SCRAM authentication, up to and past its first ReadyForQuery
SERVER = [SASL_PLUS, SASL_CONTINUE, SASL_FINAL, AUTH_OK, *PARAMS, KEY, READY, *REPLY]
SERVER_STREAM = b"".join(SERVER)
# what the client must get: the same, with SCRAM-SHA-256-PLUS out of the offer
CLIENT_STREAM = SASL_PLAIN + SERVER_STREAM[len(SASL_PLUS) :]


def test_channel_binding_removed_from_the_sasl_offer() -> None:
    """SCRAM-SHA-256-PLUS leaves the mechanism list; the message is re-framed."""
    auth = AuthRelay(MAX_MESSAGE)
    out, after = auth.feed(SASL_PLUS)
    assert out == SASL_PLAIN
    assert after is None
    assert not auth.failed


def test_sasl_offer_without_plus_passes_as_is() -> None:
    offer = m.AuthenticationRequest.sasl(("SCRAM-SHA-256",)).encode()
    assert offer == SASL_PLAIN
    assert AuthRelay(MAX_MESSAGE).feed(offer) == (offer, None)


def test_plus_alone_leaves_an_empty_offer() -> None:
    """A server offering only SCRAM-SHA-256-PLUS: the client is offered nothing it could
    use (and fails cleanly) rather than a mechanism that cannot cross the proxy."""
    out, _ = AuthRelay(MAX_MESSAGE).feed(
        m.AuthenticationRequest.sasl(("SCRAM-SHA-256-PLUS",)).encode()
    )
    assert out == raw_message(b"R", struct.pack("!i", 10) + b"\x00")


@pytest.mark.parametrize(
    "message",
    [
        AUTH_OK,
        raw_message(b"R", struct.pack("!i", 3)),  # cleartext password
        raw_message(b"R", struct.pack("!i", 5) + b"salt"),  # MD5
        SASL_CONTINUE,
        SASL_FINAL,
        PARAMS[0],
        m.NoticeResponse.build("NOTICE", "00000", "hello").encode(),
    ],
)
def test_other_messages_pass_byte_for_byte(message: bytes) -> None:
    auth = AuthRelay(MAX_MESSAGE)
    assert auth.feed(message) == (message, None)
    assert auth.backend_key is None and not auth.failed


def test_backend_key_kept() -> None:
    auth = AuthRelay(MAX_MESSAGE)
    out, after = auth.feed(AUTH_OK + KEY)
    assert out == AUTH_OK + KEY
    assert after is None
    assert auth.backend_key == (31337, b"\xde\xad\xbe\xef")


def test_backend_key_without_a_key_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation, match="without a key"):
        AuthRelay(MAX_MESSAGE).feed(raw_message(b"K", struct.pack("!i", 7)))


def test_error_response_sets_failed_and_passes() -> None:
    """A failed password: the error reaches the client as sent, and `failed` says the
    server will close."""
    error = m.ErrorResponse.build(
        "FATAL", "28P01", 'password authentication failed for user "alice"'
    )
    raw = error.encode()
    auth = AuthRelay(MAX_MESSAGE)
    assert auth.feed(SASL_PLUS) == (SASL_PLAIN, None)
    assert not auth.failed
    assert auth.feed(raw) == (raw, None)
    assert auth.failed
    assert auth.error is not None
    assert (auth.error.sqlstate, auth.error.message) == ("28P01", error.message)


def test_malformed_error_response_is_a_protocol_violation() -> None:
    """The error is decoded to tell why the startup failed; no server sends one unreadable."""
    with pytest.raises(ProtocolViolation, match="malformed ErrorResponse"):
        AuthRelay(MAX_MESSAGE).feed(raw_message(b"E", b"SFATAL"))


def test_ready_for_query_returns_the_bytes_after_it() -> None:
    """The chunk holding the first ReadyForQuery: the client gets everything (messages after
    it included, as they came), the bytes after the ReadyForQuery come back as the tail
    (for the relay's reader, at a message boundary) and `status` is the ready's."""
    auth = AuthRelay(MAX_MESSAGE)
    assert auth.status is None
    chunk = AUTH_OK + PARAMS[0] + KEY + READY + b"".join(REPLY)
    out, tail = auth.feed(chunk)
    assert out == chunk
    assert tail == b"".join(REPLY)
    assert auth.status == b"I"
    assert auth.backend_key == (31337, b"\xde\xad\xbe\xef")
    assert auth.frames.at_boundary


def test_a_ready_ending_the_chunk_leaves_an_empty_tail() -> None:
    auth = AuthRelay(MAX_MESSAGE)
    assert auth.feed(AUTH_OK + READY) == (AUTH_OK + READY, b"")
    assert auth.status == b"I"


def test_a_ready_cut_in_two_is_put_back_together() -> None:
    """A ReadyForQuery cut before its status byte: nothing of it goes to the client until
    it is whole, then it does, with what follows it as the tail."""
    transaction = m.ReadyForQuery(b"T").encode()
    auth = AuthRelay(MAX_MESSAGE)
    assert auth.feed(AUTH_OK + transaction[:5]) == (AUTH_OK, None)
    assert auth.status is None and not auth.frames.at_boundary
    assert auth.feed(transaction[5:] + REPLY[0]) == (transaction + REPLY[0], REPLY[0])
    assert auth.status == b"T"


def test_chunk_ending_mid_message_after_ready() -> None:
    """A message after the ReadyForQuery cut by the chunk's end goes to the client as far
    as it came, and is in the tail: the relay's reader takes it from its first byte."""
    data_row = REPLY[1]
    auth = AuthRelay(MAX_MESSAGE)
    out, tail = auth.feed(READY + REPLY[0] + data_row[:7])
    assert out == READY + REPLY[0] + data_row[:7]
    assert tail == REPLY[0] + data_row[:7]
    reader = FrameDecoder(SERVER_INTEREST, inspect_limit=1 << 16)
    assert [t for t, _ in reader.feed(tail)] == []  # RowDescription is of no interest
    assert reader.remaining() == (b"", len(data_row) - 7)


def test_chunk_ending_mid_header() -> None:
    """Before the ReadyForQuery, three bytes of a header: nothing for the client yet, the
    bytes held until the message is whole, then it goes as it came."""
    auth = AuthRelay(MAX_MESSAGE)
    assert auth.feed(AUTH_OK + KEY[:3]) == (AUTH_OK, None)
    assert auth.frames.remaining() == (KEY[:3], 0)
    assert auth.backend_key is None
    assert auth.feed(KEY[3:]) == (KEY, None)
    assert auth.frames.at_boundary
    assert auth.backend_key == (31337, b"\xde\xad\xbe\xef")


class _Transport:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def is_closing(self) -> bool:
        return False


class _Owner:
    """The session as the relay sees it; a violation fails the test."""

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.draining = False

    def protocol_violation(self, side: str, exc: ProtocolViolation) -> None:
        raise AssertionError(f"{side}: {exc}")

    def drain_if_idle(self) -> None:
        pass

    def books_lost(self, exc: Exception) -> None:
        raise AssertionError(exc)


def relay_auth(chunks: list[bytes]) -> tuple[bytes, AuthRelay, RoundTrips]:
    """What the session does with server chunks during AUTH, then READY: the handshake's
    output to the client; at the first ReadyForQuery its status counted, a plain relay
    built and the tail handed to `track_server`; later chunks through the relay. Returns
    all the client got, the handshake, and the round trips (a Query pipelined behind the
    startup packet owed)."""
    auth = AuthRelay(MAX_MESSAGE)
    books = RoundTrips()
    books.awaiting = 1  # the pipelined Query
    client = _Transport()
    relay: Relay | None = None
    for chunk in chunks:
        if relay is not None:
            relay.server_data(chunk)
            continue
        out, tail = auth.feed(chunk)
        if out:
            client.write(out)
        if tail is not None:
            assert auth.status is not None
            books.ready(auth.status, 0.0)
            client_frames = FrameDecoder(CLIENT_INTEREST, inspect_limit=0, max_length=MAX_MESSAGE)
            relay = Relay(
                _Owner(),
                client,  # type: ignore[arg-type]
                _Transport(),  # type: ignore[arg-type]
                books,
                client_frames,
                None,
                MAX_MESSAGE,
            )
            if tail:
                assert relay.track_server(tail)
    return b"".join(client.chunks), auth, books


def test_a_chunk_cut_anywhere() -> None:
    """The authentication stream cut at any byte: the client gets the same bytes in total
    (the offer edited, nothing else), and the key is kept."""
    for cut in range(1, len(SERVER_STREAM)):
        client, auth, _ = relay_auth([SERVER_STREAM[:cut], SERVER_STREAM[cut:]])
        assert client == CLIENT_STREAM, cut
        assert auth.backend_key == (31337, b"\xde\xad\xbe\xef"), cut
        assert auth.status == b"I", cut
        assert not auth.failed


def test_round_trips_across_the_switch() -> None:
    """Both ReadyForQuery are counted whichever side of the switch to relaying they fall
    on, so the pipelined Query's round trip ends and the session is idle."""
    for cut in range(1, len(SERVER_STREAM)):
        _, _, books = relay_auth([SERVER_STREAM[:cut], SERVER_STREAM[cut:]])
        assert books.readies == 2, cut
        assert books.idle, cut


# a cut after the header of the reply's ReadyForQuery, before its status byte
_CUT_IN_LAST_READY = len(SERVER_STREAM) - 1


def test_a_ready_cut_after_its_header_at_the_switch_is_counted() -> None:
    """The chunk that completes authentication ends after the header of the next
    ReadyForQuery: those 5 bytes reach the client in the tail, and the reader taking over
    counts that ReadyForQuery when its status arrives."""
    cut = _CUT_IN_LAST_READY
    first = SERVER_STREAM[:cut]
    auth = AuthRelay(MAX_MESSAGE)
    out, tail = auth.feed(first)
    assert tail is not None and tail.endswith(REPLY[-1][:5])
    assert out.endswith(tail)
    client, _, books = relay_auth([first, SERVER_STREAM[cut:]])
    assert client == CLIENT_STREAM
    assert books.readies == 2
    assert books.idle


def test_byte_by_byte() -> None:
    client, auth, books = relay_auth([SERVER_STREAM[i : i + 1] for i in range(len(SERVER_STREAM))])
    assert client == CLIENT_STREAM
    assert auth.backend_key == (31337, b"\xde\xad\xbe\xef")
    assert books.readies == 2 and books.idle


def test_oversized_message_is_a_protocol_violation() -> None:
    """A message over limits.max_message_size, or too large to inspect (1 MiB), is refused
    as soon as its header is seen."""
    with pytest.raises(ProtocolViolation, match="invalid length"):
        AuthRelay(100).feed(raw_message(b"R", struct.pack("!i", 10) + b"x" * 200))
    header_only = b"R" + struct.pack("!I", 4 + (2 << 20))
    with pytest.raises(ProtocolViolation, match="oversized message during authentication"):
        AuthRelay(MAX_MESSAGE).feed(header_only)


def test_auth_invalid_length_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation, match="invalid length 2"):
        AuthRelay(MAX_MESSAGE).feed(b"R\x00\x00\x00\x02")


def test_a_large_message_after_ready_passes_as_it_is() -> None:
    """A reply over the handshake's inspect limit (1 MiB) right behind the ReadyForQuery (a
    Query pipelined behind the startup packet), cut 100 bytes into its body: its header and
    those bytes reach the client as sent, in the tail; the rest of its body flows through
    the relay, and the reply's ReadyForQuery is counted."""
    big = m.DataRow((b"x" * (2 << 20),)).encode()
    done = m.CommandComplete("SELECT 1").encode()
    stream = READY + big + done + READY
    cut = len(READY) + 5 + 100
    auth = AuthRelay(MAX_MESSAGE)
    out, tail = auth.feed(stream[:cut])
    assert out == stream[:cut]
    assert tail == big[:105]
    client, _, books = relay_auth([stream[:cut], stream[cut:]])
    assert client == stream
    assert books.readies == 2 and books.idle
