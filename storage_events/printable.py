"""Untrusted text made safe to show on a terminal or in a line-oriented log.

File names, and whatever a peer relay sends, may hold characters a terminal acts on (ESC
sequences clear the screen or set the window title) or that end a line for some readers (CR,
NEL U+0085, LINE/PARAGRAPH SEPARATOR U+2028/U+2029) or reorder what is shown (bidi overrides).
Any of them could forge a whole line of output. Every character that is not printable, in the
sense of :meth:`str.isprintable` (controls, format characters, separators other than the plain
space, surrogates, private-use and unassigned code points), is therefore shown as an escape.
"""

from __future__ import annotations

import msgspec

from .client import Received

# Python's own spellings (those of ``repr``), which most readers of these outputs know.
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\\": "\\\\"}


def _text_escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # JSON has \uXXXX only: a character beyond the BMP is a surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def escape(text: str) -> str:
    """``text`` for a human: each character that is not printable becomes ``\\x1b``,
    ``\\n``, ``\\u2028``, ``\\U000e0041``…, and the backslash itself ``\\\\``, so what is shown
    names exactly one text and is one line."""
    if text.isprintable() and "\\" not in text:
        return text  # nearly every name and log message: one pass in C, no copy
    return "".join(c if c.isprintable() and c != "\\" else _text_escape(c) for c in text)


def escape_json(text: str) -> str:
    """JSON text (one line of it) with each character that is not printable written as a JSON
    ``\\uXXXX`` escape. Inside strings, which is the only place valid compact JSON has such
    characters, this is the same JSON value: a program reading the line gets exactly what was
    sent, and a terminal showing it gets nothing to act on."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _json_escape(c) for c in text)


def text_line(item: Received) -> str:
    """One line for a terminal. Every field came from the relay (file names, site and node
    names, the data of other messages), so the whole line is escaped: a name holding ESC or a
    line separator can neither drive the terminal nor forge lines."""
    return escape(_fields(item))


def _fields(item: Received) -> str:
    if item.type not in ("inotify", "overflow", "state"):
        return f"{item.id or '-'} {item.type} {item.data}"
    try:
        ev = item.event
    except msgspec.DecodeError:
        return f"{item.id or '-'} {item.type} {item.data}"
    if item.type == "state":  # an entry of a snapshot: what exists, not a change
        moving = " (being renamed)" if ev.cookie is not None else ""
        return f"state {ev.site}/{ev.node} {ev.path}{'/' if ev.is_dir else ''}{moving}"
    line = f"{ev.id} {ev.site}/{ev.node} {'|'.join(ev.flags)} {ev.path}"
    if ev.old_path is not None:
        line += f" (from {ev.old_path})"
    return line + (" [scan]" if ev.synthetic else "")
