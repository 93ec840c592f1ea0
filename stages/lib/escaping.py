"""Row text shown to people, made harmless: data files come from strangers, and a row may hold `\\x1b[2J` (an ANSI
escape that clears the terminal), `\\u202e` (a right-to-left override that disguises text) or `</td><script>`.

    printable(text)  for a terminal or a log: every control, format and lone-surrogate character shown as an escape
                     (\\x1b, \\n, \\u202e, \\ud800), so a row excerpt is one line that cannot drive the terminal
    html_text(text)  for an HTML page: `printable`, cut to a length, then HTML-escaped
"""

from __future__ import annotations

import html
import re

# C0 controls, DEL and C1 controls (some terminals read \x9b as CSI), Unicode bidi overrides and isolates, the
# line/paragraph separators, and lone UTF-16 surrogates (which cannot even be printed to a UTF-8 stream).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with control characters, bidi overrides and lone surrogates shown as escapes (idempotent: an escaped
    text has none left, and backslashes are kept as they are)."""
    return _UNSAFE.sub(_escape, text)


def html_text(text: str, limit: int = 200) -> str:
    """`text` for an HTML page: printable, at most `limit` characters (then "..."), HTML-escaped (quotes too)."""
    shown = printable(text)
    if len(shown) > limit:
        shown = shown[:limit] + "..."
    return html.escape(shown, quote=True)
