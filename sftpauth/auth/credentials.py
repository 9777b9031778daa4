"""What a protocol hands to the portal when somebody logs in."""

from __future__ import annotations

import unicodedata
from typing import Optional

import attrs
from zope.interface import Interface, implementer

from sftpauth.auth.trace import NullTrace, Trace


class ILoginRequest(Interface):
    """A username and password with where they came from."""


@implementer(ILoginRequest)
@attrs.frozen
class LoginRequest:
    username: str
    password: str = attrs.field(repr=False)
    service_id: str
    protocol: str  # "ftp", "sftp", "manager" or "cli"
    peer: str  # source IP address, "" when there is none
    manager: bool = False  # a Web Manager login: manager_search_filter applies
    trace: Trace = attrs.field(factory=NullTrace, eq=False)
    # The client's line was cut at the protocol's limit (an FTP USER or PASS over 16 KiB):
    # username and password are what came before the cut, so they were longer.
    truncated: bool = False
    # FTP: whether the control connection is TLS (FTPS) at the login; None where every login is encrypted
    # (SFTP, the Web Manager) or there is no connection (the CLI). In the audit events as ``tls``.
    tls: Optional[bool] = None
    # What the protocol layer found wrong with the client's answer, for a login that cannot succeed
    # but is refused and audited by the chain like any other (SFTP: keyboard-interactive answers
    # that are not one per prompt). The chain refuses it as invalid-password with this detail.
    malformed: str = ""
    # A test login (``sftpauth test-login``, the Web Manager's Test login page): it leaves the disk as
    # it was, so a home folder that a login would create is described in the trace, not created.
    test: bool = False


def has_control_characters(text: str) -> bool:
    """Whether ``text`` holds a control character, or a byte that was not UTF-8 (a lone surrogate)."""
    return any(unicodedata.category(char) in ("Cc", "Cs") for char in text)


def directory_form(username: str) -> str:
    """A username as a directory's matching rules see it, case aside: NFKC, spaces trimmed and collapsed.

    ``ａｌｉｃｅ`` and `` alice`` are alice (caseIgnoreMatch also ignores case).
    """
    return " ".join(unicodedata.normalize("NFKC", username).split())
