"""Split a migration into statements exactly as the Supabase CLI does.

`supabase db push` records a migration in `supabase_migrations.schema_migrations`
as its statements (`statements text[]`), split by the CLI's parser
(`pkg/parser` of github.com/supabase/cli): a small state machine that ends a
statement at a `;` outside quotes, dollar quotes, comments, parentheses and
`BEGIN ATOMIC ... END`, keeps comments and whitespace inside a statement, then
trims each one (trailing `;` first, then surrounding whitespace) and drops
those left empty.  `kyrie-engine migrate` must produce the very same array to
recognise the CLI's history (and to write rows the CLI recognises), so this is
the same machine, quirks included, rather than a correct SQL lexer:

- `''` and `""` inside a quote are an escaped quote; a backslash is not an
  escape inside quotes (`E'\\''` confuses it, as it confuses the CLI);
- outside quotes, a backslash swallows the next character (`\\;` is not a
  separator);
- a `(` or `BEGIN ATOMIC` suspends splitting until the matching `)` or `END`,
  matched without counting nesting and, for `END`, anywhere in a word;
- it works on UTF-8 bytes: windows such as `*/` or `$tag$` compare bytes.

The CLI reads through a buffered scanner; a file whose multibyte character
straddles its 4 KiB read boundary can be decoded differently there (only
inside a `$tag` or just before `ATOMIC` could that matter).  Our files keep
such characters in comments, where it cannot.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import TypeAlias

Bytes: TypeAlias = bytes | memoryview

# Go's unicode.IsSpace (strings.TrimSpace): Python's str.strip() also strips
# \x1c-\x1f, which Go keeps.
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
    "\u2028\u2029\u202f\u205f\u3000"


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith("L")


def _is_digit(ch: str) -> bool:
    return unicodedata.category(ch) == "Nd"


def _is_identifier(ch: str) -> bool:
    return _is_letter(ch) or _is_digit(ch) or ch in "_$"


def _last_char(data: Bytes) -> str:
    """The last UTF-8 character of `data` (Go's DecodeLastRune; U+FFFD when invalid)."""
    for width in range(1, min(4, len(data)) + 1):
        try:
            return bytes(data[-width:]).decode()
        except UnicodeDecodeError:
            continue
    return "\ufffd"


def _is_begin_atomic(data: Bytes) -> bool:
    """`data` ends with the word ATOMIC, preceded (across whitespace) by the word BEGIN."""
    offset = len(data) - len(b"ATOMIC")
    if offset < 0 or bytes(data[offset:]).lower() != b"atomic":
        return False
    if offset > 0 and _is_identifier(_last_char(data[:offset])):
        return False
    prefix = bytes(data[:offset]).decode(errors="replace").rstrip(_GO_SPACE).encode()
    offset = len(prefix) - len(b"BEGIN")
    if offset < 0 or prefix[offset:].lower() != b"begin":
        return False
    return offset == 0 or not _is_identifier(_last_char(prefix[:offset]))


class _State:
    def next(self, ch: str, data: Bytes) -> _State | None:
        """The state after `ch` (whose bytes end `data`, the statement so far); None ends the statement."""
        raise NotImplementedError


class _Ready(_State):
    def next(self, ch: str, data: Bytes) -> _State | None:
        if ch == "$":
            return _Tag(len(data) - 1)
        if ch in "'\"":
            return _Quote(ch)
        if ch == "-":
            return _LineCommentStart()
        if ch == "/":
            return _Block()
        if ch == "\\":
            return _Escape()
        if ch == ";":
            return None
        if ch == "(":
            return _Atomic(self, b")")
        if ch in "cC" and _is_begin_atomic(data):
            return _Atomic(self, b"END")
        return self


_READY = _Ready()


class _LineCommentStart(_State):
    def next(self, ch: str, data: Bytes) -> _State | None:
        if ch == "-":
            return _Dollar(b"\n")  # nothing is escaped in a comment: like a dollar quote ending at \n
        return _READY.next(ch, data)


@dataclass
class _Block(_State):
    depth: int = 0

    def next(self, ch: str, data: Bytes) -> _State | None:
        window = data[-2:]
        if window == b"/*":
            self.depth += 1
            return self
        if self.depth == 0:
            return _READY.next(ch, data)
        if window == b"*/":
            self.depth -= 1
            if self.depth == 0:
                return _READY
        return self


@dataclass
class _Quote(_State):
    delimiter: str
    closing: bool = False  # saw the delimiter: closed, unless doubled

    def next(self, ch: str, data: Bytes) -> _State | None:
        if self.closing:
            if ch == self.delimiter:
                self.closing = False
                return self
            return _READY.next(ch, data)
        if ch == self.delimiter:
            self.closing = True
        return self


@dataclass
class _Dollar(_State):
    delimiter: bytes

    def next(self, ch: str, data: Bytes) -> _State | None:
        if data[-len(self.delimiter):] == self.delimiter:
            return _READY
        return self


@dataclass
class _Tag(_State):
    offset: int

    def next(self, ch: str, data: Bytes) -> _State | None:
        if ch == "$":
            return _Dollar(bytes(data[self.offset:]))
        if _is_letter(ch) or _is_digit(ch) or ch == "_":
            return self
        return _READY.next(ch, data)


class _Escape(_State):
    def next(self, ch: str, data: Bytes) -> _State | None:
        return _READY


@dataclass
class _Atomic(_State):
    prev: _State
    delimiter: bytes

    def next(self, ch: str, data: Bytes) -> _State | None:
        current = self.prev.next(ch, data)
        if current is not None:  # a `;` inside does not end the statement
            self.prev = current
        window = bytes(data[-len(self.delimiter):])
        if isinstance(self.prev, _Ready) and window.lower() == self.delimiter.lower():
            return _READY
        return self


def split(sql: str) -> list[str]:
    """The statements as the CLI's `parser.Split` returns them: untrimmed, `;` included."""
    raw = sql.encode()
    view = memoryview(raw)  # the statement so far, without copying it at every character
    statements: list[str] = []
    start = 0
    state: _State = _READY
    pos = 0
    for ch in sql:
        pos += len(ch.encode())
        nxt = state.next(ch, view[start:pos])
        if nxt is None:
            statements.append(raw[start:pos].decode())
            start, state = pos, _READY
        else:
            state = nxt
    if start < len(raw):
        statements.append(raw[start:].decode())
    return statements


def split_and_trim(sql: str) -> list[str]:
    """The CLI's `parser.SplitAndTrim`: what `supabase db push` stores in `statements`."""
    trimmed = (s.rstrip(";").strip(_GO_SPACE) for s in split(sql))
    return [s for s in trimmed if s]
