"""Helpers for the LDAP integration tests: configurations, an in-process chain, spies, socket counts."""

from __future__ import annotations

import contextlib
import os
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest
from ldaptor.protocols.ldap.ldapclient import LDAPClient
from twisted.internet import defer, task

from sftpauth.audit import AuditLog
from sftpauth.auth.chain import AuthenticationChain
from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap.method import LDAPMethod
from sftpauth.auth.trace import Trace
from sftpauth.config.loader import parse_configuration
from sftpauth.config.models import LDAPAuthenticationSettings

from .server import read_audit

BASE = "dc=example,dc=com"
PEOPLE = f"ou=people,{BASE}"
ENGINEERING = f"ou=Engineering,{PEOPLE}"
ACCOUNTING = f"ou=Accounting,{PEOPLE}"
CONTRACTORS = f"ou=contractors,{BASE}"
FTP_USERS = f"cn=ftp-users,ou=groups,{BASE}"
ADMINS = f"cn=admins,ou=groups,{BASE}"

ALICE_DN = f"uid=alice,{ENGINEERING}"
BOB_DN = f"uid=bob,{ACCOUNTING}"
CAROL_DN = f"uid=carol,{CONTRACTORS}"
JMULLER_DN = rf"cn=Müller\, Jürgen,{ENGINEERING}"
JMULLER_DN_HEX = rf"cn=M\C3\BCller\2C J\C3\BCrgen,{ENGINEERING}"
JMULLER_CN = "Müller, Jürgen"

PASSWORDS = {
    "alice": "alice-pass",
    "bob": "bob-pass",
    "carol": "carol-pass",
    "dup": "dup-pass",
    "jmuller": "jürgen-päss",
    JMULLER_CN: "jürgen-päss",
}

METHOD_ID = "ldap"
REPOSITORY = Path(__file__).resolve().parents[2]


def ldap_section(slapd, options: str, method_id: str = METHOD_ID, port: Optional[int] = None) -> str:
    """An [authentications/ID] type = ldap section for the slapd fixture, plus ``options`` (which win)."""
    options = textwrap.dedent(options).strip()
    given = {line.split("=", 1)[0].strip() for line in options.splitlines() if "=" in line and not line[:1].isspace()}
    defaults = {
        "address": "127.0.0.1",
        "port": str(slapd.port if port is None else port),
        "timeout": "5",
        "base_groups": "ldap-users",
    }
    lines = [f"[authentications/{method_id}]", "type = ldap"]
    lines += [f"{name} = {value}" for name, value in defaults.items() if name not in given]
    return "\n" + "\n".join(lines) + "\n" + options + "\n"


def base_config(folder: Path, authentications: str = METHOD_ID) -> str:
    return textwrap.dedent(
        f"""
        [server]
        authentications = {authentications}
        audit_log = {folder}/audit.jsonl

        [security-policies/DEFAULT-SECURITY-POLICY]
        source_ip_ban_after_count = 1000

        [groups/ldap-users]
        home_folder_path = {folder}/homes
        create_home_folder = yes
        """
    )


def run_now(function, *args, **kwargs) -> defer.Deferred:
    """run_in_thread for in-process tests: the work (mkdir of a home folder) is tiny."""
    return defer.maybeDeferred(function, *args, **kwargs)


class Outcome:
    """What one login gave: the account or the failure, the audit event, the trace."""

    def __init__(self, account, failure: Optional[LoginFailed], event: Optional[dict], trace: Trace):
        self.account = account
        self.failure = failure
        self.event = event
        self.trace = trace

    @property
    def reason(self) -> str:
        return self.failure.reason if self.failure is not None else ""

    @property
    def ok(self) -> bool:
        return self.failure is None

    def steps(self) -> list[str]:
        return [f"{step.action}: {step.detail}" for step in self.trace.steps]

    def __repr__(self) -> str:
        return f"<Outcome reason={self.reason!r} account={self.account!r} steps={self.steps()!r}>"


class InProcessLDAP:
    """The real configuration loader, LDAPMethod and AuthenticationChain, in the test process."""

    def __init__(
        self,
        slapd,
        folder: Path,
        options: str,
        extra: str = "",
        authentications: str = METHOD_ID,
        port: Optional[int] = None,
    ):
        from twisted.internet import reactor

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.text = base_config(self.folder, authentications) + ldap_section(slapd, options, port=port) + textwrap.dedent(extra)
        self.configuration = parse_configuration(self.text, str(self.folder / "sftpauth.ini"), str(self.folder), {})
        self.audit_path = self.folder / "audit.jsonl"
        self.audit = AuditLog(str(self.audit_path))
        self.methods = {
            method_id: LDAPMethod(settings, self.configuration, reactor)
            for method_id, settings in self.configuration.authentications.items()
            if isinstance(settings, LDAPAuthenticationSettings)
        }
        self.method = self.methods.get(METHOD_ID)
        self.chain = AuthenticationChain(self.configuration, self.methods, self.audit, run_now)

    def close(self) -> None:
        self.audit.close()

    def audit_events(self) -> list[dict]:
        return read_audit(self.audit_path)

    async def login(self, username: str, password: str, manager: bool = False, service_id: str = "") -> Outcome:
        """One login through the chain; the audit event is read back from the audit log file."""
        before = len(self.audit_events())
        trace = Trace()
        request = LoginRequest(username, password, service_id, "ftp", "127.0.0.1", manager=manager, trace=trace)
        account, failure = None, None
        try:
            account = await self.chain.login(request)
        except LoginFailed as error:
            failure = error
        events = self.audit_events()[before:]
        assert len(events) == 1, events
        return Outcome(account, failure, events[0], trace)

    async def authenticate(self, username: str, password: str, manager: bool = False, method_id: str = METHOD_ID) -> Outcome:
        """One call of LDAPMethod.authenticate, without the chain's input checks or home folder creation."""
        trace = Trace()
        request = LoginRequest(username, password, "", "cli", "127.0.0.1", manager=manager, trace=trace)
        account, failure = None, None
        try:
            account = await self.methods[method_id].authenticate(request)
        except LoginFailed as error:
            failure = error
        return Outcome(account, failure, None, trace)


class LDAPClientSpy:
    """Counts what the ldaptor LDAPClients of this process do once installed: connections, UNBINDs, closes."""

    def __init__(self, monkeypatch):
        self.connected = 0
        self.unbinds = 0
        self.lost = 0
        self._open: set[int] = set()
        spy = self
        original_made = LDAPClient.connectionMade
        original_lost = LDAPClient.connectionLost
        original_unbind = LDAPClient.unbind

        def connectionMade(client):
            spy.connected += 1
            spy._open.add(id(client))
            return original_made(client)

        def connectionLost(client, *args, **kwargs):
            if id(client) in spy._open:  # not a connection of an earlier test closing late
                spy._open.discard(id(client))
                spy.lost += 1
            return original_lost(client, *args, **kwargs)

        def unbind(client):
            if id(client) in spy._open:
                spy.unbinds += 1
            return original_unbind(client)

        monkeypatch.setattr(LDAPClient, "connectionMade", connectionMade)
        monkeypatch.setattr(LDAPClient, "connectionLost", connectionLost)
        monkeypatch.setattr(LDAPClient, "unbind", unbind)

    @property
    def open(self) -> int:
        return len(self._open)

    async def settle(self, timeout: float = 5.0) -> None:
        """Give the reactor time to finish closing connections."""
        from twisted.internet import reactor

        deadline = time.monotonic() + timeout
        while self._open and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.01, lambda: None)


@contextlib.contextmanager
def plugin_on_python_path() -> Iterator[None]:
    """Let the twistd subprocess find twisted/plugins/sftpauth_plugin.py of this checkout.

    The editable install does not put the checkout on sys.path, so twistd
    (started in a temporary folder) would not know the ``sftpauth`` command.
    """
    with pytest.MonkeyPatch.context() as patch:
        current = os.environ.get("PYTHONPATH", "")
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPOSITORY), current])))
        yield


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def connections_to(port: int, pid: Optional[int] = None) -> list[str]:
    """TCP connections (any state but TIME-WAIT and LISTEN) to ``port``, of ``pid`` when given."""
    result = subprocess.run(
        ["ss", "-tnpH", "state", "connected", "exclude", "time-wait", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if pid is not None:
        lines = [line for line in lines if f"pid={pid}," in line]
    return lines


async def connections_left(port: int, pid: int, timeout: float = 5.0) -> list[str]:
    """Poll (letting the reactor run) until ``pid`` has no connection to ``port``; return what is left."""
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while True:
        left = connections_to(port, pid)
        if not left or time.monotonic() > deadline:
            return left
        await task.deferLater(reactor, 0.02, lambda: None)
