"""Incremental splitter for a streamed JSON array of objects.

Gemini's ``streamGenerateContent`` without ``alt=sse`` sends one JSON array element by
element (``[{...}\\n,\\r\\n{...}\\n]``), split anywhere by the network. This finds each
top-level element without parsing it: a regex jumps to the next bracket, brace or quote
(inside strings: to the next quote or backslash), so each byte is scanned once, in C.
Only the current element is held; one larger than the cap is dropped and counted.

A body that is a single object rather than an array (``{"error": ...}``) yields that
object as one element.
"""

from __future__ import annotations

import re

DEFAULT_MAX_ELEMENT_BYTES = 16 * 1024 * 1024

_STRUCTURAL = re.compile(rb'[\[\]{}"]')
_STRING_SPECIAL = re.compile(rb'["\\]')


class JSONArraySplitter:
    """Feed bytes as they arrive; get back the bytes of each complete top-level element."""

    __slots__ = (
        "_max",
        "_depth",
        "_elem_depth",
        "_in_string",
        "_escape",
        "_in_elem",
        "_buf",
        "_dropping",
        "dropped",
    )

    def __init__(self, max_element_bytes: int = DEFAULT_MAX_ELEMENT_BYTES) -> None:
        self._max = max_element_bytes
        self._depth = 0  # current nesting depth of [ and {
        self._elem_depth = -1  # depth outside the element being collected
        self._in_string = False
        self._escape = False  # the previous chunk ended on a backslash inside a string
        self._in_elem = False
        self._buf = bytearray()  # bytes of the current element from earlier chunks
        self._dropping = False  # the current element overflowed the cap
        self.dropped = 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the current element held in memory (at most the cap)."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[bytes]:
        """Scan ``chunk`` and return the elements it completes, in order."""
        out: list[bytes] = []
        n = len(chunk)
        pos = 0
        start = 0  # where the current element starts in this chunk
        if self._escape and n:
            self._escape = False
            pos = 1  # the escaped byte cannot end the string
        depth = self._depth
        in_string = self._in_string
        struct_search = _STRUCTURAL.search
        string_search = _STRING_SPECIAL.search
        while pos < n:
            if in_string:
                m = string_search(chunk, pos)
                if m is None:
                    break
                i = m.start()
                if chunk[i] == 92:  # backslash: skip the escaped byte, maybe in the next chunk
                    if i + 1 >= n:
                        self._escape = True
                        break
                    pos = i + 2
                    continue
                in_string = False
                pos = i + 1
                continue
            m = struct_search(chunk, pos)
            if m is None:
                break
            i = m.start()
            c = chunk[i]
            pos = i + 1
            if c == 34:  # "
                in_string = True
            elif c == 123 or c == 91:  # { or [
                # The outer "[" is depth 0 -> 1; an element starts at depth 1 (or a bare
                # object at depth 0).
                if not self._in_elem and (depth == 1 or (depth == 0 and c == 123)):
                    self._in_elem = True
                    self._elem_depth = depth
                    start = i
                depth += 1
            else:  # } or ]
                if depth > 0:
                    depth -= 1
                if self._in_elem and depth == self._elem_depth:
                    self._in_elem = False
                    size = len(self._buf) + pos if self._buf else pos - start
                    if self._dropping or size > self._max:
                        # The cap holds whatever the split: an element that completes
                        # within one chunk is measured like one that spans several.
                        self._dropping = False
                        self._buf.clear()
                        self.dropped += 1
                    elif self._buf:
                        self._buf += chunk[:pos]
                        out.append(bytes(self._buf))
                        self._buf.clear()
                    else:
                        out.append(chunk[start:pos])
        self._depth = depth
        self._in_string = in_string
        if self._in_elem and not self._dropping:
            if len(self._buf) + n - start > self._max:
                self._buf.clear()
                self._dropping = True
            else:
                self._buf += chunk[start:] if start else chunk
        return out
