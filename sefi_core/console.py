"""Text for consoles that cannot show every character: a Windows console whose output is redirected (launchers,
services) writes cp1252 with strict errors, also through ComfyUI's log interceptor, so one character outside it
(a person's name in another script) raises UnicodeEncodeError: a lost log line with a "Logging error" traceback,
or a command line tool that stops mid-run. The pack's own strings are cp1252 (tests/core/test_console.py); what
users bring in is escaped here instead."""
from __future__ import annotations

import codecs
import logging
import sys


def console_encodings() -> list[str]:
    """The encodings of this process's stdout and stderr (a log line may go to either)."""
    found = []
    for stream in (sys.stdout, sys.stderr):
        name = getattr(stream, "encoding", None)
        try:
            name = codecs.lookup(name).name if name else None
        except LookupError:
            name = None
        if name and name not in found:
            found.append(name)
    return found


def fit_console(text: str) -> str:
    """`text` with every character that one of the console's encodings cannot hold written as a backslash escape
    (U+674E becomes \\u674e); unchanged where the console holds it all (UTF-8)."""
    for encoding in console_encodings():
        try:
            text.encode(encoding)
        except UnicodeEncodeError:
            text = text.encode(encoding, "backslashreplace").decode(encoding)
    return text


class ConsoleSafeFilter(logging.Filter):
    """Escapes what the console cannot show in each record of the logger it is added to, before any handler
    writes it: the host's handlers write with strict errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = fit_console(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True


def guard_logger(logger: logging.Logger) -> None:
    """Add one ConsoleSafeFilter to `logger` (again on a reload of the pack: still one)."""
    if not any(isinstance(f, ConsoleSafeFilter) or type(f).__name__ == "ConsoleSafeFilter" for f in logger.filters):
        logger.addFilter(ConsoleSafeFilter())


def tolerant_console() -> None:
    """For a command line tool: write what stdout and stderr cannot encode as backslash escapes instead of
    stopping with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
