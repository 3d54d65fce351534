"""Protocol-3 messages, one small frozen class each, named as in the PostgreSQL docs.

A message is decoded by direction and type byte together ('D' is Describe from the client
and DataRow from the server). Decoding is on demand: the relay forwards original bytes and
builds these objects only for the messages it must read or write itself. Text is decoded
with surrogateescape so that any client_encoding round-trips byte for byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar

__all__ = [
    "BACKEND",
    "FRONTEND",
    "AuthenticationRequest",
    "BackendKeyData",
    "Bind",
    "BindComplete",
    "Close",
    "CloseComplete",
    "CommandComplete",
    "CopyBothResponse",
    "CopyData",
    "CopyDone",
    "CopyFail",
    "CopyInResponse",
    "CopyOutResponse",
    "DataRow",
    "Describe",
    "EmptyQueryResponse",
    "ErrorResponse",
    "Execute",
    "Flush",
    "FunctionCall",
    "FunctionCallResponse",
    "NegotiateProtocolVersion",
    "NoData",
    "NoticeResponse",
    "NotificationResponse",
    "ParameterDescription",
    "ParameterStatus",
    "Parse",
    "ParseComplete",
    "PasswordMessage",
    "PortalSuspended",
    "Query",
    "ReadyForQuery",
    "RowDescription",
    "Sync",
    "Terminate",
    "decode",
    "frame",
]

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")


def frame(mtype: bytes, payload: bytes | memoryview = b"") -> bytes:
    """A complete message: type byte, length (self-inclusive), payload."""
    return mtype + _I32.pack(len(payload) + 4) + payload


def _text(raw: bytes | memoryview) -> str:
    return bytes(raw).decode("utf-8", "surrogateescape")


def _cstr(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape") + b"\0"


class _Reader:
    """Sequential reads over one message body; raises ValueError when it runs short."""

    __slots__ = ("buf", "pos")

    def __init__(self, body: bytes | memoryview) -> None:
        self.buf = bytes(body)
        self.pos = 0

    def _fixed(self, layout: struct.Struct) -> int:
        # checked here: unpack_from on a short buffer raises struct.error, not ValueError
        if self.pos + layout.size > len(self.buf):
            raise ValueError("message too short")
        value = layout.unpack_from(self.buf, self.pos)[0]
        self.pos += layout.size
        return value

    def int16(self) -> int:
        return self._fixed(_I16)

    def int32(self) -> int:
        return self._fixed(_I32)

    def uint32(self) -> int:
        return self._fixed(_U32)

    def byte(self) -> bytes:
        if self.pos >= len(self.buf):
            raise ValueError("message too short")
        value = self.buf[self.pos : self.pos + 1]
        self.pos += 1
        return value

    def cstr(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise ValueError("unterminated string")
        value = _text(self.buf[self.pos : end])
        self.pos = end + 1
        return value

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError("message too short")
        value = self.buf[self.pos : self.pos + n]
        self.pos += n
        return value

    def rest(self) -> bytes:
        value = self.buf[self.pos :]
        self.pos = len(self.buf)
        return value

    def values(self, count: int) -> tuple[bytes | None, ...]:
        """`count` length-prefixed values, -1 meaning NULL."""
        out: list[bytes | None] = []
        for _ in range(count):
            n = self.int32()
            out.append(None if n == -1 else self.take(n))
        return tuple(out)


def _pack_values(values: tuple[bytes | None, ...]) -> bytes:
    parts = [_I16.pack(len(values))]
    for v in values:
        parts.append(_I32.pack(-1) if v is None else _I32.pack(len(v)) + v)
    return b"".join(parts)


def _pack_int16s(values: tuple[int, ...]) -> bytes:
    return _I16.pack(len(values)) + b"".join(_I16.pack(v) for v in values)


class _Message:
    TYPE: ClassVar[bytes]

    @classmethod
    def decode(cls, body: bytes | memoryview) -> _Message:
        raise ValueError(f"{cls.__name__} cannot be decoded")

    def payload(self) -> bytes:
        return b""

    def encode(self) -> bytes:
        return frame(self.TYPE, self.payload())


class _Empty(_Message):
    """A message with no payload: equal to any other of its kind."""

    @classmethod
    def decode(cls, body: bytes | memoryview) -> _Message:
        if len(body):
            raise ValueError(f"{cls.__name__} carries no payload")
        return cls()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---------------------------------------------------------------------------- frontend


@dataclass(frozen=True, slots=True)
class Query(_Message):
    """Simple query: one string that may hold several statements."""

    TYPE: ClassVar[bytes] = b"Q"
    sql: str

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Query:
        r = _Reader(body)
        return cls(r.cstr())

    def payload(self) -> bytes:
        return _cstr(self.sql)


@dataclass(frozen=True, slots=True)
class Parse(_Message):
    TYPE: ClassVar[bytes] = b"P"
    name: str
    sql: str
    param_types: tuple[int, ...] = ()

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Parse:
        r = _Reader(body)
        name, sql = r.cstr(), r.cstr()
        types = tuple(r.uint32() for _ in range(r.int16()))
        return cls(name, sql, types)

    def payload(self) -> bytes:
        types = b"".join(_U32.pack(t) for t in self.param_types)
        return _cstr(self.name) + _cstr(self.sql) + _I16.pack(len(self.param_types)) + types


@dataclass(frozen=True, slots=True)
class Bind(_Message):
    TYPE: ClassVar[bytes] = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Bind:
        r = _Reader(body)
        portal, statement = r.cstr(), r.cstr()
        formats = tuple(r.int16() for _ in range(r.int16()))
        params = r.values(r.int16())
        results = tuple(r.int16() for _ in range(r.int16()))
        return cls(portal, statement, formats, params, results)

    def payload(self) -> bytes:
        return (
            _cstr(self.portal)
            + _cstr(self.statement)
            + _pack_int16s(self.param_formats)
            + _pack_values(self.params)
            + _pack_int16s(self.result_formats)
        )

    def param_format(self, index: int) -> int:
        """The format code of parameter `index` (one code applies to all; none means text)."""
        if not self.param_formats:
            return 0
        if len(self.param_formats) == 1:
            return self.param_formats[0]
        return self.param_formats[index]


@dataclass(frozen=True, slots=True)
class Describe(_Message):
    """Describe a prepared statement (kind b'S') or portal (b'P')."""

    TYPE: ClassVar[bytes] = b"D"
    kind: bytes
    name: str

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Describe:
        r = _Reader(body)
        return cls(r.byte(), r.cstr())

    def payload(self) -> bytes:
        return self.kind + _cstr(self.name)


@dataclass(frozen=True, slots=True)
class Close(_Message):
    """Close a prepared statement (kind b'S') or portal (b'P')."""

    TYPE: ClassVar[bytes] = b"C"
    kind: bytes
    name: str

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Close:
        r = _Reader(body)
        return cls(r.byte(), r.cstr())

    def payload(self) -> bytes:
        return self.kind + _cstr(self.name)


@dataclass(frozen=True, slots=True)
class Execute(_Message):
    TYPE: ClassVar[bytes] = b"E"
    portal: str
    max_rows: int = 0

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Execute:
        r = _Reader(body)
        return cls(r.cstr(), r.int32())

    def payload(self) -> bytes:
        return _cstr(self.portal) + _I32.pack(self.max_rows)


class Sync(_Empty):
    TYPE: ClassVar[bytes] = b"S"


class Flush(_Empty):
    TYPE: ClassVar[bytes] = b"H"


class Terminate(_Empty):
    TYPE: ClassVar[bytes] = b"X"


@dataclass(frozen=True, slots=True)
class FunctionCall(_Message):
    TYPE: ClassVar[bytes] = b"F"
    function_oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = ()
    result_format: int = 0

    @classmethod
    def decode(cls, body: bytes | memoryview) -> FunctionCall:
        r = _Reader(body)
        oid = r.uint32()
        formats = tuple(r.int16() for _ in range(r.int16()))
        args = r.values(r.int16())
        return cls(oid, formats, args, r.int16())

    def payload(self) -> bytes:
        return (
            _U32.pack(self.function_oid)
            + _pack_int16s(self.arg_formats)
            + _pack_values(self.args)
            + _I16.pack(self.result_format)
        )


@dataclass(frozen=True, slots=True)
class CopyData(_Message):
    """COPY payload; the same type byte in both directions."""

    TYPE: ClassVar[bytes] = b"d"
    data: bytes

    @classmethod
    def decode(cls, body: bytes | memoryview) -> CopyData:
        return cls(bytes(body))

    def payload(self) -> bytes:
        return self.data


class CopyDone(_Empty):
    TYPE: ClassVar[bytes] = b"c"


@dataclass(frozen=True, slots=True)
class CopyFail(_Message):
    TYPE: ClassVar[bytes] = b"f"
    message: str

    @classmethod
    def decode(cls, body: bytes | memoryview) -> CopyFail:
        return cls(_Reader(body).cstr())

    def payload(self) -> bytes:
        return _cstr(self.message)


@dataclass(frozen=True, slots=True)
class PasswordMessage(_Message):
    """PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse share b'p'.

    Only the authentication exchange gives them meaning; the proxy relays them untouched
    and never decodes their contents (they carry secrets).
    """

    TYPE: ClassVar[bytes] = b"p"
    data: bytes = field(repr=False)

    @classmethod
    def decode(cls, body: bytes | memoryview) -> PasswordMessage:
        return cls(bytes(body))

    def payload(self) -> bytes:
        return self.data


# ----------------------------------------------------------------------------- backend

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


@dataclass(frozen=True, slots=True)
class AuthenticationRequest(_Message):
    """Every Authentication* message: a code and the code's own data.

    For AuthenticationSASL (code 10) `mechanisms` lists the offered mechanisms.
    """

    TYPE: ClassVar[bytes] = b"R"
    code: int
    data: bytes = b""

    @classmethod
    def decode(cls, body: bytes | memoryview) -> AuthenticationRequest:
        r = _Reader(body)
        return cls(r.int32(), r.rest())

    def payload(self) -> bytes:
        return _I32.pack(self.code) + self.data

    @property
    def mechanisms(self) -> tuple[str, ...]:
        if self.code != AUTH_SASL:
            return ()
        return tuple(_text(m) for m in self.data.split(b"\0") if m)

    @classmethod
    def sasl(cls, mechanisms: tuple[str, ...]) -> AuthenticationRequest:
        return cls(AUTH_SASL, b"".join(_cstr(m) for m in mechanisms) + b"\0")


@dataclass(frozen=True, slots=True)
class BackendKeyData(_Message):
    TYPE: ClassVar[bytes] = b"K"
    process_id: int
    secret_key: bytes  # 4 bytes in protocol 3.0, up to 256 in 3.2

    @classmethod
    def decode(cls, body: bytes | memoryview) -> BackendKeyData:
        r = _Reader(body)
        pid = r.int32()
        key = r.rest()
        if not key:
            raise ValueError("BackendKeyData without a key")
        return cls(pid, key)

    def payload(self) -> bytes:
        return _I32.pack(self.process_id) + self.secret_key


class ParseComplete(_Empty):
    TYPE: ClassVar[bytes] = b"1"


class BindComplete(_Empty):
    TYPE: ClassVar[bytes] = b"2"


class CloseComplete(_Empty):
    TYPE: ClassVar[bytes] = b"3"


class NoData(_Empty):
    TYPE: ClassVar[bytes] = b"n"


class PortalSuspended(_Empty):
    TYPE: ClassVar[bytes] = b"s"


class EmptyQueryResponse(_Empty):
    TYPE: ClassVar[bytes] = b"I"


@dataclass(frozen=True, slots=True)
class CommandComplete(_Message):
    TYPE: ClassVar[bytes] = b"C"
    tag: str

    @classmethod
    def decode(cls, body: bytes | memoryview) -> CommandComplete:
        return cls(_Reader(body).cstr())

    def payload(self) -> bytes:
        return _cstr(self.tag)

    @property
    def command(self) -> str:
        return self.tag.split(" ", 1)[0]

    @property
    def rows(self) -> int | None:
        """Rows affected or returned, when the tag carries a count."""
        last = self.tag.rsplit(" ", 1)[-1]
        return int(last) if last.isascii() and last.isdigit() and " " in self.tag else None


@dataclass(frozen=True, slots=True)
class _CopyResponse(_Message):
    overall_format: int
    column_formats: tuple[int, ...]

    @classmethod
    def decode(cls, body: bytes | memoryview) -> _CopyResponse:
        r = _Reader(body)
        overall = r.take(1)[0]
        return cls(overall, tuple(r.int16() for _ in range(r.int16())))

    def payload(self) -> bytes:
        return bytes([self.overall_format]) + _pack_int16s(self.column_formats)


@dataclass(frozen=True, slots=True)
class CopyInResponse(_CopyResponse):
    TYPE: ClassVar[bytes] = b"G"


@dataclass(frozen=True, slots=True)
class CopyOutResponse(_CopyResponse):
    TYPE: ClassVar[bytes] = b"H"


@dataclass(frozen=True, slots=True)
class CopyBothResponse(_CopyResponse):
    TYPE: ClassVar[bytes] = b"W"


@dataclass(frozen=True, slots=True)
class DataRow(_Message):
    TYPE: ClassVar[bytes] = b"D"
    values: tuple[bytes | None, ...]

    @classmethod
    def decode(cls, body: bytes | memoryview) -> DataRow:
        r = _Reader(body)
        return cls(r.values(r.int16()))

    def payload(self) -> bytes:
        return _pack_values(self.values)


@dataclass(frozen=True, slots=True)
class _Fields(_Message):
    """ErrorResponse and NoticeResponse: field code -> value, e.g. 'C' is the SQLSTATE."""

    fields: dict[str, str]

    @classmethod
    def decode(cls, body: bytes | memoryview) -> _Fields:
        r = _Reader(body)
        fields: dict[str, str] = {}
        while (code := r.byte()) != b"\0":
            fields[code.decode("ascii", "replace")] = r.cstr()
        return cls(fields)

    def payload(self) -> bytes:
        return b"".join(k.encode("ascii") + _cstr(v) for k, v in self.fields.items()) + b"\0"

    @classmethod
    def build(
        cls, severity: str, sqlstate: str, message: str, *, detail: str | None = None
    ) -> _Fields:
        fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
        if detail:
            fields["D"] = detail
        return cls(fields)

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def severity(self) -> str:
        return self.fields.get("V") or self.fields.get("S", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Fields):
    TYPE: ClassVar[bytes] = b"E"


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Fields):
    TYPE: ClassVar[bytes] = b"N"


@dataclass(frozen=True, slots=True)
class FunctionCallResponse(_Message):
    TYPE: ClassVar[bytes] = b"V"
    result: bytes | None

    @classmethod
    def decode(cls, body: bytes | memoryview) -> FunctionCallResponse:
        return cls(_Reader(body).values(1)[0])

    def payload(self) -> bytes:
        return _pack_values((self.result,))[2:]


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion(_Message):
    TYPE: ClassVar[bytes] = b"v"
    newest_minor: int
    unrecognized: tuple[str, ...] = ()

    @classmethod
    def decode(cls, body: bytes | memoryview) -> NegotiateProtocolVersion:
        r = _Reader(body)
        minor = r.int32()
        return cls(minor, tuple(r.cstr() for _ in range(r.int32())))

    def payload(self) -> bytes:
        names = b"".join(_cstr(n) for n in self.unrecognized)
        return _I32.pack(self.newest_minor) + _I32.pack(len(self.unrecognized)) + names


@dataclass(frozen=True, slots=True)
class NotificationResponse(_Message):
    TYPE: ClassVar[bytes] = b"A"
    process_id: int
    channel: str
    payload_text: str

    @classmethod
    def decode(cls, body: bytes | memoryview) -> NotificationResponse:
        r = _Reader(body)
        return cls(r.int32(), r.cstr(), r.cstr())

    def payload(self) -> bytes:
        return _I32.pack(self.process_id) + _cstr(self.channel) + _cstr(self.payload_text)


@dataclass(frozen=True, slots=True)
class ParameterDescription(_Message):
    TYPE: ClassVar[bytes] = b"t"
    type_oids: tuple[int, ...]

    @classmethod
    def decode(cls, body: bytes | memoryview) -> ParameterDescription:
        r = _Reader(body)
        return cls(tuple(r.uint32() for _ in range(r.int16())))

    def payload(self) -> bytes:
        return _I16.pack(len(self.type_oids)) + b"".join(_U32.pack(t) for t in self.type_oids)


@dataclass(frozen=True, slots=True)
class ParameterStatus(_Message):
    TYPE: ClassVar[bytes] = b"S"
    name: str
    value: str

    @classmethod
    def decode(cls, body: bytes | memoryview) -> ParameterStatus:
        r = _Reader(body)
        return cls(r.cstr(), r.cstr())

    def payload(self) -> bytes:
        return _cstr(self.name) + _cstr(self.value)


@dataclass(frozen=True, slots=True)
class ReadyForQuery(_Message):
    """Status b'I' idle, b'T' in a transaction, b'E' in a failed transaction."""

    TYPE: ClassVar[bytes] = b"Z"
    status: bytes

    @classmethod
    def decode(cls, body: bytes | memoryview) -> ReadyForQuery:
        r = _Reader(body)
        status = r.byte()
        if status not in (b"I", b"T", b"E"):
            raise ValueError(f"unknown transaction status {status!r}")
        return cls(status)

    def payload(self) -> bytes:
        return self.status


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    table_oid: int
    column_number: int
    type_oid: int
    type_size: int
    type_modifier: int
    format: int


_COLUMN = struct.Struct("!IhIhih")


@dataclass(frozen=True, slots=True)
class RowDescription(_Message):
    TYPE: ClassVar[bytes] = b"T"
    columns: tuple[Column, ...]

    @classmethod
    def decode(cls, body: bytes | memoryview) -> RowDescription:
        r = _Reader(body)
        columns = []
        for _ in range(r.int16()):
            name = r.cstr()
            fields = _COLUMN.unpack(r.take(_COLUMN.size))
            columns.append(Column(name, *fields))
        return cls(tuple(columns))

    def payload(self) -> bytes:
        parts = [_I16.pack(len(self.columns))]
        for c in self.columns:
            parts.append(
                _cstr(c.name)
                + _COLUMN.pack(
                    c.table_oid,
                    c.column_number,
                    c.type_oid,
                    c.type_size,
                    c.type_modifier,
                    c.format,
                )
            )
        return b"".join(parts)


_FRONTEND_TYPES: tuple[type[_Message], ...] = (
    Query,
    Parse,
    Bind,
    Describe,
    Close,
    Execute,
    Sync,
    Flush,
    Terminate,
    FunctionCall,
    CopyData,
    CopyDone,
    CopyFail,
    PasswordMessage,
)
_BACKEND_TYPES: tuple[type[_Message], ...] = (
    AuthenticationRequest,
    BackendKeyData,
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    PortalSuspended,
    EmptyQueryResponse,
    CommandComplete,
    CopyInResponse,
    CopyOutResponse,
    CopyBothResponse,
    CopyData,
    CopyDone,
    DataRow,
    ErrorResponse,
    NoticeResponse,
    FunctionCallResponse,
    NegotiateProtocolVersion,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    ReadyForQuery,
    RowDescription,
)

FRONTEND: dict[int, type[_Message]] = {cls.TYPE[0]: cls for cls in _FRONTEND_TYPES}
BACKEND: dict[int, type[_Message]] = {cls.TYPE[0]: cls for cls in _BACKEND_TYPES}


def decode(table: dict[int, type[_Message]], mtype: int, body: bytes | memoryview) -> _Message:
    """Decodes one framed message of the direction `table` names (FRONTEND or BACKEND)."""
    cls = table.get(mtype)
    if cls is None:
        raise ValueError(f"unknown message type {chr(mtype)!r}")
    return cls.decode(body)
