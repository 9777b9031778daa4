"""Why a login failed: a machine reason for the audit log, a sentence for people.

Methods raise :class:`UnknownUser` to let the chain try the next method and
:class:`LoginFailed` to end it. Both are ``twisted.cred`` errors so protocol
code that only knows cred still answers "login failed".
"""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin


class LoginFailed(UnauthorizedLogin):
    """The login is refused; the chain stops here."""

    def __init__(self, reason: str, explanation: str = ""):
        self.reason = reason
        self.explanation = explanation or reason
        super().__init__(reason)

    def __str__(self) -> str:
        return f"{self.reason}: {self.explanation}"


class UnknownUser(LoginFailed):
    """This method does not know the user; the chain goes on to the next one."""

    def __init__(self, explanation: str = ""):
        super().__init__("unknown-user", explanation or "no such account")
