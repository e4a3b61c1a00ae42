"""Text the user gives on the command line or standard input, checked to be UTF-8; and the files
the user names for a command's results, checked before the command does its work.

On Linux, Python turns bytes of an argument that are not UTF-8 into "surrogate escapes"
(U+DC80–U+DCFF), which a tokenizer would then encode as garbage or crash on. Here they are found
and refused with a message naming the argument (or the line of standard input) and the byte.
"""

import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

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


def check_can_make(folder: Path, what: str, path) -> None:
    """UserError unless `folder` is a directory we can write in, or one we can make: not under a
    file, and its nearest existing ancestor writable. `what` and `path` name the user's flag."""
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{what} {path}: {ancestor} is a file, so no directory can be made under it")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise UserError(f"{what} {path}: cannot write in {ancestor} ({e.strerror or e})") from None


def checked_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """The directory named by `what` that a command fills (a run, a converted checkpoint), checked
    before any work: not a file, and one we can write in or make (`check_can_make`)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out}: exists and is a file, not a directory")
    check_can_make(out, what, out)
    return out


def checked_output(path: str | os.PathLike, what: str, suffix: str | None = None) -> Path:
    """The file named by `what` (e.g. "--output") that a command writes when its work is done,
    checked before that work, so that the work is not lost to a typo: not a directory, ending in
    `suffix` when one is required (a figure's ".png"), and in a folder we can write in or make
    (`check_can_make`), which is made now."""
    out = Path(path)
    if suffix is not None and out.suffix.lower() != suffix:
        raise UserError(f"{what} {path}: give a {suffix} path")
    if out.is_dir():
        raise UserError(f"{what} {path} is a directory; give a file path")
    check_can_make(out.parent, what, path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out
