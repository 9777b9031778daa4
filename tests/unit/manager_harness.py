"""A Web Manager in memory for unit tests: the real Site and resource over a StringTransport.

Requests are raw HTTP bytes fed to the manager's real Site and HTTP
channel, so cookies, headers, status lines and the HTTP-level limits are
exactly what a browser would get.
Time is a MemoryReactorClock; password hashing runs synchronously.
"""

from __future__ import annotations

import json
import textwrap
import urllib.parse
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Optional

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from sftpauth.audit import AuditLog
from sftpauth.auth.chain import AuthenticationChain
from sftpauth.auth.policy import SecurityPolicies
from sftpauth.auth.methods import build_methods
from sftpauth.config.loader import parse_configuration
from sftpauth.manager.events import AuditHistory
from sftpauth.manager.metrics import ManagerMetrics
from sftpauth.manager.service import ManagerSite
from sftpauth.manager.sessions import SessionStore
from sftpauth.manager.web import ManagerApp
from sftpauth.runtime import Runtime
from sftpauth.state import build_state


def run_now(function, *args, **kwargs) -> defer.Deferred:
    return defer.maybeDeferred(function, *args, **kwargs)


class HTTPResult:
    def __init__(self, raw: bytes):
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("iso-8859-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.reason = lines[0].split(" ", 2)[2] if lines[0].count(" ") >= 2 else ""  # the status line's phrase
        self.headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower(), [])
        return values[0] if values else ""

    @property
    def set_cookies(self) -> list[str]:
        return self.headers.get("set-cookie", [])

    def cookie(self, name: str) -> Optional[str]:
        """The raw Set-Cookie line for ``name``."""
        for line in self.set_cookies:
            if line.split("=", 1)[0] == name:
                return line
        return None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self):
        return json.loads(self.body)

    def form_value(self, name: str) -> str:
        """The value of the first hidden input ``name`` in the page."""
        marker = f'name="{name}" value="'
        start = self.text.index(marker) + len(marker)
        return self.text[start : self.text.index('"', start)]

    def __repr__(self) -> str:
        return f"<HTTPResult {self.status} {self.headers} {self.body[:300]!r}>"


MANAGER = """
[server]
name = unit manager
authentications = DEFAULT-AUTHENTICATION
audit_log = {folder}/audit.jsonl

[services/manager]
type = manager
port = 10443
{manager_options}

[roles/auditors]
name = Auditors
permissions = configuration, read

[administrators/admin]
password = {admin_hash}

[administrators/auditor]
password = {auditor_hash}
roles = auditors

[accounts/ftpuser]
password = {ftp_hash}

[groups/DEFAULT_GROUP]
home_folder_path = {folder}/homes
create_home_folder = yes
"""


class ManagerHarness:
    def __init__(
        self,
        folder: Path,
        make_hash,
        manager_options: str = "",
        extra: str = "",
        methods: Optional[dict] = None,
        verify=None,
        audit_file: bool = True,
    ):
        self.folder = Path(folder)
        text = MANAGER.format(
            folder=self.folder,
            manager_options=textwrap.dedent(manager_options),
            admin_hash=make_hash("admin-pass"),
            auditor_hash=make_hash("auditor-pass"),
            ftp_hash=make_hash("ftp-pass"),
        ) + textwrap.dedent(extra)
        if not audit_file:
            text = text.replace(f"audit_log = {self.folder}/audit.jsonl\n", "")
        self.configuration = parse_configuration(text, str(self.folder / "sftpauth.ini"), str(self.folder), {})
        self.clock = MemoryReactorClock()
        self.audit = AuditLog(self.configuration.server.audit_log)
        built = build_methods(self.configuration, run_now, self.clock)
        if methods:
            built.update(methods)
        self.chain = AuthenticationChain(self.configuration, built, self.audit, run_now)
        state = build_state("memory", self.clock)
        self.runtime = Runtime(
            configuration=self.configuration,
            reactor=self.clock,
            portal=None,
            chain=self.chain,
            audit=self.audit,
            run_in_thread=run_now,
            data_folder=str(self.folder / "data"),
            state=state,
            ldap_pools={},
            policies=SecurityPolicies(self.configuration, state.bans, self.audit, self.clock),
        )
        self.settings = self.configuration.services["manager"]
        self.sessions = SessionStore(
            self.clock, self.settings.session_idle_timeout, self.audit, "manager", lifetime=self.settings.session_lifetime
        )
        self.metrics = ManagerMetrics(self.runtime)
        self.app = ManagerApp(
            self.settings,
            self.runtime,
            self.sessions,
            self.metrics,
            AuditHistory(self.audit, run_now),
            service_states=lambda: {"manager": "running"},
            verify=verify,
        )
        self.site = ManagerSite.for_app(self.app, self.settings, self.clock)
        self.cookies: dict[str, str] = {}

    def close(self) -> None:
        self.audit.close()

    # -- HTTP -------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Optional[dict] = None,
        peer: str = "127.0.0.1",
        use_cookies: bool = True,
        content_type: str = "",
    ) -> HTTPResult:
        protocol, transport = self.connect(peer)
        lines = [f"{method} {path} HTTP/1.1", "Host: manager.example", "Connection: close"]
        if use_cookies and self.cookies:
            lines.append("Cookie: " + "; ".join(f"{name}={value}" for name, value in self.cookies.items()))
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
        protocol.dataReceived(raw)
        result = HTTPResult(transport.value())
        if use_cookies:
            for line in result.set_cookies:
                cookie = SimpleCookie()
                cookie.load(line)
                for name, morsel in cookie.items():
                    if morsel.value and morsel["max-age"] != "0":
                        self.cookies[name] = morsel.value
                    else:
                        self.cookies.pop(name, None)
        protocol.connectionLost(None)
        return result

    def connect(self, peer: str = "127.0.0.1"):
        """A new HTTP connection: feed raw bytes to ``protocol.dataReceived``, read ``transport.value()``."""
        address = (IPv6Address if ":" in peer else IPv4Address)("TCP", peer, 40000)
        protocol = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 10443))
        protocol.makeConnection(transport)
        return protocol, transport

    def get(self, path: str, **options) -> HTTPResult:
        return self.request("GET", path, **options)

    def post_form(self, path: str, fields: dict, **options) -> HTTPResult:
        body = urllib.parse.urlencode(fields).encode("utf-8")
        return self.request("POST", path, body, content_type="application/x-www-form-urlencoded", **options)

    def post_json(self, path: str, value, headers: Optional[dict] = None, **options) -> HTTPResult:
        body = json.dumps(value).encode("utf-8")
        return self.request("POST", path, body, headers=headers, content_type="application/json", **options)

    def login(self, username: str = "admin", password: str = "admin-pass") -> HTTPResult:
        page = self.get("/login")
        return self.post_form(
            "/login", {"csrf_token": page.form_value("csrf_token"), "username": username, "password": password, "next": "/"}
        )

    def csrf_token(self) -> str:
        return self.get("/api/v1/session").json()["csrf_token"]

    def events(self, event: str = "authentication") -> list[dict]:
        path = self.configuration.server.audit_log
        with open(path, encoding="utf-8") as audit_file:
            entries = [json.loads(line) for line in audit_file if line.strip()]
        return [entry for entry in entries if entry["event"] == event]
