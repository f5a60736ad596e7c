"""Bounded output buffers, and the tails that replies are cut from.

A process can write gigabytes; the server keeps only the newest bytes of each stream and counts what
it dropped. Bytes are stored raw and decoded when read, so a UTF-8 character split across two reads,
or cut by dropping the oldest bytes, never turns into garbage.
"""

from __future__ import annotations

from collections.abc import Callable

_CONTINUATION_MASK = 0xC0
_CONTINUATION = 0x80
HEAD_BYTES = 16 * 1024
"""The first bytes of a stream, kept for its life however much follows: a long output's reply shows
its beginning (the command's first lines, the first error) as well as its end."""


class OutputBuffer:
    """The newest ``capacity`` bytes of one output stream, with a running byte count."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._data = bytearray()
        self._start = 0  # bytes before this offset in _data are already dropped
        self._total = 0
        self._lines = 0  # newlines ever appended
        self.head = b""
        """The first HEAD_BYTES bytes ever appended."""
        self.on_append: Callable[[], None] | None = None
        """Called after every append, e.g. to wake a caller waiting for output."""

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes at the end, dropping the oldest ones beyond capacity."""
        if len(self.head) < HEAD_BYTES:
            self.head += bytes(data[: HEAD_BYTES - len(self.head)])
        if len(data) >= self.capacity:
            self._lines += bytes(data[: len(data) - self.capacity]).count(b"\n")
            self._data = bytearray(data[-self.capacity :])
            self._lines += self._data.count(b"\n")
            self._start = 0
        else:
            end = len(self._data)
            self._data += data
            self._lines += self._data.count(b"\n", end)  # counted in place: no copy of the chunk
            excess = len(self._data) - self._start - self.capacity
            if excess > 0:
                self._start += excess
            # Compact only once the dead prefix is as large as the live data: each byte moves at most once.
            if self._start >= self.capacity:
                del self._data[: self._start]
                self._start = 0
        self._total += len(data)
        if self.on_append is not None:
            self.on_append()

    @property
    def total(self) -> int:
        """Bytes ever appended: a cursor that only grows."""
        return self._total

    @property
    def lines(self) -> int:
        """Newlines ever appended."""
        return self._lines

    @property
    def dropped(self) -> int:
        """Bytes dropped from the front to stay within capacity."""
        return self._total - (len(self._data) - self._start)

    def __len__(self) -> int:
        return len(self._data) - self._start

    def tail(self, max_bytes: int | None = None) -> bytes:
        """The newest ``max_bytes`` bytes held (all of them by default)."""
        start = self._start
        if max_bytes is not None:
            start = max(start, len(self._data) - max_bytes)
        return bytes(self._data[start:])

    def since(self, cursor: int) -> tuple[bytes, int]:
        """Bytes after position ``cursor``, and how many bytes after it were already dropped."""
        cursor = max(0, min(cursor, self._total))
        lost = max(0, self.dropped - cursor)
        return self.tail(self._total - cursor - lost), lost


def decode_utf8(data: bytes, *, cut_head: bool = False, complete: bool = True) -> str:
    """Decode ``data`` as UTF-8 text.

    ``cut_head``: the bytes are a tail of a longer stream, so a partial character at the start is
    skipped. ``complete=False``: the stream is still open, so a partial character at the end is held
    back rather than shown as a replacement character.
    """
    start = 0
    if cut_head:
        while start < min(3, len(data)) and data[start] & _CONTINUATION_MASK == _CONTINUATION:
            start += 1
    end = len(data) if complete else complete_prefix(data)
    return data[start:end].decode("utf-8", "replace")


def complete_prefix(data: bytes) -> int:
    """Length of ``data`` without a UTF-8 sequence that is still missing bytes at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & _CONTINUATION_MASK != _CONTINUATION:
            need = 2 if 0xC0 <= byte < 0xE0 else 3 if 0xE0 <= byte < 0xF0 else 4 if 0xF0 <= byte < 0xF8 else 1
            return len(data) - back if back < need else len(data)
    return len(data)


def head_and_tail(
    buffer: OutputBuffer,
    limit: int,
    *,
    complete: bool,
    clean: Callable[[str], str] | None = None,
    since: str = "stdout since",
    kept_in: str | None = None,
) -> str:
    """All the text of ``buffer`` if it has at most ``limit`` bytes; else its first lines and its last
    ones (about a quarter and three quarters of ``limit``), each cut at a line boundary, with one marker
    between them saying how many lines and bytes are left out, and how to read them: with ``since``
    (the call and its cursor parameter) and maxBytes, or in the file ``kept_in``. ``clean`` is applied
    to each part."""
    finish = clean or (lambda text: text)
    total = buffer.total
    if total <= limit and len(buffer.head) == total:  # the head holds it all, whatever the buffer dropped
        return finish(decode_utf8(buffer.head, complete=complete))
    if total <= limit and not buffer.dropped:
        return finish(decode_utf8(buffer.tail(), complete=complete))
    head = buffer.head[: limit // 4]
    if b"\n" in head:
        head = head[: head.rindex(b"\n") + 1]  # whole lines only
    tail = buffer.tail(limit - len(head))
    tail_start = total - len(tail)
    if b"\n" in tail[:-1]:
        cut = tail.index(b"\n") + 1
        tail, tail_start = tail[cut:], tail_start + cut
    left_lines = max(0, buffer.lines - head.count(b"\n") - tail.count(b"\n"))
    marker = (
        f"[... {left_lines} lines ({tail_start - len(head)} bytes) left out here; page through them with "
        f"{since}: {len(head)} and maxBytes{f', or read {kept_in}' if kept_in else ''} ...]"
    )
    head_text = finish(decode_utf8(head))
    tail_part = finish(decode_utf8(tail, cut_head=True, complete=complete))
    separator = "" if head_text.endswith("\n") else "\n"
    return f"{head_text}{separator}{marker}\n{tail_part}"


def tail_lines(buffer: OutputBuffer, count: int, *, complete: bool) -> str:
    """The last ``count`` lines held; a final newline ends the last line rather than starting another."""
    if count <= 0 or not len(buffer):
        return ""
    data = buffer.tail()
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    start = end
    for _ in range(count):
        start = data.rfind(b"\n", 0, start)
        if start < 0:
            break
    if start >= 0:
        return decode_utf8(data[start + 1 :], complete=complete)
    text = decode_utf8(data, cut_head=buffer.dropped > 0, complete=complete)
    if buffer.dropped:
        return f"[... {buffer.dropped} older bytes were dropped from the buffer ...]\n{text}"
    return text
