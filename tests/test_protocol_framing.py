"""FrameDecoder: the same frames whatever the chunking, bounded memory, strict lengths."""

from __future__ import annotations

import itertools
import random
import struct
import tracemalloc
from collections.abc import Iterable, Sequence

import pytest

from proxy.protocol.framing import (
    BODY,
    MAX_MESSAGE_LENGTH,
    SKIP,
    TYPE_ONLY,
    FrameDecoder,
    ProtocolViolation,
    interest_table,
)

Frame = tuple[int, bytes | None]


def msg(mtype: bytes, payload: bytes = b"") -> bytes:
    """A typed message built by hand: type byte, Int32 length counting itself, payload."""
    return mtype + struct.pack("!I", len(payload) + 4) + payload


def _cstr(s: str) -> bytes:
    return s.encode() + b"\x00"


def _column(name: str, type_oid: int) -> bytes:
    return _cstr(name) + struct.pack("!IhIhih", 16384, 1, type_oid, -1, -1, 0)


def _row(*values: bytes | None) -> bytes:
    out = struct.pack("!h", len(values))
    for v in values:
        out += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return out


# What a server sends from AuthenticationOk to the end of a first query.
SERVER_MESSAGES: list[tuple[bytes, bytes]] = [
    (b"R", struct.pack("!i", 0)),
    (b"S", _cstr("server_version") + _cstr("16.3")),
    (b"S", _cstr("client_encoding") + _cstr("UTF8")),
    (b"S", _cstr("TimeZone") + _cstr("UTC")),
    (b"K", struct.pack("!i", 4242) + b"\x0a\x0b\x0c\x0d"),
    (b"Z", b"I"),
    (b"1", b""),
    (b"2", b""),
    (b"T", struct.pack("!h", 2) + _column("id", 23) + _column("name", 25)),
    (b"D", _row(b"1", b"alice")),
    (b"D", _row(b"2", None)),
    (b"D", _row(b"3", b"x" * 300)),
    (b"C", _cstr("SELECT 3")),
    (b"Z", b"I"),
]
SERVER_STREAM = b"".join(msg(t, p) for t, p in SERVER_MESSAGES)

# A client pipeline with zero-length messages (Sync, Flush) between others.
CLIENT_MESSAGES: list[tuple[bytes, bytes]] = [
    (b"S", b""),
    (b"P", _cstr("") + _cstr("SELECT $1") + b"\x00\x00"),
    (b"H", b""),
    (b"S", b""),
    (b"Q", _cstr("SELECT 1")),
    (b"S", b""),
    (b"X", b""),
]
CLIENT_STREAM = b"".join(msg(t, p) for t, p in CLIENT_MESSAGES)


def expected_frames(
    messages: Iterable[tuple[bytes, bytes]], interest: bytes, limit: int
) -> list[Frame]:
    """The frames the decoder must report, worked out from the interest table alone."""
    out: list[Frame] = []
    for mtype, payload in messages:
        want = interest[mtype[0]]
        if want == BODY and len(payload) <= limit:
            out.append((mtype[0], payload))
        elif want != SKIP:
            out.append((mtype[0], None))
    return out


def feed_all(decoder: FrameDecoder, chunks: Iterable[bytes]) -> list[Frame]:
    """Feeds chunks in turn, copying each body before the next feed invalidates it."""
    out: list[Frame] = []
    for chunk in chunks:
        out.extend((t, None if b is None else bytes(b)) for t, b in decoder.feed(chunk))
    return out


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def random_cuts(rng: random.Random, size: int) -> list[int]:
    return rng.sample(range(1, size), rng.randint(1, min(40, size - 1)))


def _boundaries(messages: Sequence[tuple[bytes, bytes]]) -> list[int]:
    ends = [0]
    for _, payload in messages:
        ends.append(ends[-1] + 5 + len(payload))
    return ends


def _expected_held(
    messages: Sequence[tuple[bytes, bytes]], stream: bytes, offset: int, interest: bytes, limit: int
) -> bytes:
    """What held must be after `offset` bytes: the partial header or inspected message."""
    ends = _boundaries(messages)
    for (mtype, payload), start, end in zip(messages, ends, ends[1:], strict=False):
        if start < offset < end:
            inspected = interest[mtype[0]] == BODY and len(payload) <= limit
            return stream[start:offset] if offset - start < 5 or inspected else b""
    return b""


SERVER_INTEREST = interest_table(type_only=b"D", body=b"RKZTC12")
CLIENT_INTEREST = interest_table(type_only=b"XH", body=b"SPQ")


def test_interest_table() -> None:
    """256 entries, each SKIP, TYPE_ONLY or BODY as asked."""
    table = interest_table(type_only=b"QX", body=b"Z")
    assert len(table) == 256
    assert table[ord("Q")] == table[ord("X")] == TYPE_ONLY
    assert table[ord("Z")] == BODY
    assert sum(1 for v in table if v == SKIP) == 253


@pytest.mark.parametrize("limit", [1 << 20, 10, 0])
def test_whole_stream(limit: int) -> None:
    """Fed whole: every message in order; SKIP types absent, TYPE_ONLY and oversized None."""
    decoder = FrameDecoder(SERVER_INTEREST, inspect_limit=limit)
    frames = feed_all(decoder, [SERVER_STREAM])
    assert frames == expected_frames(SERVER_MESSAGES, SERVER_INTEREST, limit)
    assert ord("S") not in [t for t, _ in frames]
    assert all(b is None for t, b in frames if t == ord("D"))
    assert decoder.at_boundary
    assert decoder.held == b""


def test_whole_stream_exact_frames() -> None:
    """A hand-checked list, so the expectation helper cannot hide a shared mistake."""
    frames = feed_all(FrameDecoder(SERVER_INTEREST, inspect_limit=20), [SERVER_STREAM])
    assert frames == [
        (ord("R"), b"\x00\x00\x00\x00"),
        (ord("K"), b"\x00\x00\x10\x92\x0a\x0b\x0c\x0d"),
        (ord("Z"), b"I"),
        (ord("1"), b""),
        (ord("2"), b""),
        (ord("T"), None),  # 53 bytes, over the limit of 20
        (ord("D"), None),
        (ord("D"), None),
        (ord("D"), None),
        (ord("C"), b"SELECT 3\x00"),
        (ord("Z"), b"I"),
    ]


def test_many_messages_in_one_chunk_are_views_of_it() -> None:
    """A thousand messages in one chunk come out in order, bodies sliced from the chunk."""
    chunk = b"".join(msg(b"D", _row(str(i).encode())) for i in range(1000))
    frames = FrameDecoder(interest_table(body=b"D")).feed(chunk)
    assert len(frames) == 1000
    assert [bytes(b) for _, b in frames] == [_row(str(i).encode()) for i in range(1000)]
    assert all(isinstance(b, memoryview) and b.obj is chunk for _, b in frames)


@pytest.mark.parametrize(
    ("messages", "interest", "limit"),
    [
        (SERVER_MESSAGES, SERVER_INTEREST, 1 << 20),
        (SERVER_MESSAGES, SERVER_INTEREST, 8),
        (CLIENT_MESSAGES, CLIENT_INTEREST, 1 << 20),
        (CLIENT_MESSAGES, interest_table(type_only=b"SPQXH"), 1 << 20),
        (CLIENT_MESSAGES, interest_table(body=b"Q"), 1 << 20),  # Sync skipped
    ],
    ids=["server", "server-small-limit", "client", "client-type-only", "client-skip-sync"],
)
def test_split_at_every_offset(
    messages: list[tuple[bytes, bytes]], interest: bytes, limit: int
) -> None:
    """Cut in two at every offset: the same frames as fed whole."""
    stream = b"".join(msg(t, p) for t, p in messages)
    expected = expected_frames(messages, interest, limit)
    for cut in range(1, len(stream)):
        decoder = FrameDecoder(interest, inspect_limit=limit)
        assert feed_all(decoder, split_at(stream, [cut])) == expected, cut
        assert decoder.at_boundary


@pytest.mark.parametrize(
    ("messages", "interest", "limit"),
    [
        (SERVER_MESSAGES, SERVER_INTEREST, 1 << 20),
        (SERVER_MESSAGES, SERVER_INTEREST, 8),
        (CLIENT_MESSAGES, CLIENT_INTEREST, 1 << 20),
        (CLIENT_MESSAGES, interest_table(body=b"Q"), 1 << 20),
    ],
    ids=["server", "server-small-limit", "client", "client-skip-sync"],
)
def test_one_byte_at_a_time(
    messages: list[tuple[bytes, bytes]], interest: bytes, limit: int
) -> None:
    """Byte by byte: same frames; at_boundary and held exact after every byte."""
    stream = b"".join(msg(t, p) for t, p in messages)
    ends = set(_boundaries(messages))
    decoder = FrameDecoder(interest, inspect_limit=limit)
    frames: list[Frame] = []
    for offset in range(1, len(stream) + 1):
        frames += feed_all(decoder, [stream[offset - 1 : offset]])
        assert decoder.at_boundary == (offset in ends), offset
        assert decoder.held == _expected_held(messages, stream, offset, interest, limit), offset
    assert frames == expected_frames(messages, interest, limit)


def test_random_chunkings() -> None:
    """Hundreds of seeded random chunkings of the server stream give the same frames."""
    rng = random.Random(5432)
    for limit in (1 << 20, 8):
        expected = expected_frames(SERVER_MESSAGES, SERVER_INTEREST, limit)
        for _ in range(200):
            chunks = split_at(SERVER_STREAM, random_cuts(rng, len(SERVER_STREAM)))
            decoder = FrameDecoder(SERVER_INTEREST, inspect_limit=limit)
            assert feed_all(decoder, chunks) == expected
            assert decoder.at_boundary


def test_random_streams_random_chunkings() -> None:
    """Random messages, interest tables and limits: chunking never changes the frames."""
    rng = random.Random(99)
    for _ in range(300):
        messages = [
            (bytes([rng.randrange(256)]), rng.randbytes(rng.choice([0, 0, 1, 3, 7, 40, 300])))
            for _ in range(rng.randint(1, 12))
        ]
        stream = b"".join(msg(t, p) for t, p in messages)
        interest = bytes(rng.randrange(3) for _ in range(256))
        limit = rng.choice([0, 1, 5, 64, 1 << 20])
        expected = expected_frames(messages, interest, limit)
        assert feed_all(FrameDecoder(interest, inspect_limit=limit), [stream]) == expected
        if len(stream) > 1:
            chunks = split_at(stream, random_cuts(rng, len(stream)))
            decoder = FrameDecoder(interest, inspect_limit=limit)
            assert feed_all(decoder, chunks) == expected
            assert decoder.at_boundary


def test_feed_accepts_bytearray_and_memoryview() -> None:
    """Chunks may be bytes, bytearray or memoryview."""
    expected = expected_frames(SERVER_MESSAGES, SERVER_INTEREST, 1 << 20)
    for kind in (bytearray, memoryview):
        decoder = FrameDecoder(SERVER_INTEREST)
        chunks = [kind(c) for c in split_at(SERVER_STREAM, [3, 50, 51, 200])]
        assert feed_all(decoder, chunks) == expected


def test_empty_chunk_changes_nothing() -> None:
    """An empty chunk yields no frames and keeps the partial state."""
    decoder = FrameDecoder(SERVER_INTEREST)
    assert decoder.feed(SERVER_STREAM[:3]) == []
    assert decoder.feed(b"") == []
    assert decoder.held == SERVER_STREAM[:3]
    assert feed_all(decoder, [SERVER_STREAM[3:]]) == expected_frames(
        SERVER_MESSAGES, SERVER_INTEREST, 1 << 20
    )


def test_zero_length_body_across_splits() -> None:
    """Sync (length 4, no body) split anywhere in its header is reported once, body b''."""
    sync = msg(b"S")
    assert sync == b"S\x00\x00\x00\x04"
    for cut in range(1, 5):
        for want, body in (
            (interest_table(body=b"S"), b""),
            (interest_table(type_only=b"S"), None),
        ):
            decoder = FrameDecoder(want)
            assert feed_all(decoder, [sync[:cut]]) == []
            assert not decoder.at_boundary
            assert feed_all(decoder, [sync[cut:]]) == [(ord("S"), body)]
            assert decoder.at_boundary
            assert decoder.held == b""


def test_oversized_message_reported_at_header_and_not_buffered() -> None:
    """A 10 MB DataRow fed in 64 KB chunks with inspect_limit 1024: held stays tiny."""
    big_value = b"x" * (10 * 1024 * 1024)
    # a skipped CopyData sized so the DataRow header straddles the first chunk boundary
    prefix = msg(b"d", b"\x00" * (65536 - 3 - 5))
    stream = prefix + msg(b"D", _row(big_value)) + msg(b"Z", b"I")
    view = memoryview(stream)
    decoder = FrameDecoder(interest_table(body=b"DZ"), inspect_limit=1024)
    frames: list[Frame] = []
    max_held = 0
    tracemalloc.start()
    try:
        for start in range(0, len(stream), 65536):
            frames += feed_all(decoder, [view[start : start + 65536]])
            max_held = max(max_held, len(decoder.held))
            assert not decoder.at_boundary or start + 65536 >= len(stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert frames == [(ord("D"), None), (ord("Z"), b"I")]
    assert max_held <= 1024 + 5
    assert peak < 256 * 1024  # nothing like the 10 MB body was copied
    assert decoder.at_boundary


def test_inspect_limit_boundary() -> None:
    """A body of exactly inspect_limit bytes is inspected; one more byte is not."""
    for limit in (0, 1, 100):
        fits, over = msg(b"Q", b"a" * limit), msg(b"Q", b"a" * (limit + 1))
        decoder = FrameDecoder(interest_table(body=b"Q"), inspect_limit=limit)
        assert feed_all(decoder, [fits + over]) == [(ord("Q"), b"a" * limit), (ord("Q"), None)]
        decoder = FrameDecoder(interest_table(body=b"Q"), inspect_limit=limit)
        chunks = [fits[:3], fits[3:], over[:6], over[6:]]
        assert feed_all(decoder, chunks) == [(ord("Q"), b"a" * limit), (ord("Q"), None)]


def test_buffered_message_split_many_times_keeps_held_bounded() -> None:
    """An inspected message arriving in pieces is held until complete, then released."""
    body = b"q" * 1000
    wire = msg(b"Q", body)
    decoder = FrameDecoder(interest_table(body=b"Q"), inspect_limit=1000)
    for i in range(0, len(wire) - 1, 7):
        assert decoder.feed(wire[i : min(i + 7, len(wire) - 1)]) == []
        assert decoder.held == wire[: min(i + 7, len(wire) - 1)]
    assert feed_all(decoder, [wire[-1:]]) == [(ord("Q"), body)]
    assert decoder.held == b""


# ---------------------------------------------------------------------- bad lengths

BAD_HEADERS = [b"Q" + struct.pack("!I", n) for n in (0, 1, 2, 3)] + [
    b"Q" + struct.pack("!I", MAX_MESSAGE_LENGTH + 1),
    b"Q\xff\xff\xff\xff",  # -1 as a signed length
]


@pytest.mark.parametrize("header", BAD_HEADERS, ids=lambda h: h[1:].hex())
def test_invalid_length_raises(header: bytes) -> None:
    """Lengths under 4 or over max_length are a protocol violation, whatever the interest."""
    for interest in (interest_table(), interest_table(type_only=b"Q"), interest_table(body=b"Q")):
        with pytest.raises(ProtocolViolation):
            FrameDecoder(interest).feed(header + b"rest")
        with pytest.raises(ProtocolViolation):
            FrameDecoder(interest).feed(msg(b"S") + header)


@pytest.mark.parametrize("header", BAD_HEADERS, ids=lambda h: h[1:].hex())
def test_invalid_length_split_across_chunks(header: bytes) -> None:
    """A bad header split anywhere raises at the chunk completing it, not before."""
    for interest in (interest_table(), interest_table(body=b"Q")):
        for cut in range(1, 5):
            decoder = FrameDecoder(interest)
            assert feed_all(decoder, [msg(b"S"), header[:cut]]) == []
            with pytest.raises(ProtocolViolation):
                decoder.feed(header[cut:])
        decoder = FrameDecoder(interest)
        rest = msg(b"Q", b"abc")[6:] + header  # after a message split mid-body
        decoder.feed(msg(b"Q", b"abc")[:6])
        for i in range(len(rest) - 1):
            decoder.feed(rest[i : i + 1])
        with pytest.raises(ProtocolViolation):
            decoder.feed(rest[-1:])


def test_custom_max_length() -> None:
    """max_length itself is accepted, one more is refused, including when split."""
    ok = b"Q" + struct.pack("!I", 100) + b"a" * 96
    frames = feed_all(FrameDecoder(interest_table(body=b"Q"), max_length=100), [ok])
    assert frames == [(ord("Q"), b"a" * 96)]
    bad = b"Q" + struct.pack("!I", 101) + b"a" * 97
    with pytest.raises(ProtocolViolation):
        FrameDecoder(interest_table(), max_length=100).feed(bad)
    decoder = FrameDecoder(interest_table(), max_length=100)
    decoder.feed(bad[:2])
    with pytest.raises(ProtocolViolation):
        decoder.feed(bad[2:])


def test_fuzz_random_bytes_raise_only_protocol_violation() -> None:
    """Random streams in random chunks: frames or ProtocolViolation, nothing else."""
    rng = random.Random(1234)
    violations = 0
    for i in range(3000):
        if i % 2:
            data = rng.randbytes(rng.randint(0, 64))
        else:  # near-valid: plausible headers with small, sometimes invalid, lengths
            data = b"".join(
                bytes([rng.randrange(256)])
                + struct.pack("!I", rng.randint(0, 24))
                + rng.randbytes(rng.randint(0, 24))
                for _ in range(rng.randint(1, 6))
            )
        decoder = FrameDecoder(
            bytes(rng.randrange(3) for _ in range(256)),
            inspect_limit=rng.choice([0, 4, 16, 1 << 20]),
            max_length=rng.choice([16, MAX_MESSAGE_LENGTH]),
        )
        try:
            for chunk in split_at(data, random_cuts(rng, len(data)) if len(data) > 1 else []):
                for _, body in decoder.feed(chunk):
                    assert body is None or isinstance(body, memoryview)
        except ProtocolViolation:
            violations += 1
    assert violations > 500


def test_finish_completes_only_the_held_message() -> None:
    """finish() hands back the split message and where whole messages resume, no further."""
    first, second = msg(b"Q", b"select 1\x00"), msg(b"Z", b"I")
    decoder = FrameDecoder(interest_table(body=b"QZ"))
    assert decoder.feed(first[:6]) == []
    chunk = first[6:] + second
    frames, pos = decoder.finish(chunk)
    assert [(t, bytes(b)) for t, b in frames if b is not None] == [(ord("Q"), b"select 1\x00")]
    assert pos == len(first) - 6 and chunk[pos:] == second
    assert decoder.at_boundary
    assert decoder.finish(second) == ([], 0)  # nothing held: nothing to do


def test_finish_passes_over_an_uninspected_message() -> None:
    big = msg(b"D", b"x" * 100)
    decoder = FrameDecoder(interest_table(body=b"DZ"), inspect_limit=10)
    assert decoder.feed(big[:20]) == [(ord("D"), None)]
    frames, pos = decoder.finish(big[20:50])
    assert (frames, pos) == ([], 30) and not decoder.at_boundary
    frames, pos = decoder.finish(big[50:] + msg(b"Z", b"I"))
    assert (frames, pos) == ([], len(big) - 50) and decoder.at_boundary


@pytest.mark.parametrize("cut", [1, 3, 5, 9])
def test_resume_from_another_decoders_position(cut: int) -> None:
    """A decoder started where another stands frames the rest of the stream the same way."""
    stream = msg(b"S", _cstr("a") + _cstr("b")) + msg(b"Z", b"I") + msg(b"Z", b"T")
    reader = FrameDecoder(interest_table(body=b"SZ"))
    reader.feed(stream[:cut])
    follower = FrameDecoder(interest_table(body=b"SZ"))
    follower.resume(*reader.remaining())
    # a header cut short is handed over whole, so that message is read; a body is not
    first = [(ord("S"), _cstr("a") + _cstr("b"))] if cut < 5 else []
    frames = [(t, bytes(b)) for t, b in follower.feed(stream[cut:]) if b is not None]
    assert frames == [*first, (ord("Z"), b"I"), (ord("Z"), b"T")]
    assert follower.at_boundary
