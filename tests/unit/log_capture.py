"""Log events captured while a block of a test runs."""

from __future__ import annotations

import contextlib
from typing import Iterator

from twisted.logger import globalLogPublisher


@contextlib.contextmanager
def captured_logs() -> Iterator[list[dict]]:
    """Every log event emitted inside the block, in order.

    The observer goes even when the block fails, so a failed test leaves no
    list growing through the rest of the run (Twisted's ``capturedLogs``
    does not remove it then).
    """
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)
