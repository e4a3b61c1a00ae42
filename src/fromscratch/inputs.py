"""Text the user gives on the command line or standard input, checked to be UTF-8.

On Linux, Python turns bytes of an argument that are not UTF-8 into "surrogate escapes"
(U+DC80–U+DCFF), which a tokenizer would then encode as garbage or crash on. Here they are found
and refused with a message naming the argument (or the line of standard input) and the byte.
"""

import os
import stat
import sys
from collections.abc import Iterator

from fromscratch.errors import UserError


def checked_text(text: str, what: str) -> str:
    """`text` if it came from valid UTF-8; UserError naming `what` (e.g. "--prompt") otherwise."""
    for position, char in enumerate(text):
        if "\udc80" <= char <= "\udcff":
            raise UserError(f"{what} is not UTF-8 text (byte 0x{ord(char) - 0xDC00:02x} at character "
                            f"{position}); pass UTF-8")
    return text


def stdin_lines() -> Iterator[str]:
    """Standard input line by line, decoded as UTF-8 (without the line ending); a line that is not
    UTF-8 is a UserError naming its number."""
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise UserError(f"standard input, line {number}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def stdin_is_a_file() -> bool:
    """Whether standard input is a file (`< FILE`): all of it can be read at once, where a terminal
    or a pipe gives its lines as they come."""
    try:
        return stat.S_ISREG(os.fstat(sys.stdin.fileno()).st_mode)
    except (OSError, ValueError):  # no file descriptor (io.UnsupportedOperation is both), or closed
        return False
