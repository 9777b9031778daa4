"""The realm's session-start and session-end audit events, and why a session ended."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from twisted.protocols.ftp import IFTPShell

from sftpauth.account import Account
from sftpauth.audit import AuditLog
from sftpauth.realm import SESSION_END_REASONS, SessionInfo, SessionRealm

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.rst"


@pytest.fixture
def ended(tmp_path):
    """A realm with a logged-in FTP session: (realm, logout, the session-end events written so far)."""
    audit = AuditLog("")
    events: list[dict] = []
    audit.listeners.append(lambda entry: events.append(entry) if entry["event"] == "session-end" else None)
    realm = SessionRealm(audit, None)
    account = Account(username="alice", method_id="local", home_folder=str(tmp_path), permissions=frozenset(), groups=("staff",))
    _, _, logout = realm.requestAvatar(account, SessionInfo("ftp", "ftp", "192.0.2.7"), IFTPShell)
    return realm, logout, events


def test_the_protocols_reason_is_the_session_ends_reason(ended):
    _, logout, events = ended
    logout("idle-timeout")
    logout("connection-closed")  # a second call ends nothing more
    assert [(event["username"], event["reason"]) for event in events] == [("alice", "idle-timeout")]


def test_without_a_reason_the_session_end_has_none(ended):
    """Twisted's contract: a portal's logout takes no argument."""
    _, logout, events = ended
    logout()
    assert len(events) == 1 and "reason" not in events[0]


def test_once_stopping_every_session_end_says_shutdown(ended):
    realm, logout, events = ended
    realm.shutting_down()
    logout("connection-lost")  # the stop closed the connection: that is what ended it
    assert events[0]["reason"] == "shutdown"


def test_every_reason_is_documented():
    """docs/configuration.rst lists each reason the protocols give, and no other."""
    text = DOCS.read_text(encoding="utf-8")
    listed = text.split("says why the session ended in ``reason``:", 1)[1].split("\n\n", 2)[1]
    documented = set(re.findall(r"^- ``([a-z-]+)``:", listed, re.MULTILINE))
    assert documented == set(SESSION_END_REASONS)
