"""How seqpar names an error it handles in one line (logs, reports, reasons)."""

from __future__ import annotations


def first_line(error: BaseException, limit: int = 200) -> str:
    """The error message's first non-empty line, at most ``limit`` characters (errors raised through FX carry
    the generated code and the original stack after it: details for a debug log)."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else ""


def brief(error: BaseException, limit: int = 200) -> str:
    """``"<ErrorType>: <first line>"``."""
    return f"{type(error).__name__}: {first_line(error, limit)}"
