"""A step-by-step record of one login, for test-login and the Web Manager."""

from __future__ import annotations

import time
from typing import Callable, Optional

import attrs


@attrs.frozen
class Step:
    method: str
    action: str
    detail: str
    elapsed: float  # seconds since the login started


@attrs.define
class Trace:
    """Collects steps; never give it a password, TOTP code or secret."""

    clock: Callable[[], float] = time.monotonic
    started: Optional[float] = None
    steps: list[Step] = attrs.Factory(list)

    def add(self, method: str, action: str, detail: str = "") -> None:
        now = self.clock()
        if self.started is None:
            self.started = now
        self.steps.append(Step(method, action, detail, now - self.started))


class NullTrace(Trace):
    """The trace of ordinary logins: records nothing."""

    def add(self, method: str, action: str, detail: str = "") -> None:
        return None
