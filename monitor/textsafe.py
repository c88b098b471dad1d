"""Everything read from a file or a path is shown as text, never as terminal control or markup.

A metrics file, an alert's message, a component's name or a run directory's name may hold escape
sequences (ESC, CSI, OSC: window titles, clipboard writes, hyperlinks, screen clears), C1 controls, bidi
overrides or Textual/Rich markup. `clean` turns every such character into a visible escape (`\\x1b`,
`\\u202e`), so it reaches neither the terminal nor the layout; `label` also escapes markup, for the places
that parse it (border titles, the status bar, notifications, the header). Records are cleaned once, when
they are read (`clean_obj`), so every view and every export (`--once`, `--json`, CSV, SVG) sees clean text.
"""

from __future__ import annotations

import re
from typing import Any

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb]")
"""C0 and C1 controls (newline and tab included: one record field is one line), DEL, zero-width and bidi
formatting characters, line and paragraph separators."""


def _visible(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def clean(text: str) -> str:
    """`text` with every control or formatting character replaced by a visible escape."""
    return _UNSAFE.sub(_visible, text)


def label(text: str) -> str:
    """`clean(text)` with markup escaped: for places that parse markup. Every `[` is escaped, not only those
    that open a complete tag: a name cut short to fit ("x[link=https:evil.examp…") is still markup to
    Textual's parser, which raised on it."""
    return clean(text).replace("[", "\\[")  # Textual reads backslashes before it literally


def needs_cleaning(raw: bytes) -> bool:
    """Whether a JSON line can hold anything `clean` changes: JSON writes controls as \\u escapes, and the
    other characters are not ASCII (a quick test on the hot path; most lines are neither)."""
    return b"\\u" in raw or b"\\n" in raw or b"\\t" in raw or b"\\r" in raw or b"\\b" in raw or b"\\f" in raw or not raw.isascii()


def clean_obj(obj: Any) -> Any:
    """A JSON-like value with every string in it (dict keys too) cleaned."""
    if isinstance(obj, str):
        return clean(obj)
    if isinstance(obj, dict):
        return {clean(k) if isinstance(k, str) else k: clean_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_obj(v) for v in obj]
    return obj
