"""A real ``twistd -n sftpauth`` with a Web Manager, FTP and an LDAP method on the slapd fixture, and an HTTPS client.

LDAP administrators are the entries in ``cn=admins`` (alice); carol can
use FTP but is outside ``manager_search_filter``. Local administrators:
``admin`` (DEFAULT-ROLE) and ``auditor`` (read-only role ``auditors``).
"""

from __future__ import annotations

import http.client
import json
import ssl
import textwrap
import urllib.parse
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Optional

import argon2

from .ldap_helpers import ADMINS, BASE, ldap_section
from .server import SftpauthServer, free_port

_CHEAP = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
ADMIN_PASSWORD = "admin-web-pass"
AUDITOR_PASSWORD = "auditor-web-pass"


def manager_config(folder: Path, slapd, manager_port: int, ftp_port: int, extra_manager: str = "") -> str:
    """``extra_manager``: more lines for [services/web], or sections of their own after them."""
    extra_manager = textwrap.indent(textwrap.dedent(extra_manager), " " * 8).strip()
    ldap = ldap_section(
        slapd,
        f"""
        name = Test directory
        bind_dn_type = search
        bind_dn = {BASE}
        username_attribute = uid
        service_account_dn = {slapd.admin_dn}
        service_account_password = {slapd.admin_password}
        search_filter = (objectClass=inetOrgPerson)
        manager_search_filter = (memberOf={ADMINS})
        """,
    )
    return textwrap.dedent(
        f"""
        [server]
        name = integration manager
        authentications = ldap
        audit_log = {folder}/audit.jsonl
        data_folder = {folder}/data

        [services/web]
        type = manager
        name = Web Manager
        port = {manager_port}
        {extra_manager}

        [services/ftp]
        type = ftp
        port = {ftp_port}

        [groups/ldap-users]
        home_folder_path = {folder}/homes
        create_home_folder = yes

        [roles/auditors]
        name = Auditors
        permissions = configuration, read

        [administrators/admin]
        password = {_CHEAP.hash(ADMIN_PASSWORD)}

        [administrators/auditor]
        password = {_CHEAP.hash(AUDITOR_PASSWORD)}
        roles = auditors
        """
    ) + ldap


class ManagerServer:
    """The twistd process; ``url`` is its Web Manager, ``certificate`` the generated PEM."""

    def __init__(self, folder: Path, slapd, extra_manager: str = ""):
        self.folder = Path(folder)
        self.port = free_port()
        self.ftp_port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        config = manager_config(self.folder, slapd, self.port, self.ftp_port, extra_manager)
        self.server = SftpauthServer(self.folder, config, ports=(self.port, self.ftp_port))
        self.certificate = self.folder / "data" / "manager" / "certificate.pem"

    def start(self) -> "ManagerServer":
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()


class HTTPSClient:
    """http.client with the manager's own certificate as the only trusted one, and a cookie jar."""

    def __init__(self, manager: ManagerServer):
        self.manager = manager
        self.context = ssl.create_default_context(cafile=str(manager.certificate))
        self.cookies: dict[str, str] = {}
        self.csrf_token = ""

    def request(
        self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None
    ) -> tuple[int, dict, bytes]:
        connection = http.client.HTTPSConnection("127.0.0.1", self.manager.port, context=self.context, timeout=15)
        try:
            sent = dict(headers or {})
            if self.cookies:
                sent["Cookie"] = "; ".join(f"{name}={value}" for name, value in self.cookies.items())
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            data = response.read()
            received = {}
            for name, value in response.getheaders():
                received.setdefault(name.lower(), []).append(value)
            for line in received.get("set-cookie", []):
                cookie = SimpleCookie()
                cookie.load(line)
                for name, morsel in cookie.items():
                    if morsel.value and morsel["max-age"] != "0":
                        self.cookies[name] = morsel.value
                    else:
                        self.cookies.pop(name, None)
            return response.status, received, data
        finally:
            connection.close()

    def get_json(self, path: str) -> tuple[int, dict]:
        status, _, data = self.request("GET", path)
        return status, json.loads(data)

    def post_json(self, path: str, value: dict, csrf: bool = True) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if csrf and self.csrf_token:
            headers["X-CSRF-Token"] = self.csrf_token
        status, _, data = self.request("POST", path, json.dumps(value).encode("utf-8"), headers)
        return status, json.loads(data)

    def login(self, username: str, password: str) -> tuple[int, dict]:
        status, body = self.post_json("/api/v1/login", {"username": username, "password": password}, csrf=False)
        if status == 200:
            self.csrf_token = body["csrf_token"]
        return status, body

    def post_form(self, path: str, fields: dict) -> tuple[int, dict, bytes]:
        body = urllib.parse.urlencode(fields).encode("utf-8")
        return self.request("POST", path, body, {"Content-Type": "application/x-www-form-urlencoded"})
