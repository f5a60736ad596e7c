from __future__ import annotations

import pytest

from process_mcp.core.buffer import OutputBuffer, decode_utf8, head_and_tail, tail_lines


def filled(capacity: int, *chunks: bytes) -> OutputBuffer:
    buffer = OutputBuffer(capacity)
    for chunk in chunks:
        buffer.append(chunk)
    return buffer


def test_a_buffer_keeps_the_newest_bytes_and_counts_the_dropped_ones() -> None:
    buffer = filled(10, b"0123456", b"789abc", b"de")
    assert buffer.tail() == b"456789abcde"[-10:]
    assert (buffer.total, buffer.dropped, len(buffer)) == (15, 5, 10)


def test_a_chunk_larger_than_the_buffer_keeps_its_tail() -> None:
    buffer = filled(4, b"ab", b"0123456789")
    assert buffer.tail() == b"6789"
    assert buffer.dropped == 8


def test_memory_stays_bounded_under_many_appends() -> None:
    buffer = OutputBuffer(1000)
    for i in range(10_000):
        buffer.append(b"%05d\n" % i)
        assert len(buffer._data) <= 2 * buffer.capacity
    assert buffer.tail().endswith(b"09999\n")
    assert len(buffer) == 1000


def test_since_returns_new_bytes_and_what_was_lost() -> None:
    buffer = filled(8, b"abcdef")
    cursor = buffer.total
    buffer.append(b"gh")
    assert buffer.since(cursor) == (b"gh", 0)
    buffer.append(b"ijklmnop")
    assert buffer.since(cursor) == (b"ijklmnop", 2)
    assert buffer.since(buffer.total) == (b"", 0)


def test_decoding_skips_a_character_cut_at_the_head_and_holds_back_one_open_at_the_tail() -> None:
    data = "été".encode()  # c3 a9 74 c3 a9
    assert decode_utf8(data[1:], cut_head=True) == "té"
    assert decode_utf8(data[:-1], complete=False) == "ét"
    assert decode_utf8(data[:-1], complete=True) == "ét\ufffd"
    assert decode_utf8("€".encode()[:2], complete=False) == ""
    assert decode_utf8(b"\xff ok") == "\ufffd ok"


def test_head_and_tail_keeps_both_ends_at_lines_and_marks_what_it_left_out() -> None:
    assert head_and_tail(filled(100, b"short"), 10, complete=True) == "short"
    lines = b"".join(b"%d\n" % n for n in range(100))
    text = head_and_tail(filled(1000, lines), 40, complete=True)
    head, rest = text.split("\n[...", 1)
    marker, tail = rest.split("\n", 1)
    assert head.startswith("0\n1\n")
    assert tail.endswith("98\n99\n")
    left = 100 - head.count("\n") - 1 - tail.count("\n")
    assert f"{left} lines" in marker


def test_head_and_tail_shows_what_the_head_kept_when_the_buffer_dropped_it() -> None:
    # A buffer smaller than a reply: the stream's first bytes are still there, whole.
    assert head_and_tail(filled(6, b"0123456789"), 100, complete=True) == "0123456789"


@pytest.mark.parametrize(
    ("data", "count", "expected"),
    [
        (b"a\nb\nc\n", 2, "b\nc\n"),
        (b"a\nb\nc\n", 1, "c\n"),
        (b"a\nb\nc\n", 3, "a\nb\nc\n"),
        (b"a\nb\nc\n", 50, "a\nb\nc\n"),
        (b"a\nb\nc", 2, "b\nc"),
        (b"\n\n\n", 2, "\n\n"),
        (b"", 5, ""),
    ],
)
def test_tail_lines_returns_exactly_n_lines(data: bytes, count: int, expected: str) -> None:
    assert tail_lines(filled(100, data), count, complete=True) == expected


def test_tail_lines_says_when_older_lines_were_dropped() -> None:
    text = tail_lines(filled(8, b"line1\nline2\nline3\n"), 5, complete=True)
    assert text.startswith("[... 10 older bytes were dropped")
    assert text.endswith("\nline3\n")
