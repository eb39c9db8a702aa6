"""Incremental Server-Sent-Events decoder over raw bytes, with bounded memory.

Follows the WHATWG event-stream parsing rules: lines end with CRLF, LF or CR (a CR at
the end of one chunk and an LF at the start of the next are one line break), ``data``
lines of one event are joined with LF, ``:`` starts a comment, ``event`` names the event,
a blank line dispatches it. Each byte fed is looked at a constant number of times; only
the current partial line and the current event are held, and an event larger than the
cap is dropped (and counted in :attr:`SSEDecoder.dropped`) instead of buffered.
"""

from __future__ import annotations

import re

DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"

Event = tuple[str, bytes]


class SSEDecoder:
    """Feed bytes as they arrive; get back every completed ``(event_name, data)``."""

    __slots__ = (
        "_max",
        "_line",
        "_skip_line",
        "_skip_comment",
        "_after_cr",
        "_first_line",
        "_name",
        "_data",
        "_has_data",
        "_pending",
        "_size",
        "_dropping",
        "dropped",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._line = bytearray()  # the current, unterminated line
        self._skip_line = False  # the current line overflowed the cap and is being discarded
        self._skip_comment = False  # ... and it is a comment, which never counts toward the cap
        self._after_cr = False  # the last byte fed was CR: an LF right after it is the same break
        self._first_line = True  # a UTF-8 BOM may start the stream
        self._name = ""
        self._data: list[bytes] = []
        self._has_data = False
        self._pending = False  # a field line of the current event has been seen
        self._size = 0  # bytes of the current event held so far
        self._dropping = False  # the current event overflowed the cap
        self.dropped = 0  # events dropped for being larger than the cap

    @property
    def at_boundary(self) -> bool:
        """True when the bytes fed so far end exactly between two events."""
        return not (self._line or self._skip_line or self._pending)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the current line and event held in memory (at most about the cap)."""
        return len(self._line) + self._size

    @property
    def terminator(self) -> bytes:
        """Bytes that, written next, close any partial line and pending event.

        Written before an injected event so that it cannot merge with a half-sent one.
        After a trailing CR a single LF would only complete that CR's line break, hence
        two LFs.
        """
        if self.at_boundary:
            return b""
        if self._line or self._skip_line or self._after_cr:
            return b"\n\n"
        return b"\n"

    def feed(self, chunk: bytes) -> list[Event]:
        """Decode ``chunk`` and return the events it completes, in order."""
        if not chunk:
            return []
        if self._after_cr:
            self._after_cr = False
            if chunk[0] == 10:  # LF completing a CRLF split across chunks
                chunk = chunk[1:]
                if not chunk:
                    return []
        self._after_cr = chunk[-1] == 13
        # split() is one C-speed pass; the common LF-only stream skips the regex.
        lines = _LINE_BREAK.split(chunk) if b"\r" in chunk else chunk.split(b"\n")
        tail = lines.pop()  # text after the last line break: the new partial line
        events: list[Event] = []
        if lines:
            first = lines[0]
            if self._skip_line:
                # The oversized line ends here; it was not blank, so it never dispatches.
                self._skip_line = False
                # A comment is ignored like any whole one; any other line is ignored
                # because the event is being dropped.
                lines[0] = b":" if self._skip_comment else b"\x00"
            elif self._line:
                self._line += first
                lines[0] = bytes(self._line)
                self._line.clear()
            for line in lines:
                self._take_line(line, events)
        if tail:
            if self._skip_line or self._dropping:
                self._skip_line = True  # only "this line is not blank" matters now
            elif len(self._line) + len(tail) + self._size > self._max:
                # A comment line is not part of the event: skip it, keep the event, as a
                # whole comment line would be (the result must not depend on the split).
                head = bytes(self._line[:4]) + tail[:4]
                if self._first_line and head.startswith(_BOM):
                    head = head[3:]
                self._skip_comment = head[:1] == b":"
                self._line.clear()
                self._skip_line = True
                if not self._skip_comment:
                    self._begin_drop()
            else:
                self._line += tail
        return events

    def close(self) -> list[Event]:
        """End of stream: return a final event that lacked its blank line, if any.

        The standard discards such an event; accounting is better served by keeping it
        (a last usage frame without the final blank line still counts).
        """
        events: list[Event] = []
        if self._line and not self._skip_line:
            self._take_line(bytes(self._line), events)
        self._line.clear()
        self._skip_line = False
        self._take_line(b"", events)
        return events

    def _begin_drop(self) -> None:
        self._dropping = True
        self._pending = True
        self._data = []
        self._size = 0

    def _take_line(self, line: bytes, events: list[Event]) -> None:
        if self._first_line:
            self._first_line = False
            if line.startswith(_BOM):
                line = line[3:]
        if not line:  # blank line: dispatch
            if self._dropping:
                self.dropped += 1
                self._dropping = False
            elif self._has_data:
                events.append((self._name, b"\n".join(self._data)))
            self._name = ""
            self._data = []
            self._has_data = False
            self._pending = False
            self._size = 0
            return
        if self._dropping:
            return
        if line[0] == 58:  # ":" comment (keep-alive pings)
            return
        self._pending = True
        self._size += len(line)
        if self._size > self._max:
            self._begin_drop()
            return
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value[:1] == b" " else value)
            self._has_data = True
            return
        colon = line.find(b":")
        if colon < 0:
            field, value = line, b""
        else:
            field, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if field == b"data":
            self._data.append(value)
            self._has_data = True
        elif field == b"event":
            self._name = value.decode("utf-8", "replace")
        # "id" and "retry" do not matter to the proxy; unknown fields are ignored.
