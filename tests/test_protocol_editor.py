"""FlushInserter, playbook style: a pipelined client stream cut into chunks anywhere goes in,
the same stream with a Flush after each Execute not already followed by a Sync or Flush
comes out, and nothing else changes. Then MessageEditor's promise of no copy: the chunk
object itself whenever it passes as it came.

The messages are built with pgwarden's codec; the checks split the output with a framer of
their own (`split_messages`), so a framing bug in the editor cannot hide itself.
"""

from __future__ import annotations

import struct
from itertools import combinations, pairwise

from proxy.protocol import messages as m
from proxy.protocol.editor import FlushInserter, StatementEditor, flush_after_executes
from proxy.protocol.framing import FrameDecoder
from proxy.tracking.round_trips import CLIENT_INTEREST

FLUSH = b"H\x00\x00\x00\x04"
SYNC = b"S\x00\x00\x00\x04"

# Parse/Bind/Execute/Execute/Sync/Execute/Flush/Execute: Executes followed by an Execute, a
# Sync, a Flush, and nothing (the end of what was sent so far)
MESSAGES = [
    m.Parse("", "SELECT $1::int", (23,)).encode(),
    m.Bind("", "", (0,), (b"42",), ()).encode(),
    m.Execute("", 0).encode(),
    m.Execute("", 10).encode(),
    m.Sync().encode(),
    m.Execute("p", 0).encode(),
    m.Flush().encode(),
    m.Execute("q", 5).encode(),
]
STREAM = b"".join(MESSAGES)
# where a cut makes the inserter add a Flush the whole stream does not get: right after an
# Execute that a Sync (the second Execute) or a Flush (the third) follows
EARLY_FLUSH_CUTS = {sum(len(x) for x in MESSAGES[: i + 1]) for i in (3, 5)}


def split_messages(data: bytes) -> list[bytes]:
    """Whole messages, by their own headers; fails on a partial one."""
    out, pos = [], 0
    while pos < len(data):
        assert len(data) - pos >= 5, f"partial header at {pos}: {data[pos:]!r}"
        (length,) = struct.unpack_from("!I", data, pos + 1)
        end = pos + 1 + length
        assert length >= 4 and end <= len(data), f"partial message at {pos}"
        out.append(data[pos:end])
        pos = end
    return out


def feed_chunks(inserter: FlushInserter, data: bytes, cuts: tuple[int, ...]) -> bytes:
    bounds = (0, *cuts, len(data))
    return b"".join(inserter.feed(data[a:b]) for a, b in pairwise(bounds))


def check_only_flushes_added(source: list[bytes], out: list[bytes]) -> None:
    """`out` is `source` with Flush messages added, each right after an Execute, and every
    Execute in `out` is followed by a Flush or a Sync."""
    added = 0
    i = 0
    for index, message in enumerate(out):
        # of two Flushes after an Execute, the first is the added one
        doubled = message == FLUSH and out[index + 1 : index + 2] == [FLUSH]
        if i < len(source) and message == source[i] and not doubled:
            i += 1
            continue
        assert message == FLUSH, f"unexpected message {message!r} at {index}"
        assert index > 0 and out[index - 1][:1] == b"E", f"a Flush not after an Execute: {index}"
        added += 1
    assert i == len(source), "messages of the input went missing"
    for index, message in enumerate(out):
        if message[:1] == b"E":
            assert index + 1 < len(out), "the last Execute has no Flush after it"
            assert out[index + 1] in (FLUSH, SYNC), (
                f"Execute at {index} is followed by {out[index + 1]!r}"
            )
    assert added >= 1


# ------------------------------------------------------------------------------ whole


def test_whole_stream_equals_flush_after_executes() -> None:
    """Fed in one piece, the inserter gives what the one-shot function gives, and that is
    the stream with a Flush after the first Execute and the last one only."""
    out = FlushInserter().feed(STREAM)
    assert out == flush_after_executes(STREAM)
    e1, e2, sync, e3, flush, e4 = MESSAGES[2:]
    assert out == b"".join(MESSAGES[:2]) + e1 + FLUSH + e2 + sync + e3 + flush + e4 + FLUSH


def test_a_chunk_without_execute_is_returned_as_is() -> None:
    """Nothing to add: the very chunk object comes back (no copy on the common path)."""
    chunk = MESSAGES[0] + MESSAGES[1] + SYNC
    assert FlushInserter().feed(chunk) is chunk


# ----------------------------------------------------------------------- cut anywhere


def test_every_split_point() -> None:
    """Two chunks, cut at any byte: with the Flushes removed, exactly the input; only
    Flushes added, each Execute followed by one (or a Sync); a cut right after an Execute
    that a Sync or Flush follows adds one more Flush than the whole stream gets."""
    whole = split_messages(flush_after_executes(STREAM))
    for cut in range(1, len(STREAM)):
        messages = split_messages(feed_chunks(FlushInserter(), STREAM, (cut,)))
        strip = [x for x in messages if x != FLUSH]
        assert strip == [x for x in MESSAGES if x != FLUSH], cut
        check_only_flushes_added(MESSAGES, messages)
        assert len(messages) - len(whole) == (cut in EARLY_FLUSH_CUTS), cut


def test_every_pair_of_split_points() -> None:
    """Three chunks, cut at any two bytes (header halves, one-byte chunks included)."""
    whole = flush_after_executes(STREAM)
    for a, b in combinations(range(1, len(STREAM)), 2):
        out = feed_chunks(FlushInserter(), STREAM, (a, b))
        messages = split_messages(out)
        check_only_flushes_added(MESSAGES, messages)
        # a Flush more than the whole stream gets only where a cut falls right after an
        # Execute whose next message is a Sync or Flush (it was not known yet)
        extra = len(messages) - len(split_messages(whole))
        assert extra == len({a, b} & EARLY_FLUSH_CUTS), (a, b)


def test_byte_by_byte() -> None:
    """One byte a chunk: the same messages as the whole stream, with the only difference
    the Flushes of Executes whose follower was not yet known."""
    inserter = FlushInserter()
    out = b"".join(inserter.feed(STREAM[i : i + 1]) for i in range(len(STREAM)))
    e1, e2, sync, e3, flush, e4 = MESSAGES[2:]
    assert out == (
        b"".join(MESSAGES[:2]) + e1 + FLUSH + e2 + FLUSH + sync + e3 + FLUSH + flush + e4 + FLUSH
    )


# ------------------------------------------------------------------------- mid-stream


def expected_from(start: int, *, followers_unknown: bool = False) -> bytes:
    """The stream from byte `start` on, as an inserter started there (as a decoder that read
    the bytes before tells it) must pass it: a Flush after each Execute whose type byte it
    saw (header not fully passed) and that no Sync or Flush follows (or after each such
    Execute, when every one ends a chunk and what follows is not known yet)."""
    out, pos = [], 0
    for index, message in enumerate(MESSAGES):
        end = pos + len(message)
        if end > start:
            out.append(message[max(0, start - pos) :])
            seen = start - pos < 5  # the header (its type byte at least) is still to come
            following = MESSAGES[index + 1][:1] if index + 1 < len(MESSAGES) else b""
            followed = following in (b"S", b"H") and not followers_unknown
            if message[:1] == b"E" and seen and not followed:
                out.append(FLUSH)
        pos = end
    return b"".join(out)


def test_starts_mid_stream_as_a_decoder_left_it() -> None:
    """header_sent/passing from FrameDecoder.remaining(), as the session hands them over,
    from every byte of the stream: the rest, whole or one byte a chunk, gets the Flushes
    it should."""
    for start in range(1, len(STREAM)):
        decoder = FrameDecoder(CLIENT_INTEREST, inspect_limit=0)
        decoder.feed(STREAM[:start])
        header, passing = decoder.remaining()
        rest = STREAM[start:]
        whole = FlushInserter(header_sent=header, passing=passing).feed(rest)
        assert whole == expected_from(start), start
        inserter = FlushInserter(header_sent=header, passing=passing)
        pieces = b"".join(inserter.feed(rest[i : i + 1]) for i in range(len(rest)))
        assert pieces == expected_from(start, followers_unknown=True), start


def test_passing_an_execute_body_adds_no_flush_for_it() -> None:
    """Started inside an Execute's body (its header unseen) the inserter cannot know it is
    one: the rest passes as it is, and the next Execute gets its Flush."""
    e1 = MESSAGES[2]
    e2 = MESSAGES[3]
    inserter = FlushInserter(passing=len(e1) - 7)
    assert inserter.feed(e1[7:] + e2) == e1[7:] + e2 + FLUSH


def test_header_sent_of_an_execute_adds_its_flush() -> None:
    """Started with two bytes of an Execute's header already passed: its type byte is known,
    so it gets a Flush once it ends, even when the end arrives a chunk later."""
    e1 = MESSAGES[2]
    inserter = FlushInserter(header_sent=e1[:2])
    assert inserter.feed(e1[2:6]) == e1[2:6]
    assert inserter.feed(e1[6:] + MESSAGES[3][:3]) == e1[6:] + FLUSH + MESSAGES[3][:3]
    assert inserter.feed(MESSAGES[3][3:] + SYNC) == MESSAGES[3][3:] + SYNC


# ---------------------------------------------------------------------- MessageEditor


def test_message_editor_returns_the_chunk_itself_when_it_passes_as_it_came() -> None:
    """Whole messages of other types, or a chunk cut inside a message's body: the very
    chunk object. A header cut in two is held until whole (its type decides), so the
    chunk completing it comes back as a new object with the same bytes; so does a chunk
    holding a Parse, handed to `edit` even when `edit` leaves it as it is."""
    edited: list[bytes] = []

    def edit(raw: bytes) -> bytes:
        edited.append(raw)
        return raw

    editor = StatementEditor(edit)
    bind, execute = MESSAGES[1], MESSAGES[2]
    whole = bind + execute + SYNC
    assert editor.feed(whole) is whole
    head, body = bind[:7], bind[7:]
    assert editor.feed(head) is head
    assert editor.feed(body) is body
    assert editor.feed(execute[:3]) == b""
    rest = execute[3:] + SYNC
    out = editor.feed(rest)
    assert out == execute + SYNC and out is not rest
    with_parse = MESSAGES[0] + SYNC
    out = editor.feed(with_parse)
    assert out == with_parse and out is not with_parse
    assert edited == [MESSAGES[0]]
    assert editor.at_boundary


def test_message_editor_a_header_carried_in_and_one_held_back() -> None:
    """A chunk that completes a header the last one began and ends inside the next header:
    as many bytes out as in, yet not the chunk's bytes (the first header's start goes out
    now, the next header's start waits), so not the chunk."""
    editor = StatementEditor(lambda raw: raw)
    bind = MESSAGES[1]
    middle = bind[3:] + SYNC[:3]
    outs = [editor.feed(bind[:3]), editor.feed(middle), editor.feed(SYNC[3:])]
    assert outs == [b"", bind, SYNC]
    assert len(outs[1]) == len(middle) and outs[1] != middle
