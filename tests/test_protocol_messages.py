"""Round-trip and exact-bytes tests for every protocol-3 message class.

Expected byte strings are written by hand from the PostgreSQL "Message Formats" page (type
byte, Int32 length counting itself, then the fields), not produced by the codec under test.
"""

from __future__ import annotations

import contextlib
import random
import struct

import pytest

from proxy.protocol import messages as m

Message = m._Message

# ------------------------------------------------------------------ hand-written bytes

# (message, the exact bytes the docs give for it)
EXACT: list[tuple[Message, bytes]] = [
    # Query: 'Q', length 13 = 4 + "SELECT 1\0"
    (m.Query("SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\x00"),
    # ReadyForQuery: 'Z', length 5, status byte
    (m.ReadyForQuery(b"I"), b"Z\x00\x00\x00\x05I"),
    (m.ReadyForQuery(b"T"), b"Z\x00\x00\x00\x05T"),
    # ErrorResponse: (code byte, String)* then a zero byte; length 32
    (
        m.ErrorResponse({"S": "ERROR", "V": "ERROR", "C": "42601", "M": "boom"}),
        b"E\x00\x00\x00\x20SERROR\x00VERROR\x00C42601\x00Mboom\x00\x00",
    ),
    # RowDescription: Int16 count, then per field: String name, Int32 table OID, Int16 attnum,
    # Int32 type OID, Int16 type size, Int32 type modifier, Int16 format code; length 50
    (
        m.RowDescription(
            (
                m.Column("id", 16384, 1, 23, 4, -1, 0),
                m.Column("name", 16384, 2, 25, -1, -1, 0),
            )
        ),
        b"T\x00\x00\x00\x32\x00\x02"
        b"id\x00\x00\x00\x40\x00\x00\x01\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00"
        b"name\x00\x00\x00\x40\x00\x00\x02\x00\x00\x00\x19\xff\xff\xff\xff\xff\xff\x00\x00",
    ),
    # DataRow: Int16 count, then Int32 length (-1 = NULL) and bytes per column; length 19
    (
        m.DataRow((b"1", None, b"")),
        b"D\x00\x00\x00\x13\x00\x03\x00\x00\x00\x011\xff\xff\xff\xff\x00\x00\x00\x00",
    ),
    # Bind: portal, statement, Int16 n + Int16[n] param formats, Int16 n + values,
    # Int16 n + Int16[n] result formats; length 36
    (
        m.Bind("", "s1", (0, 1), (b"42", b"\x00\x00\x00\x07"), (1, 0)),
        b"B\x00\x00\x00\x24\x00s1\x00"
        b"\x00\x02\x00\x00\x00\x01"
        b"\x00\x02\x00\x00\x00\x0242\x00\x00\x00\x04\x00\x00\x00\x07"
        b"\x00\x02\x00\x01\x00\x00",
    ),
    # Parse: name, query, Int16 n, Int32[n] type OIDs; length 31
    (
        m.Parse("s1", "SELECT $1, $2", (23, 25)),
        b"P\x00\x00\x00\x1fs1\x00SELECT $1, $2\x00\x00\x02\x00\x00\x00\x17\x00\x00\x00\x19",
    ),
    # CommandComplete: the tag; length 13
    (m.CommandComplete("SELECT 3"), b"C\x00\x00\x00\x0dSELECT 3\x00"),
    # AuthenticationOk: Int32(8) length, Int32(0)
    (m.AuthenticationRequest(0), b"R\x00\x00\x00\x08\x00\x00\x00\x00"),
    # AuthenticationMD5Password: Int32(12), Int32(5), Byte4 salt
    (
        m.AuthenticationRequest(5, b"\x01\x02\x03\x04"),
        b"R\x00\x00\x00\x0c\x00\x00\x00\x05\x01\x02\x03\x04",
    ),
    # AuthenticationSASL: Int32(10), then one String per mechanism and a final zero byte
    (
        m.AuthenticationRequest.sasl(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
        b"R\x00\x00\x00\x2a\x00\x00\x00\x0aSCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00",
    ),
    # BackendKeyData: Int32(12), Int32 pid (1234), secret key (4 bytes in 3.0)
    (
        m.BackendKeyData(1234, b"\xde\xad\xbe\xef"),
        b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\xde\xad\xbe\xef",
    ),
    # ParameterDescription: Int16 n, Int32[n] type OIDs; length 14
    (
        m.ParameterDescription((23, 25)),
        b"t\x00\x00\x00\x0e\x00\x02\x00\x00\x00\x17\x00\x00\x00\x19",
    ),
    # NotificationResponse: Int32 pid (4321), channel, payload; length 16
    (
        m.NotificationResponse(4321, "jobs", "42"),
        b"A\x00\x00\x00\x10\x00\x00\x10\xe1jobs\x0042\x00",
    ),
    # CopyInResponse: Int8 overall format, Int16 n, Int16[n] column formats; length 11
    (m.CopyInResponse(0, (0, 0)), b"G\x00\x00\x00\x0b\x00\x00\x02\x00\x00\x00\x00"),
    (m.CopyOutResponse(1, (1,)), b"H\x00\x00\x00\x09\x01\x00\x01\x00\x01"),
    # NegotiateProtocolVersion: Int32 newest minor, Int32 n, String[n] options; length 21
    (
        m.NegotiateProtocolVersion(0, ("_pq_.foo",)),
        b"v\x00\x00\x00\x15\x00\x00\x00\x00\x00\x00\x00\x01_pq_.foo\x00",
    ),
    # FunctionCall: Int32 OID (1598), Int16 n + formats, Int16 n + args, Int16 result format
    (
        m.FunctionCall(1598, (1,), (b"\x00\x00\x00\x2a", None), 1),
        b"F\x00\x00\x00\x1c\x00\x00\x06\x3e\x00\x01\x00\x01"
        b"\x00\x02\x00\x00\x00\x04\x00\x00\x00\x2a\xff\xff\xff\xff\x00\x01",
    ),
    # FunctionCallResponse: Int32 length (-1 = NULL) and the value
    (m.FunctionCallResponse(None), b"V\x00\x00\x00\x08\xff\xff\xff\xff"),
    (m.FunctionCallResponse(b"ok"), b"V\x00\x00\x00\x0a\x00\x00\x00\x02ok"),
    # Execute: portal, Int32 max rows (0 = no limit)
    (m.Execute("", 0), b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"),
    # Describe / Close: Byte1 'S' or 'P', name
    (m.Describe(b"S", "s1"), b"D\x00\x00\x00\x08Ss1\x00"),
    (m.Close(b"P", ""), b"C\x00\x00\x00\x06P\x00"),
    (
        m.ParameterStatus("client_encoding", "UTF8"),
        b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00",
    ),
    (m.CopyData(b"1\t2\n"), b"d\x00\x00\x00\x081\t2\n"),
    (m.CopyFail("no"), b"f\x00\x00\x00\x07no\x00"),
    # messages without contents: just the type and Int32(4)
    (m.Sync(), b"S\x00\x00\x00\x04"),
    (m.Flush(), b"H\x00\x00\x00\x04"),
    (m.Terminate(), b"X\x00\x00\x00\x04"),
    (m.CopyDone(), b"c\x00\x00\x00\x04"),
    (m.ParseComplete(), b"1\x00\x00\x00\x04"),
    (m.BindComplete(), b"2\x00\x00\x00\x04"),
    (m.CloseComplete(), b"3\x00\x00\x00\x04"),
    (m.NoData(), b"n\x00\x00\x00\x04"),
    (m.PortalSuspended(), b"s\x00\x00\x00\x04"),
    (m.EmptyQueryResponse(), b"I\x00\x00\x00\x04"),
]


@pytest.mark.parametrize(("msg", "wire"), EXACT, ids=lambda v: type(v).__name__)
def test_encode_matches_documented_bytes(msg: Message, wire: bytes) -> None:
    """encode() produces exactly the documented bytes, and those bytes decode back to msg."""
    assert msg.encode() == wire
    assert struct.unpack("!I", wire[1:5])[0] == len(wire) - 1  # the hand-written length agrees
    assert type(msg).decode(wire[5:]) == msg


# ------------------------------------------------------------------------ round trips

EXAMPLES: list[Message] = [
    m.Query(""),
    m.Query("SELECT 1; SELECT 'é'"),
    m.Query("SELECT '\udcff'"),  # a byte invalid in UTF-8, kept by surrogateescape
    m.Parse("", "SELECT 1"),
    m.Parse("stmt", "SELECT $1::bigint", (20, 0, 3_000_000_000)),
    m.Bind("p", "s", (), (), ()),
    m.Bind("", "", (1,), (b"\x00\x01", None, b""), (0,)),
    m.Describe(b"P", "portal"),
    m.Close(b"S", "stmt"),
    m.Execute("p", 100),
    m.Sync(),
    m.Flush(),
    m.Terminate(),
    m.FunctionCall(42),
    m.FunctionCall(4_000_000_000, (0, 1), (None, b"x"), 1),
    m.CopyData(b""),
    m.CopyData(bytes(range(256))),
    m.CopyDone(),
    m.CopyFail("client gave up"),
    m.PasswordMessage(b"md5abcdef\x00"),
    m.AuthenticationRequest(0),
    m.AuthenticationRequest(3),
    m.AuthenticationRequest(11, b"r=nonce,s=salt,i=4096"),
    m.AuthenticationRequest.sasl(("SCRAM-SHA-256",)),
    m.BackendKeyData(-1, b"\x00" * 32),
    m.ParseComplete(),
    m.BindComplete(),
    m.CloseComplete(),
    m.NoData(),
    m.PortalSuspended(),
    m.EmptyQueryResponse(),
    m.CommandComplete("INSERT 0 5"),
    m.CopyInResponse(1, ()),
    m.CopyOutResponse(0, (0, 0, 0)),
    m.CopyBothResponse(0, (0,)),
    m.DataRow(()),
    m.DataRow((None, None)),
    m.DataRow((b"x" * 300, b"\x00")),
    m.ErrorResponse.build("FATAL", "57P01", "terminating", detail="admin"),
    m.NoticeResponse({"S": "NOTICE", "M": "hello"}),
    m.ErrorResponse({}),
    m.FunctionCallResponse(b""),
    m.NegotiateProtocolVersion(2, ()),
    m.NegotiateProtocolVersion(0, ("_pq_.a", "_pq_.b")),
    m.NotificationResponse(-7, "", ""),
    m.ParameterDescription(()),
    m.ParameterDescription((4_294_967_295,)),
    m.ParameterStatus("TimeZone", "Europe/Paris"),
    m.ReadyForQuery(b"E"),
    m.RowDescription(()),
    m.RowDescription((m.Column("?column?", 0, 0, 4_294_967_295, -2, 2147483647, 1),)),
]

ALL_MESSAGES = [msg for msg, _ in EXACT] + EXAMPLES

FRONTEND_ONLY = {m.Query, m.Parse, m.Bind, m.Describe, m.Close, m.Execute, m.Sync, m.Flush}
FRONTEND_ONLY |= {m.Terminate, m.FunctionCall, m.CopyFail, m.PasswordMessage}


def _table(msg: Message) -> dict[int, type[Message]]:
    return m.FRONTEND if type(msg) in FRONTEND_ONLY else m.BACKEND


def test_examples_cover_every_message_class() -> None:
    """Every class in the FRONTEND and BACKEND tables has round-trip examples."""
    classes = set(m.FRONTEND.values()) | set(m.BACKEND.values())
    exported = {
        obj
        for name in m.__all__
        if isinstance(obj := getattr(m, name), type) and issubclass(obj, Message)
    }
    assert classes == exported
    assert classes <= {type(msg) for msg in ALL_MESSAGES}


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda v: type(v).__name__)
def test_round_trip(msg: Message) -> None:
    """decode(encode(x)) == x, through the direction table and from a memoryview body."""
    wire = msg.encode()
    assert wire[:1] == msg.TYPE
    assert struct.unpack("!i", wire[1:5])[0] == len(wire) - 1
    decoded = m.decode(_table(msg), wire[0], memoryview(wire)[5:])
    assert type(decoded) is type(msg)
    assert decoded == msg
    assert decoded.encode() == wire


def test_same_type_byte_decodes_by_direction() -> None:
    """'D', 'C', 'E', 'S', 'H' mean different messages from the client and the server."""
    assert m.decode(m.FRONTEND, ord("D"), b"Ss1\x00") == m.Describe(b"S", "s1")
    assert m.decode(m.BACKEND, ord("D"), b"\x00\x00") == m.DataRow(())
    assert m.decode(m.FRONTEND, ord("C"), b"Pp\x00") == m.Close(b"P", "p")
    assert m.decode(m.BACKEND, ord("C"), b"BEGIN\x00") == m.CommandComplete("BEGIN")
    assert m.decode(m.FRONTEND, ord("E"), b"\x00\x00\x00\x00\x00") == m.Execute("")
    assert m.decode(m.BACKEND, ord("E"), b"\x00") == m.ErrorResponse({})
    assert m.decode(m.FRONTEND, ord("S"), b"") == m.Sync()
    assert m.decode(m.BACKEND, ord("S"), b"a\x00b\x00") == m.ParameterStatus("a", "b")
    assert m.decode(m.FRONTEND, ord("H"), b"") == m.Flush()
    assert m.decode(m.BACKEND, ord("H"), b"\x00\x00\x00") == m.CopyOutResponse(0, ())


def test_copy_messages_in_both_directions() -> None:
    """CopyData and CopyDone are the same message either way."""
    for table in (m.FRONTEND, m.BACKEND):
        assert m.decode(table, ord("d"), b"row\n") == m.CopyData(b"row\n")
        assert m.decode(table, ord("c"), b"") == m.CopyDone()


# ---------------------------------------------------------------------- properties


@pytest.mark.parametrize(
    ("tag", "command", "rows"),
    [
        ("INSERT 0 5", "INSERT", 5),
        ("SELECT 3", "SELECT", 3),
        ("UPDATE 0", "UPDATE", 0),
        ("DELETE 12", "DELETE", 12),
        ("COPY 1000000", "COPY", 1000000),
        ("BEGIN", "BEGIN", None),
        ("CREATE TABLE", "CREATE", None),
        ("SELECT ²", "SELECT", None),  # isdigit() but not a number int() accepts
        ("", "", None),
    ],
)
def test_command_complete_rows(tag: str, command: str, rows: int | None) -> None:
    """The row count is the last word of the tag, when the tag has one."""
    cc = m.CommandComplete(tag)
    assert cc.command == command
    assert cc.rows == rows


def test_sasl_mechanisms() -> None:
    """AuthenticationSASL lists its mechanisms; other codes list none."""
    wire = b"\x00\x00\x00\x0aSCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"
    auth = m.AuthenticationRequest.decode(wire)
    assert auth.code == m.AUTH_SASL
    assert auth.mechanisms == ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")
    assert m.AuthenticationRequest(m.AUTH_SASL_CONTINUE, b"r=x\x00y").mechanisms == ()


def test_error_fields() -> None:
    """sqlstate, severity (non-localized V preferred over S) and message come from fields."""
    err = m.ErrorResponse.decode(b"SFEHLER\x00VERROR\x00C23505\x00Mduplicate\x00\x00")
    assert (err.severity, err.sqlstate, err.message) == ("ERROR", "23505", "duplicate")
    assert m.ErrorResponse({"S": "FATAL"}).severity == "FATAL"
    built = m.ErrorResponse.build("ERROR", "08P01", "bad", detail="why")
    assert built.fields == {"S": "ERROR", "V": "ERROR", "C": "08P01", "M": "bad", "D": "why"}
    assert m.ErrorResponse({}).sqlstate == ""


def test_bind_param_format() -> None:
    """No codes: all text; one code: applies to all; otherwise one code per parameter."""
    assert m.Bind("", "", (), (b"a", b"b")).param_format(1) == 0
    assert m.Bind("", "", (1,), (b"a", b"b")).param_format(1) == 1
    mixed = m.Bind("", "", (0, 1), (b"a", b"b"))
    assert [mixed.param_format(i) for i in range(2)] == [0, 1]


def test_non_utf8_text_round_trips_byte_for_byte() -> None:
    """Text in another client_encoding survives decode and encode unchanged."""
    body = b"SELECT '\xe9t\xe9'\x00"  # LATIN1
    assert m.Query.decode(body).payload() == body


# --------------------------------------------------------------------------- errors

# Classes whose body is self-delimiting: every proper prefix of a valid body is invalid.
SELF_DELIMITING = [
    msg
    for msg in ALL_MESSAGES
    if not isinstance(msg, m.CopyData | m.PasswordMessage | m.AuthenticationRequest)
    and not isinstance(msg, m.BackendKeyData)
]


@pytest.mark.parametrize("msg", SELF_DELIMITING, ids=lambda v: type(v).__name__)
def test_truncated_body_raises_value_error(msg: Message) -> None:
    """Every truncation of a self-delimiting body raises ValueError."""
    body = msg.encode()[5:]
    for cut in range(len(body)):
        with pytest.raises(ValueError):
            type(msg).decode(body[:cut])


def test_truncated_open_ended_bodies() -> None:
    """Bodies too short for their fixed part raise ValueError."""
    for cut in range(4):
        with pytest.raises(ValueError):
            m.AuthenticationRequest.decode(b"\x00\x00\x00\x00"[:cut])
    for cut in range(5):
        with pytest.raises(ValueError):
            m.BackendKeyData.decode(b"\x00\x00\x04\xd2\x01"[:cut])


@pytest.mark.parametrize(
    ("cls", "body"),
    [
        (m.Sync, b"\x00"),  # a message without contents carrying some
        (m.ReadyForQuery, b"X"),  # unknown transaction status
        (m.DataRow, b"\x00\x01\xff\xff\xff\xfe"),  # length -2
        (m.Bind, b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x09abc\x00\x00"),  # value past the end
        (m.RowDescription, b"\x00\x01x\x00\x00\x00"),  # field cut short
        (m.NegotiateProtocolVersion, b"\x00\x00\x00\x00\x00\x00\x00\x02a\x00"),  # 2 names, 1 given
    ],
)
def test_malformed_body_raises_value_error(cls: type[Message], body: bytes) -> None:
    """Inconsistent bodies raise ValueError."""
    with pytest.raises(ValueError):
        cls.decode(body)


def test_unknown_type_raises_value_error() -> None:
    """A type byte the direction does not define is refused."""
    with pytest.raises(ValueError):
        m.decode(m.BACKEND, ord("Q"), b"SELECT 1\x00")
    with pytest.raises(ValueError):
        m.decode(m.FRONTEND, ord("Z"), b"I")
    with pytest.raises(ValueError):
        m.decode(m.FRONTEND, 0, b"")


def _mutate(rng: random.Random, body: bytes) -> bytes:
    """One random corruption: truncate, flip, overwrite with extremes, insert or delete."""
    data = bytearray(body)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(5)
        if op == 0 and data:
            del data[rng.randrange(len(data)) :]
        elif op == 1 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif op == 2 and data:
            at = rng.randrange(len(data))
            data[at : at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00" * 4])
        elif op == 3:
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 4))
        elif data:
            at = rng.randrange(len(data))
            del data[at : at + rng.randint(1, 4)]
    return bytes(data)


def test_fuzz_mutated_bodies_raise_only_value_error() -> None:
    """Corrupted bodies of valid messages decode or raise ValueError, nothing else."""
    rng = random.Random(20240611)
    seeds = [(_table(msg), msg.encode()) for msg in ALL_MESSAGES]
    raised = 0
    for _ in range(4000):
        table, wire = rng.choice(seeds)
        body = _mutate(rng, wire[5:])
        try:
            m.decode(table, wire[0], body)
        except ValueError:
            raised += 1
    assert raised > 1000  # the mutations do hit the error paths


def test_fuzz_random_bodies_raise_only_value_error() -> None:
    """Random bodies for every type byte decode or raise ValueError, nothing else."""
    rng = random.Random(7)
    for _ in range(3000):
        table = rng.choice([m.FRONTEND, m.BACKEND])
        mtype = rng.choice(list(table))
        with contextlib.suppress(ValueError):
            m.decode(table, mtype, rng.randbytes(rng.randint(0, 24)))
