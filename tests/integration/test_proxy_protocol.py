"""A real HAProxy (``send-proxy-v2`` and ``send-proxy``) in front of a real sftpauth's FTP and SFTP services.

Clients connect to HAProxy from their own loopback addresses (127.0.0.3X);
HAProxy connects to sftpauth from 127.0.0.1. The audit log and the bans
must see the clients' addresses, never HAProxy's. Passive FTP data
connections go straight from the client to sftpauth (documented in
docs/configuration.rst, "PROXY protocol").
"""

from __future__ import annotations

import io
import socket
import struct
import time
from pathlib import Path

import pytest

from sftpauth.auth.passwords import hash_password

from .policy_helpers import (
    FTP_REFUSAL,
    SSH_REFUSAL,
    TIMEOUT,
    HAProxy,
    ftp_fails,
    ftp_login,
    greeting,
    sftp_fails,
    sftp_listing,
)
from .server import SftpauthServer, free_port
from .sftp_fixtures import plugin_on_python_path


class Site:
    def __init__(self, folder: Path):
        self.folder = folder
        self.ports = {name: free_port() for name in ("ftp", "sftp", "ftp-plain", "sftp-plain")}
        first = 42000 + (self.ports["ftp"] % 1000) * 10
        config = f"""
[server]
audit_log = {folder / "audit.jsonl"}

[services/ftp]
type = ftp
port = {self.ports["ftp"]}
proxy_protocol = yes
passive_port_range = {first}-{first + 9}

[services/sftp]
type = ssh
port = {self.ports["sftp"]}
proxy_protocol = yes
# HAProxy connects from 127.0.0.1; anyone else is refused before the header is read
proxy_protocol_sources = 127.0.0.1

[services/ftp-plain]
type = ftp
port = {self.ports["ftp-plain"]}

[services/sftp-plain]
type = ssh
port = {self.ports["sftp-plain"]}

[security-policies/DEFAULT-SECURITY-POLICY]
source_ip_ban_after_count = 3

[groups/DEFAULT_GROUP]
home_folder_path = {folder / "homes"}
create_home_folder = yes

[accounts/alice]
password = {hash_password("alice-pass")}
"""
        self.server = SftpauthServer(folder, config, ports=(self.ports["ftp-plain"], self.ports["sftp-plain"]))
        self.haproxy = HAProxy(
            folder / "haproxy",
            {
                "ftp": (self.ports["ftp"], "send-proxy-v2"),
                "sftp": (self.ports["sftp"], "send-proxy-v2"),
                "ftp-v1": (self.ports["ftp"], "send-proxy"),
            },
        )

    def proxied(self, name: str) -> int:
        return self.haproxy.ports[name]

    def audit(self, predicate, timeout: float = 10.0) -> dict:
        return self.server.wait_for_audit(predicate, timeout=timeout)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """sftpauth with two proxied services (and two plain ones), HAProxy in front of the proxied ones."""
    site = Site(tmp_path_factory.mktemp("proxy"))
    with plugin_on_python_path():
        site.server.start()
    try:
        _wait_listening(site.ports["ftp"], site.ports["sftp"])
        site.haproxy.start()
        try:
            yield site
        finally:
            site.haproxy.stop()
    finally:
        status = site.server.stop()
    log = site.server.log_text()
    assert "Traceback" not in log, site.server.log_tail(200)
    assert status == 0, site.server.log_tail()


def _wait_listening(*ports: int, timeout: float = 10.0) -> None:
    """Wait for ports by trying to bind them (a connection would be a header-less client)."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port}")
            time.sleep(0.05)


def test_audit_log_shows_the_client_address_behind_haproxy(site):
    """FTP (v2 and v1 headers) and SFTP logins through HAProxy are audited with the client's address."""
    client = ftp_login(site.proxied("ftp"), "alice", "alice-pass", "127.0.0.30")
    client.storbinary("STOR proxied.txt", io.BytesIO(b"through haproxy"))  # passive data: straight to sftpauth
    assert "proxied.txt" in client.nlst()
    client.quit()
    event = site.audit(lambda e: e["event"] == "authentication" and e["outcome"] == "success" and e["service"] == "ftp")
    assert event["peer"] == "127.0.0.30"
    ftp_login(site.proxied("ftp-v1"), "alice", "alice-pass", "127.0.0.31").quit()
    site.audit(lambda e: e["event"] == "authentication" and e["peer"] == "127.0.0.31" and e["outcome"] == "success")
    assert "proxied.txt" in sftp_listing(site.proxied("sftp"), "alice", "alice-pass", "127.0.0.32")
    site.audit(lambda e: e["event"] == "authentication" and e["peer"] == "127.0.0.32" and e["protocol"] == "sftp")
    peers = {e["peer"] for e in site.server.audit_events() if e["event"] == "authentication"}
    assert "127.0.0.1" not in peers


def test_ban_through_haproxy_bans_the_client_not_the_proxy(site):
    """Three failures from one client behind HAProxy ban that client on FTP and SFTP; another client still logs in."""
    source = "127.0.0.33"
    ftp_fails(site.proxied("ftp"), "alice", "wrong", source)
    sftp_fails(site.proxied("sftp"), "alice", "wrong", source)
    ftp_fails(site.proxied("ftp"), "alice", "wrong", source)
    ban = site.audit(lambda e: e["event"] == "ban" and e["peer"] == source)
    assert ban["failures"] == 3
    assert greeting(site.proxied("ftp"), source) == FTP_REFUSAL
    assert greeting(site.proxied("sftp"), source) == SSH_REFUSAL
    site.audit(lambda e: e["event"] == "connection" and e["peer"] == source and e["reason"] == "banned")
    ftp_login(site.proxied("ftp"), "alice", "alice-pass", "127.0.0.34").quit()
    assert sftp_listing(site.proxied("sftp"), "alice", "alice-pass", "127.0.0.34") is not None


def proxied_ftp_exchange(port: int, source: str, *lines: str) -> list[bytes]:
    """A PROXY v1 header claiming the IPv6 ``source``, then FTP ``lines``: the greeting and each reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as connection:
        connection.sendall(f"PROXY TCP6 {source} 2001:db8::1 40000 21\r\n".encode())
        reader = connection.makefile("rb")
        replies = [reader.readline()]
        for line in lines:
            if not replies[-1].startswith(b"220") and len(replies) == 1:
                break
            connection.sendall(line.encode() + b"\r\n")
            replies.append(reader.readline())
        return replies


def test_an_ipv6_client_is_banned_by_its_64(site):
    """QA: each IPv6 address was banned alone: a client with a /64 could guess from a fresh address every time."""
    for host in ("2001:db8:66::1", "2001:db8:66::2", "2001:db8:66::ffff:3"):
        replies = proxied_ftp_exchange(site.ports["ftp"], host, "USER alice", "PASS wrong")
        assert replies[-1].startswith(b"530 "), replies
    ban = site.audit(lambda e: e["event"] == "ban" and e["peer"] == "2001:db8:66::/64")
    assert ban["failures"] == 3
    assert proxied_ftp_exchange(site.ports["ftp"], "2001:db8:66::99")[0] == FTP_REFUSAL
    site.audit(lambda e: e["event"] == "connection" and e["peer"] == "2001:db8:66::99" and e["reason"] == "banned")
    assert proxied_ftp_exchange(site.ports["ftp"], "2001:db8:67::1")[0].startswith(b"220 ")  # another /64


def read_until_closed(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    connection.settimeout(TIMEOUT)
    received = b""
    while True:
        try:
            chunk = connection.recv(1024)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def test_proxied_service_closes_connections_without_a_header(site):
    """A client reaching a proxy_protocol service directly, without a PROXY header, is closed unanswered."""
    with socket.create_connection(("127.0.0.1", site.ports["ftp"]), timeout=TIMEOUT) as connection:
        connection.sendall(b"USER alice\r\n")
        assert read_until_closed(connection) == b""


def test_spoofed_header_from_a_direct_client_is_refused_when_malformed(site):
    """A direct client sending garbage after "PROXY" gets the connection closed, not a login."""
    with socket.create_connection(("127.0.0.1", site.ports["sftp"]), timeout=TIMEOUT) as connection:
        connection.sendall(b"PROXY TCP4 not-an-address 127.0.0.1 1 22\r\nSSH-2.0-x\r\n")
        assert read_until_closed(connection) == b""


def test_a_well_formed_header_from_a_peer_outside_proxy_protocol_sources_is_refused(site):
    """A direct client (127.0.0.77) claiming to be 203.0.113.5 with a valid header is closed; the proxy still works."""
    received = b""
    try:
        with socket.create_connection(("127.0.0.1", site.ports["sftp"]), timeout=TIMEOUT, source_address=("127.0.0.77", 0)) as connection:
            try:
                connection.sendall(b"PROXY TCP4 203.0.113.5 127.0.0.1 1 22\r\nSSH-2.0-x\r\n")
            except (ConnectionResetError, BrokenPipeError):
                pass  # closed at once, possibly before these bytes went out
            received = read_until_closed(connection)
    except ConnectionResetError:
        pass  # reset so fast that connect() itself saw it
    # Not even the server's SSH version string, which an accepted header would get at once.
    assert received == b""
    assert all(event.get("peer") != "203.0.113.5" for event in site.server.audit_events())
    # (The log line may be folded into an earlier one of this service: one per 10 s.)
    assert isinstance(sftp_listing(site.proxied("sftp"), "alice", "alice-pass", source="127.0.0.36"), list)


def test_proxy_header_without_the_option_is_a_protocol_error(site):
    """On services without proxy_protocol a PROXY header (v1 or v2) closes the connection."""
    v2 = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + socket.inet_aton("192.0.2.1") + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 1, 21)
    for port, header in (
        (site.ports["ftp-plain"], b"PROXY TCP4 192.0.2.1 127.0.0.1 1 21\r\n"),
        (site.ports["sftp-plain"], b"PROXY TCP4 192.0.2.1 127.0.0.1 1 22\r\n"),
        (site.ports["ftp-plain"], v2),
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as connection:
            connection.settimeout(TIMEOUT)
            connection.recv(1024)  # the banner or the SSH version
            connection.sendall(header + b"USER alice\r\n")
            assert read_until_closed(connection) == b""
    assert "it starts with a PROXY header but proxy_protocol = no" in site.server.log_text()
    # The plain services keep working with the real TCP peer.
    ftp_login(site.ports["ftp-plain"], "alice", "alice-pass", "127.0.0.35").quit()
    site.audit(lambda e: e["event"] == "authentication" and e["peer"] == "127.0.0.35" and e["service"] == "ftp-plain")
