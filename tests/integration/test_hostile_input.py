"""Hostile input against a real ``twistd -n sftpauth``: nothing crashes, leaks a descriptor, or slows others.

One server for the module, with bans disabled (DEFAULT-SECURITY-POLICY
``source_ip_ban_after_count = 0``): the protocol code itself must cope, not
the ban. Its LDAP methods point at two fake "LDAP servers" on loopback: one
answers garbage, one never answers. The server's open file descriptors are
counted (``/proc/PID/fd``) before and after.
"""

from __future__ import annotations

import ftplib
import io
import os
import re
import socket
import statistics
import struct
import threading
import time
from pathlib import Path

import paramiko
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftpauth.auth.passwords import hash_password

from .policy_helpers import TIMEOUT, ftp_client, ftp_fails, ftp_login, open_descriptors, settled_descriptors, ssh_transport
from .server import SftpauthServer, free_port
from .sftp_fixtures import plugin_on_python_path

FAILURE = "530 Login failed."
FTP_COMMANDS = [b"USER", b"PASS", b"CWD", b"CDUP", b"PWD", b"RETR", b"STOR", b"APPE", b"LIST", b"NLST", b"MKD", b"RMD",
                b"DELE", b"RNFR", b"RNTO", b"PORT", b"EPRT", b"PASV", b"EPSV", b"TYPE", b"MODE", b"STRU", b"SIZE",
                b"MDTM", b"MFMT", b"OPTS", b"FEAT", b"AUTH", b"PBSZ", b"PROT", b"CCC", b"SITE", b"ABOR", b"REST",
                b"ALLO", b"NOOP", b"SYST", b"STAT", b"HELP", b"XMKD", b"\xff\xf4\xff\xf2ABOR"]


class FakeLDAP:
    """A loopback "LDAP server": ``garbage`` answers junk (random, absurd BER lengths, resets), ``stall`` never answers."""

    ANSWERS = [
        os.urandom(64),
        b"\x30\x84\xff\xff\xff\xff\x02\x01\x01",  # a message claiming 4 GiB
        b"\x30\x03\x02\x01\x01" * 50,  # valid BER, not an LDAP response
        b"\x30\x0c\x02\x01\x01\x61\x07\x0a\x01\x00\x04\x00\x04\x00" * 3,  # BindResponses, wrong IDs
        b"",  # close at once
    ]

    def __init__(self, kind: str):
        self.kind = kind
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.served = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)
            threading.Thread(target=self._answer, args=(connection, self.served), daemon=True).start()
            self.served += 1

    def _answer(self, connection: socket.socket, number: int) -> None:
        try:
            connection.settimeout(30)
            if connection.recv(65536) and self.kind == "garbage":
                answer = self.ANSWERS[number % len(self.ANSWERS)]
                if answer:
                    connection.sendall(answer)
                else:
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    connection.close()
                    return
            while connection.recv(65536):
                pass
        except OSError:
            pass

    def stop(self) -> None:
        self.listener.close()
        for connection in self.connections:
            try:
                connection.close()
            except OSError:
                pass


class Site:
    def __init__(self, folder: Path, garbage: FakeLDAP, stall: FakeLDAP):
        self.folder = folder
        self.ports = {name: free_port() for name in ("ftp", "stalled", "sftp")}
        config = f"""
[server]
authentications = DEFAULT-AUTHENTICATION, garbage
audit_log = {folder / "audit.jsonl"}

[services/ftp]
type = ftp
port = {self.ports["ftp"]}

[services/ftp-stalled]
type = ftp
port = {self.ports["stalled"]}
authentications = DEFAULT-AUTHENTICATION, stalled

[services/sftp]
type = ssh
port = {self.ports["sftp"]}

[security-policies/DEFAULT-SECURITY-POLICY]
source_ip_ban_after_count = 0

[authentications/garbage]
type = ldap
address = 127.0.0.1
port = {garbage.port}
timeout = 1
retry_interval = 1
bind_dn = ou=people,dc=example,dc=com

[authentications/stalled]
type = ldap
address = 127.0.0.1
port = {stall.port}
timeout = 1
bind_dn = ou=people,dc=example,dc=com

[groups/DEFAULT_GROUP]
home_folder_path = {folder / "homes"}
create_home_folder = yes

[accounts/alice]
password = {hash_password("alice-pass")}

[accounts/mallory]
password = {hash_password("mallory-pass")}
"""
        self.server = SftpauthServer(folder, config, ports=tuple(self.ports.values()))

    @property
    def pid(self) -> int:
        return self.server.process.pid

    def healthy(self) -> None:
        """A normal FTP and SFTP login with a transfer still works."""
        client = ftp_login(self.ports["ftp"], "alice", "alice-pass", "127.0.0.1")
        client.storbinary("STOR health.txt", io.BytesIO(b"ok"))
        client.quit()
        transport = ssh_transport(self.ports["sftp"], "127.0.0.1")
        try:
            transport.connect(username="alice", password="alice-pass")
            sftp = paramiko.SFTPClient.from_transport(transport)
            assert sftp.open("health.txt").read() == b"ok"
            sftp.close()
        finally:
            transport.close()


@pytest.fixture(scope="module")
def fakes():
    garbage, stall = FakeLDAP("garbage"), FakeLDAP("stall")
    yield garbage, stall
    garbage.stop()
    stall.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory, fakes):
    """The server, warmed up (one login of each kind), and its descriptor count then."""
    site = Site(tmp_path_factory.mktemp("hostile"), *fakes)
    with plugin_on_python_path():
        site.server.start()
    try:
        site.healthy()
        site.baseline = settled_descriptors(site.pid)
        yield site
    finally:
        status = site.server.stop()
    log = site.server.log_text()
    assert "Traceback" not in log and "Unhandled" not in log, site.server.log_tail(200)
    assert status == 0, site.server.log_tail()


def assert_no_leak(site: Site) -> None:
    """The descriptor count comes back to the warmed-up baseline (closing is asynchronous: wait a little)."""
    count = settled_descriptors(site.pid, expected=site.baseline, timeout=20)
    assert count <= site.baseline, f"{count} descriptors open, {site.baseline} before: {sorted(os.listdir(f'/proc/{site.pid}/fd'))}"


def read_reply(connection: socket.socket) -> bytes:
    """One FTP reply (possibly multi-line), or what came before the server closed."""
    data = b""
    while True:
        lines = data.split(b"\r\n")
        for line in lines[:-1]:
            if len(line) >= 4 and line[:3].isdigit() and line[3:4] == b" ":
                return data
        try:
            chunk = connection.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


command_lines = st.one_of(
    st.binary(max_size=400).filter(lambda data: b"\n" not in data),
    st.builds(lambda command, argument: command + b" " + argument, st.sampled_from(FTP_COMMANDS), st.binary(max_size=300).filter(lambda data: b"\n" not in data)),
    st.builds(lambda command, argument: command + b" " + argument.encode("utf-8", "surrogatepass"), st.sampled_from(FTP_COMMANDS), st.text(max_size=100)),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lines=st.lists(command_lines, min_size=1, max_size=4))
def test_generated_ftp_command_lines_get_an_answer_and_the_server_stays_responsive(site, lines):
    """Property: any command lines before login get FTP replies (or a clean close), and NOOP still answers 200."""
    with socket.create_connection(("127.0.0.1", site.ports["ftp"]), timeout=TIMEOUT) as connection:
        assert read_reply(connection).startswith(b"220")
        for line in lines:
            connection.sendall(line + b"\r\n")
            reply = read_reply(connection)
            if not reply:
                return  # closed (QUIT, or refused): fine, as long as it did not hang
            assert reply[:1] in b"12345" and reply[:3].isdigit(), reply[:200]
            if reply.startswith(b"221"):
                return
        connection.sendall(b"NOOP\r\n")
        reply = read_reply(connection)
        assert reply.startswith((b"200", b"421")), reply[:200]


@pytest.fixture
def logged_in(site):
    """One logged-in FTP control connection for all examples of a test, reopened when a command closes it."""
    holder = {}

    def get() -> socket.socket:
        connection = holder.get("connection")
        if connection is None:
            connection = socket.create_connection(("127.0.0.1", site.ports["ftp"]), timeout=TIMEOUT)
            read_reply(connection)
            connection.sendall(b"USER alice\r\n")
            read_reply(connection)
            connection.sendall(b"PASS alice-pass\r\n")
            assert read_reply(connection).startswith(b"230")
            holder["connection"] = connection
        return connection

    def drop() -> None:
        connection = holder.pop("connection", None)
        if connection is not None:
            connection.close()

    get.drop = drop
    yield get
    drop()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(line=st.builds(lambda command, argument: command + b" " + argument, st.sampled_from(FTP_COMMANDS), st.binary(max_size=200).filter(lambda data: b"\n" not in data and b"\r" not in data)))
def test_generated_commands_after_login_never_break_the_session(site, logged_in, line):
    """Property: after login, any command with any argument bytes is answered and the session survives."""
    if line.startswith((b"QUIT", b"REIN", b"USER", b"PASS")):
        return
    connection = logged_in()
    connection.sendall(line + b"\r\n")
    reply = read_reply(connection)
    passive = re.search(rb"^227 .*\((\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\)|^229 .*\(\|\|\|(\d+)\|\)", reply)
    if passive:  # the session waits for its data connection (one command at a time): open and drop it
        numbers = [int(group) for group in passive.groups() if group is not None]
        port = numbers[0] if len(numbers) == 1 else numbers[4] * 256 + numbers[5]
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
    while reply.startswith(b"1"):  # a transfer started: it fails without a data connection
        reply = read_reply(connection)
    if not reply:
        logged_in.drop()
        return
    assert reply[:3].isdigit() and reply[:1] in b"2345", reply[:200]
    if line.startswith(b"RNFR") and reply.startswith(b"350"):
        connection.sendall(b"ABOR\r\n")
        read_reply(connection)
    connection.sendall(b"PWD\r\n")
    assert read_reply(connection).startswith(b"257")


def test_oversized_lines_and_huge_usernames(site):
    """A 100 KB line closes the connection with 500; a 10 KB username is refused and audited shortened."""
    with socket.create_connection(("127.0.0.1", site.ports["ftp"]), timeout=TIMEOUT) as connection:
        read_reply(connection)
        connection.sendall(b"USER " + b"u" * 100_000 + b"\r\n")
        assert read_reply(connection).startswith(b"500 Command line too long")
    cut = site.server.wait_for_audit(lambda e: e["event"] == "authentication" and e["username"].startswith("uuuu"))
    # Only the line's first part was read: its length is not the username's.
    assert re.fullmatch(r"the username is over \d+ characters long \(at most 256\)", cut["detail"]), cut["detail"]
    huge = "h" * 10_000
    assert ftp_fails(site.ports["ftp"], huge, "pw", "127.0.0.80") == FAILURE
    event = site.server.wait_for_audit(lambda e: e["event"] == "authentication" and e["username"].startswith("hhhh"))
    assert event["reason"] == "invalid-username" and len(event["username"]) < 400
    transport = ssh_transport(site.ports["sftp"], "127.0.0.80")
    try:
        transport.start_client(timeout=TIMEOUT)
        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_password("s" * 100_000, "pw")
    finally:
        transport.close()
    site.server.wait_for_audit(lambda e: e["event"] == "authentication" and e["username"].startswith("ssss") and e["reason"] == "invalid-username")
    assert_no_leak(site)


def test_non_utf8_bytes_in_usernames_and_passwords(site):
    """Undecodable bytes give a failed login (FTP 530, SSH failure) audited as invalid input, never a crash."""
    with socket.create_connection(("127.0.0.1", site.ports["ftp"]), timeout=TIMEOUT) as connection:
        read_reply(connection)
        connection.sendall(b"USER al\xffice\r\n")
        assert read_reply(connection).startswith(b"331")
        connection.sendall(b"PASS \xc3\x28\x00pw\r\n")
        assert read_reply(connection).startswith(b"530")
    site.server.wait_for_audit(lambda e: e["event"] == "authentication" and e["reason"] == "invalid-username" and "al" in e["username"])
    transport = ssh_transport(site.ports["sftp"], "127.0.0.81")
    try:
        transport.start_client(timeout=TIMEOUT)
        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_password(b"bo\xfe\xffb", b"\xff\xfe")
    finally:
        transport.close()
    site.server.wait_for_audit(lambda e: e["event"] == "authentication" and e["protocol"] == "sftp" and e["reason"] == "invalid-username")
    site.healthy()


def test_ssh_clients_vanishing_mid_handshake_leak_nothing(site):
    """Clients that leave after the version, mid key exchange, or after garbage leave no descriptor behind."""
    version = b"SSH-2.0-hostile\r\n"
    kexinit = struct.pack(">IB", 1000, 4) + b"\x14" + os.urandom(40)  # a KEXINIT cut short
    for number in range(30):
        with socket.create_connection(("127.0.0.1", site.ports["sftp"]), timeout=TIMEOUT) as connection:
            connection.recv(256)
            step = number % 5
            if step >= 1:
                connection.sendall(version)
            if step >= 2:
                connection.sendall(kexinit)
            if step == 3:
                connection.sendall(os.urandom(3000))
            if step == 4:
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset
    assert_no_leak(site)
    site.healthy()


def test_clients_vanishing_mid_transfer_leak_nothing(site):
    """SFTP and FTP clients cut off in the middle of an upload or download leave no descriptor or session behind."""
    payload = os.urandom(4 * 1024 * 1024)
    client = ftp_login(site.ports["ftp"], "alice", "alice-pass", "127.0.0.1")
    client.storbinary("STOR big.bin", io.BytesIO(payload))
    client.quit()
    for _ in range(4):
        transport = ssh_transport(site.ports["sftp"], "127.0.0.82")
        transport.connect(username="alice", password="alice-pass")
        sftp = paramiko.SFTPClient.from_transport(transport)
        upload = sftp.open("partial.bin", "wb")
        upload.write(payload[:300_000])
        download = sftp.open("big.bin", "rb")
        download.read(100_000)
        transport.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.sock.close()  # vanish: no close of the files, no channel close, a reset
        transport.close()
    for _ in range(4):
        client = ftp_login(site.ports["ftp"], "alice", "alice-pass", "127.0.0.82")
        client.voidcmd("TYPE I")
        data = client.transfercmd("RETR big.bin")
        data.recv(65536)
        data.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        data.close()
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset of the control connection in the middle of the RETR
        client = ftp_login(site.ports["ftp"], "alice", "alice-pass", "127.0.0.82")
        data = client.transfercmd("STOR cut.bin")
        data.sendall(payload[:500_000])
        client.close()  # the control connection goes first
        data.close()
    assert_no_leak(site)
    site.healthy()


def test_ldap_server_answering_garbage_fails_logins_cleanly(site):
    """An "LDAP server" answering junk refuses the login (530, service-unavailable) within its timeout."""
    for attempt in range(6):
        started = time.monotonic()
        assert ftp_fails(site.ports["ftp"], f"ghost{attempt}", "pw", "127.0.0.83") == FAILURE
        assert time.monotonic() - started < 5
        site.server.wait_for_audit(lambda e, a=attempt: e["event"] == "authentication" and e["username"] == f"ghost{a}")
        time.sleep(1.1)  # let the pool probe the fake again (retry_interval = 1), so every junk answer is met
    reasons = {e["reason"] for e in site.server.audit_events() if e["event"] == "authentication" and e["username"].startswith("ghost")}
    assert reasons == {"service-unavailable"}
    site.healthy()
    assert_no_leak(site)


def test_stalled_ldap_server_does_not_slow_local_logins(site):
    """While logins wait for a silent LDAP server, a local account logs in at its usual speed."""
    stalled = []

    def stall(number: int) -> None:
        stalled.append(ftp_fails(site.ports["stalled"], f"waiting{number}", "pw", f"127.0.0.{90 + number}"))

    threads = [threading.Thread(target=stall, args=(number,)) for number in range(6)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    ftp_login(site.ports["stalled"], "alice", "alice-pass", "127.0.0.84").quit()
    assert time.monotonic() - started < 1.0  # the LDAP timeout is 1 s: alice did not wait for it
    for thread in threads:
        thread.join(30)
    assert stalled == [FAILURE] * 6


def test_flood_of_failed_logins_from_one_address_does_not_slow_another(site):
    """16 connections from one address sending wrong passwords (bans off) leave another user's logins fast."""

    def login_time() -> float:
        started = time.monotonic()
        ftp_login(site.ports["ftp"], "alice", "alice-pass", "127.0.0.86").quit()
        return time.monotonic() - started

    alone = statistics.median(login_time() for _ in range(6))
    stop = threading.Event()
    answered = []

    def flood() -> None:
        while not stop.is_set():
            try:
                client = ftp_client(site.ports["ftp"], "127.0.0.85")
            except (OSError, ftplib.Error, EOFError):
                continue
            try:
                while not stop.is_set():
                    try:
                        client.login("mallory", "wrong")
                    except ftplib.error_perm:
                        answered.append(1)
            except (OSError, ftplib.Error, EOFError):
                pass
            finally:
                client.close()

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(16)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        during = statistics.median(login_time() for _ in range(6))
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert answered, "the flood never got an answer"
    assert during < 3 * alone + 0.5, f"alone {alone:.3f}s, during the flood {during:.3f}s"
    assert_no_leak(site)


def test_descriptors_after_everything(site):
    """After the whole hostile suite the server holds no more descriptors than when it was warmed up."""
    assert_no_leak(site)
    site.healthy()
    assert open_descriptors(site.pid) > 0
