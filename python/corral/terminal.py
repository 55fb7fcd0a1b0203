"""Text from users and services, made safe for a terminal.

corral draws its own screen (``logs``, ``top``, every message that quotes a name), so what
a service printed must not act on the terminal: an OSC that sets the window title, a CSI
that clears the screen or moves the cursor, a C1 control (``\\x9b`` is a CSI on its own).
They are shown as visible escapes instead (``\\x1b``); tab and newline stay."""

from __future__ import annotations

import re

__all__ = ["printable"]

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""C0 controls but tab and newline, DEL, and the C1 controls."""


def printable(text: object) -> str:
    """``text`` with every control character (escape sequences, NUL, C1) shown as ``\\xNN``
    instead of acting."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))
