"""Security policies in a real ``twistd -n sftpauth``: bans across FTP and SFTP, denied usernames, source filters.

One server for the module. Each test logs in from its own loopback source
address (127.0.0.X), so the ban one test provokes does not touch another.
An "LDAP server" that counts connections and never answers stands behind
the chain, to show denied usernames are refused before any method runs.
"""

from __future__ import annotations

import ftplib
import socket
import threading
import time
from pathlib import Path

import pytest

from sftpauth.auth.passwords import hash_password
from sftpauth.auth.policy import FAILED_LOGIN_DELAY

from .policy_helpers import (
    FTP_REFUSAL,
    SSH_REFUSAL,
    ftp_client,
    ftp_fails,
    ftp_login,
    greeting,
    sftp_fails,
    sftp_listing,
)
from .server import SftpauthServer, free_port, serving

FAILURE = "530 Login failed."
# The short-bans policy's ban: the FTP reply to the failure that starts it comes
# FAILED_LOGIN_DELAY later, and the test must still meet the ban after that.
SHORT_BAN = 5
# The stalled LDAP method's timeout: a login it serves fails no sooner than this.
LDAP_TIMEOUT = 3


class CountingLDAP:
    """A TCP server that records what LDAP clients send it and never answers (a stalled LDAP server)."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(50)
        self.port = self.listener.getsockname()[1]
        self.received = bytearray()
        self.connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stopped:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        while True:
            try:
                data = connection.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.received += data

    def saw(self, text: str) -> bool:
        """Whether any client sent these bytes (a BIND DN holds the username), case-insensitively."""
        with self._lock:
            return text.lower().encode() in bytes(self.received).lower()

    def stop(self) -> None:
        self._stopped = True
        self.listener.close()
        for connection in self.connections:
            connection.close()


class Site:
    def __init__(self, folder: Path, ldap: CountingLDAP):
        self.folder = folder
        names = ("ftp", "sftp", "filtered", "short", "never", "capped-ftp", "capped-sftp")
        self.ports = {name: free_port() for name in names}
        config = f"""
[server]
authentications = DEFAULT-AUTHENTICATION, stalled
audit_log = {folder / "audit.jsonl"}

[services/ftp]
type = ftp
port = {self.ports["ftp"]}

[services/sftp]
type = ssh
port = {self.ports["sftp"]}

[services/ftp-filtered]
type = ftp
port = {self.ports["filtered"]}
security_policy = internal-only

[services/ftp-short]
type = ftp
port = {self.ports["short"]}
security_policy = short-bans

[services/ftp-never]
type = ftp
port = {self.ports["never"]}
security_policy = never-ban

[services/ftp-capped]
type = ftp
port = {self.ports["capped-ftp"]}
security_policy = capped

[services/sftp-capped]
type = ssh
port = {self.ports["capped-sftp"]}
security_policy = capped

[security-policies/capped]
maximum_connections_per_address = 2

[security-policies/DEFAULT-SECURITY-POLICY]
source_ip_ban_after_count = 3
source_ip_ban_interval = 3600
deny_usernames = root, admin*

[security-policies/internal-only]
source_ip_filter = 127.0.0.1/32, 127.0.0.40/30

[security-policies/short-bans]
source_ip_ban_after_count = 2
source_ip_ban_interval = {SHORT_BAN}

[security-policies/never-ban]
source_ip_ban_after_count = 0

[authentications/stalled]
type = ldap
address = 127.0.0.1
port = {ldap.port}
timeout = {LDAP_TIMEOUT}
bind_dn = ou=people,dc=example,dc=com

[groups/DEFAULT_GROUP]
home_folder_path = {folder / "homes"}
create_home_folder = yes

[accounts/alice]
password = {hash_password("alice-pass")}
"""
        self.server = SftpauthServer(folder, config, ports=tuple(self.ports.values()))

    def audit(self, predicate, timeout: float = 10.0) -> dict:
        return self.server.wait_for_audit(predicate, timeout=timeout)


@pytest.fixture(scope="module")
def ldap():
    server = CountingLDAP()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory, ldap):
    """A real sftpauth with five services on four policies."""
    site = Site(tmp_path_factory.mktemp("policy"), ldap)
    with serving(site.server):
        yield site


def test_failures_across_ftp_and_sftp_ban_the_address_on_both(site):
    """Two FTP failures and one SFTP failure ban 127.0.0.10 on both services; others still log in."""
    source = "127.0.0.10"
    early = ftp_client(site.ports["ftp"], source)  # opened before the ban
    assert ftp_fails(site.ports["ftp"], "alice", "wrong-1", source) == FAILURE
    sftp_fails(site.ports["sftp"], "alice", "wrong-2", source)
    assert ftp_fails(site.ports["ftp"], "alice", "wrong-3", source) == FAILURE
    ban = site.audit(lambda e: e["event"] == "ban" and e["peer"] == source)
    assert ban["failures"] == 3 and ban["policy"] == "DEFAULT-SECURITY-POLICY"
    assert greeting(site.ports["ftp"], source) == FTP_REFUSAL
    assert greeting(site.ports["sftp"], source) == SSH_REFUSAL
    # A connection opened before the ban: the right password is refused, and audited as banned.
    with pytest.raises(Exception) as refused:
        early.login("alice", "alice-pass")
    assert FAILURE in str(refused.value)
    early.close()
    site.audit(lambda e: e["event"] == "authentication" and e["peer"] == source and e["reason"] == "banned")
    site.audit(lambda e: e["event"] == "connection" and e["peer"] == source and e["reason"] == "banned")
    ftp_login(site.ports["ftp"], "alice", "alice-pass", "127.0.0.11").quit()
    assert sftp_listing(site.ports["sftp"], "alice", "alice-pass", "127.0.0.11") == []


def test_over_long_user_and_pass_lines_are_failed_logins_that_count_toward_a_ban(site):
    """A USER or PASS line over 16 KiB gets 500 and a close, and is audited and counted as the chain refuses it."""
    source = "127.0.0.18"

    def over_long(*lines: str) -> None:
        client = ftp_client(site.ports["ftp"], source)
        for line in lines[:-1]:
            client.putcmd(line)
            assert client.getresp().startswith("331")
        client.putcmd(lines[-1])
        with pytest.raises(ftplib.error_perm, match="^500 Command line too long"):
            client.getresp()
        client.close()

    def failure(reason: str, username) -> dict:
        return site.audit(
            lambda e: e["event"] == "authentication" and e["peer"] == source and e["reason"] == reason and username(e["username"])
        )

    over_long("USER " + "u" * 20_000)
    assert len(failure("invalid-username", lambda name: name.startswith("uuuu"))["username"]) < 400
    over_long("USER alice", "PASS " + "p" * 20_000)
    failure("invalid-password", lambda name: name == "alice")
    assert "pppp" not in (site.folder / "audit.jsonl").read_text()
    assert not [e for e in site.server.audit_events() if e["event"] == "ban" and e["peer"] == source]
    over_long("user " + "v" * 20_000)
    ban = site.audit(lambda e: e["event"] == "ban" and e["peer"] == source)
    assert ban["failures"] == 3
    assert greeting(site.ports["ftp"], source) == FTP_REFUSAL


def test_a_success_resets_the_count(site):
    """Failures separated by a successful login never add up to a ban."""
    source = "127.0.0.12"
    for _ in range(3):
        ftp_fails(site.ports["ftp"], "alice", "wrong", source)
        ftp_fails(site.ports["ftp"], "alice", "wrong", source)
        ftp_login(site.ports["ftp"], "alice", "alice-pass", source).quit()
    ftp_fails(site.ports["ftp"], "alice", "wrong", source)
    ftp_fails(site.ports["ftp"], "alice", "wrong", source)
    ftp_login(site.ports["ftp"], "alice", "alice-pass", source).quit()
    assert not [e for e in site.server.audit_events() if e["event"] == "ban" and e["peer"] == source]


def test_denied_usernames_never_reach_an_authentication_method(site, ldap):
    """root and admin* are refused before any method runs: the LDAP server never sees them."""
    # An unknown username does go to the (stalled) LDAP method: the recorder works.
    ftp_fails(site.ports["ftp"], "nobody-here", "pw", "127.0.0.13")
    site.audit(lambda e: e["event"] == "authentication" and e["username"] == "nobody-here" and e["reason"] == "service-unavailable")
    assert ldap.saw("cn=nobody-here")
    for username in ("root", "ROOT", "administrator"):
        started = time.monotonic()
        assert ftp_fails(site.ports["ftp"], username, "pw", "127.0.0.14") == FAILURE
        # the 530 comes after FAILED_LOGIN_DELAY; the LDAP timeout was not waited for on top of it
        assert time.monotonic() - started < FAILED_LOGIN_DELAY + LDAP_TIMEOUT
        site.audit(lambda e, u=username: e["event"] == "authentication" and e["username"] == u and e["reason"] == "denied-username")
    sftp_fails(site.ports["sftp"], "root", "pw", "127.0.0.15")
    site.audit(lambda e: e["event"] == "authentication" and e["protocol"] == "sftp" and e["reason"] == "denied-username")
    time.sleep(0.5)
    assert not ldap.saw("cn=root") and not ldap.saw("cn=administrator")


def test_source_filter_refuses_connections_from_elsewhere(site):
    """ftp-filtered admits 127.0.0.1 and 127.0.0.40/30 only; others get the constant refusal line."""
    assert greeting(site.ports["filtered"], "127.0.0.50") == FTP_REFUSAL
    assert greeting(site.ports["filtered"], "127.0.0.41").startswith(b"220 ")
    ftp_login(site.ports["filtered"], "alice", "alice-pass", "127.0.0.42").quit()
    site.audit(lambda e: e["event"] == "connection" and e["peer"] == "127.0.0.50" and e["reason"] == "source-filtered")


def test_a_ban_ends_after_its_interval_and_the_end_is_audited(site):
    """With a short source_ip_ban_interval the address is refused, then admitted again, and ban-ended is audited."""
    source = "127.0.0.16"
    ftp_fails(site.ports["short"], "alice", "wrong", source)
    ftp_fails(site.ports["short"], "alice", "wrong", source)
    site.audit(lambda e: e["event"] == "ban" and e["peer"] == source and e["policy"] == "short-bans")
    assert greeting(site.ports["short"], source) == FTP_REFUSAL
    # The other policies do not share this ban.
    ftp_login(site.ports["ftp"], "alice", "alice-pass", source).quit()
    site.audit(lambda e: e["event"] == "ban-ended" and e["peer"] == source, timeout=SHORT_BAN + 10)
    ftp_login(site.ports["short"], "alice", "alice-pass", source).quit()


def test_an_address_over_its_maximum_of_connections_is_refused_until_one_closes(site):
    """maximum_connections_per_address = 2 over FTP and SFTP together: the third is refused and audited."""
    source = "127.0.0.60"
    held_ftp = ftp_client(site.ports["capped-ftp"], source)
    held_ssh = socket.create_connection(("127.0.0.1", site.ports["capped-sftp"]), timeout=10, source_address=(source, 0))
    try:
        assert held_ssh.recv(64).startswith(b"SSH-2.0-")
        assert greeting(site.ports["capped-ftp"], source) == FTP_REFUSAL
        assert greeting(site.ports["capped-sftp"], source) == SSH_REFUSAL
        site.audit(lambda e: e["event"] == "connection" and e["peer"] == source and e["reason"] == "too-many-connections")
        ftp_login(site.ports["capped-ftp"], "alice", "alice-pass", "127.0.0.61").quit()  # another address
        assert greeting(site.ports["ftp"], source).startswith(b"220 ")  # a service of another policy
    finally:
        held_ftp.close()
    deadline = time.monotonic() + 5
    while (answer := greeting(site.ports["capped-ftp"], source)) == FTP_REFUSAL and time.monotonic() < deadline:
        time.sleep(0.05)  # until the server has seen the close
    assert answer.startswith(b"220 ")
    held_ssh.close()


def test_zero_never_bans(site):
    """source_ip_ban_after_count = 0: ten failures, then the right password works."""
    source = "127.0.0.17"
    client = ftp_client(site.ports["never"], source)
    for attempt in range(10):
        with pytest.raises(Exception):
            client.login("alice", f"wrong-{attempt}")
    client.login("alice", "alice-pass")
    client.quit()
