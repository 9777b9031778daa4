"""The FTP service of a real ``twistd -n sftpauth`` process, driven by real clients.

One server per module (local accounts, a read-only group, a disabled
account); Python's ftplib and the ``lftp`` command line client talk to it
over loopback. Audit events are read back from the server's audit log.
"""

from __future__ import annotations

import ftplib
import io
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from sftpauth.auth.passwords import hash_password

from . import jail_race
from .server import SftpauthServer, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
PASSIVE_PORTS = 40
TIMEOUT = 10
SFTPPLUS_HASH = "$5$rounds=80000$RZ48ALAHbUEdKWmi$rhcJ4PXdCq6sdQaEc7vE8xjYcXEbLxbTZFaQKOkX/7C"


class FTPTestServer:
    """The running server and what the tests need to know about it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.homes = folder / "homes"
        self.port = free_port()
        self.idle_port = free_port()
        while self.idle_port == self.port:
            self.idle_port = free_port()
        first = random.randrange(41000, 59000)
        self.passive_ports = (first, first + PASSIVE_PORTS - 1)
        self.process = SftpauthServer(folder, self.config(), ports=(self.port, self.idle_port))

    def config(self) -> str:
        return f"""
[server]
authentications = DEFAULT-AUTHENTICATION
audit_log = {self.folder / "audit.jsonl"}

[security-policies/DEFAULT-SECURITY-POLICY]
source_ip_ban_after_count = 1000

[services/ftp-test]
type = ftp
address = 127.0.0.1
port = {self.port}
banner = sftpauth integration FTP
passive_port_range = {self.passive_ports[0]}-{self.passive_ports[1]}

[services/ftp-idle]
type = ftp
address = 127.0.0.1
port = {self.idle_port}
idle_connection_timeout = 1

[groups/DEFAULT_GROUP]
home_folder_path = {self.homes}
create_home_folder = yes

[groups/readers]
home_folder_path = {self.homes}
create_home_folder = yes
permissions = allow-read, allow-list

[accounts/alice]
name = alice
password = {hash_password("alice-pass")}

[accounts/carol]
name = carol
password = {hash_password("carol-pass")}

[accounts/dave]
name = dave
enabled = no
password = {hash_password("dave-pass")}

[accounts/reader]
name = reader
password = {hash_password("reader-pass")}
group = readers

[accounts/migrated]
# As SFTPPlus's admin-commands generate-password writes it (made by libxcrypt: SFTPPlus-pass)
password = {SFTPPLUS_HASH}
"""

    def home(self, username: str) -> Path:
        """The account's home folder, created if the account never logged in."""
        path = self.homes / username
        path.mkdir(parents=True, exist_ok=True)
        return path

    def client(self, username: str = "alice", password: str = "alice-pass", port: int = 0) -> ftplib.FTP:
        client = ftplib.FTP(timeout=TIMEOUT, encoding="utf-8")
        client.connect("127.0.0.1", port or self.port)
        client.login(username, password)
        return client

    def audit_events(self) -> list[dict]:
        return self.process.audit_events()

    def wait_for_audit(self, predicate, timeout: float = 5.0) -> dict:
        return self.process.wait_for_audit(predicate, timeout)


def _integration_required() -> bool:
    return os.environ.get("SFTPAUTH_REQUIRE_INTEGRATION") == "1"


@pytest.fixture(scope="module")
def ftp_server(tmp_path_factory):
    """A real sftpauth process with two FTP services, shared by this module."""
    server = FTPTestServer(tmp_path_factory.mktemp("ftp"))
    # twistd finds the sftpauth plugin (twisted/plugins/ in the checkout) only
    # when the checkout is on sys.path, which an editable install does not do.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        server.process.start()
    try:
        yield server
    finally:
        status = server.process.stop()
    log = server.process.log_text()
    assert "Traceback" not in log, server.process.log_tail(200)
    assert status == 0, server.process.log_tail()


def download(client: ftplib.FTP, path: str) -> bytes:
    out = io.BytesIO()
    client.retrbinary(f"RETR {path}", out.write)
    return out.getvalue()


def upload(client: ftplib.FTP, path: str, data: bytes, command: str = "STOR") -> str:
    return client.storbinary(f"{command} {path}", io.BytesIO(data))


def listing(client: ftplib.FTP, path: str = "") -> list[str]:
    lines: list[str] = []
    client.retrlines(f"LIST {path}".rstrip(), lines.append)
    return lines


class RawControl:
    """A bare control connection, for bytes no FTP client library would send."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buffer = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """The next complete reply (multi-line replies end with "NNN ")."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed; got {lines!r} {self.buffer!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line)
            if len(lines[0]) >= 3 and line[:3] == lines[0][:3] and line[3:4] == b" ":
                return b"\r\n".join(lines)

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


# -- the service ------------------------------------------------------------------------


def test_greeting_is_the_configured_banner(ftp_server):
    """The 220 greeting is the service's banner."""
    client = ftplib.FTP(timeout=TIMEOUT)
    assert client.connect("127.0.0.1", ftp_server.port) == "220 sftpauth integration FTP"
    client.close()


def test_feat_lists_utf8_and_opts_utf8_on_is_accepted(ftp_server):
    """FEAT advertises UTF8 and EPSV, and OPTS UTF8 ON answers 200."""
    client = ftp_server.client()
    features = client.sendcmd("FEAT")
    assert " UTF8" in features.splitlines()
    assert " EPSV" in features.splitlines()
    assert client.sendcmd("OPTS UTF8 ON").startswith("200")
    client.quit()


def test_stat_gives_the_session_status_and_with_a_path_its_listing(ftp_server):
    """STAT: 211 with the session's state; STAT PATH: 213 with LIST's lines, each starting with a space."""
    home = ftp_server.home("alice")
    (home / "stat-folder").mkdir(exist_ok=True)
    (home / "stat-folder" / "213 looks-like-an-end.txt").write_bytes(b"12345")
    client = ftp_server.client()
    status = client.sendcmd("STAT").splitlines()
    assert status[0].startswith("211-") and status[-1] == "211 End of status."
    assert " Logged in as alice" in status and " Connected from 127.0.0.1" in status
    client.sendcmd("TYPE A")
    assert " TYPE: ASCII (A); STRUcture: File; MODE: Stream" in client.sendcmd("STAT").splitlines()
    client.sendcmd("TYPE I")
    client.cwd("stat-folder")
    status = client.sendcmd("STAT").splitlines()
    assert " TYPE: BINARY (I); STRUcture: File; MODE: Stream" in status and " Working folder: /stat-folder" in status
    client.cwd("/")
    folder = client.sendcmd("STAT stat-folder").splitlines()
    assert folder[0] == "213-Status of /stat-folder:" and folder[-1] == "213 End of status."
    assert len(folder) == 3 and folder[1].startswith(" -rw") and folder[1].split()[4] == "5"
    assert folder[1].endswith(" 213 looks-like-an-end.txt")
    assert client.sendcmd("STAT stat-folder/*.txt").splitlines()[1:-1] == folder[1:-1]
    assert client.sendcmd("STAT stat-folder/*.bin").splitlines() == ["213-Status of /stat-folder:", "213 End of status."]
    with pytest.raises(ftplib.error_perm, match="^550 /no-such: No such file"):
        client.sendcmd("STAT no-such")
    client.quit()


def test_stat_needs_a_login_and_help_does_not(ftp_server):
    """Before login STAT is 530; HELP lists the commands (214) then and after, and HELP CMD says whether one is known."""
    raw = RawControl(ftp_server.port)
    assert raw.command(b"STAT").startswith(b"530")
    help_lines = raw.command(b"HELP").split(b"\r\n")
    assert help_lines[0] == b"214-The following commands are recognized:" and help_lines[-1] == b"214 Help OK."
    names = b" ".join(help_lines[1:-1]).split()
    assert {b"RETR", b"STOR", b"MLSD", b"STAT", b"HELP", b"EPSV"} <= set(names) and b"SITE" not in names
    assert raw.command(b"HELP retr").startswith(b"214 RETR is supported")
    assert raw.command(b"HELP SITE") == b"502 Unknown command SITE."
    raw.close()


# -- transfers ---------------------------------------------------------------------------


def test_upload_then_download_round_trips(ftp_server):
    """A file stored with STOR comes back unchanged with RETR and is on disk in the home folder."""
    client = ftp_server.client()
    assert upload(client, "round-trip.txt", b"hello ftp\n").startswith("226")
    assert download(client, "round-trip.txt") == b"hello ftp\n"
    assert (ftp_server.home("alice") / "round-trip.txt").read_bytes() == b"hello ftp\n"
    client.quit()


def test_five_megabyte_file_round_trips_byte_exact(ftp_server):
    """A 5 MB random file survives the threaded write and the threaded, paced read byte for byte."""
    data = random.Random(5).randbytes(5 * 1024 * 1024)
    client = ftp_server.client()
    upload(client, "big.bin", data)
    assert (ftp_server.home("alice") / "big.bin").read_bytes() == data
    assert client.size("big.bin") == len(data)
    assert download(client, "big.bin") == data
    client.quit()


def test_ascii_type_still_transfers_bytes_unchanged(ftp_server):
    """After TYPE A the file content is transferred as stored (transfers are always binary)."""
    client = ftp_server.client()
    upload(client, "lines.txt", b"one\r\ntwo\n")
    client.sendcmd("TYPE A")
    lines: list[str] = []
    client.retrlines("RETR lines.txt", lines.append)
    assert lines == ["one", "two"]
    client.quit()


def test_appe_appends_to_a_file(ftp_server):
    """APPE adds the received data to the end of an existing file."""
    client = ftp_server.client()
    upload(client, "log.txt", b"first\n")
    assert upload(client, "log.txt", b"second\n", command="APPE").startswith("226")
    assert download(client, "log.txt") == b"first\nsecond\n"
    client.quit()


def test_rest_resumes_a_download_at_the_offset(ftp_server):
    """REST n then RETR sends the file from byte n (FEAT says REST STREAM)."""
    data = random.Random(11).randbytes(200_000)
    client = ftp_server.client()
    assert " REST STREAM" in client.sendcmd("FEAT").splitlines()
    upload(client, "resume-down.bin", data)
    out = io.BytesIO()
    client.retrbinary("RETR resume-down.bin", out.write, rest=123_456)
    assert out.getvalue() == data[123_456:]
    out = io.BytesIO()
    client.retrbinary("RETR resume-down.bin", out.write, rest=len(data))  # the end: nothing left to send
    assert out.getvalue() == b""
    client.quit()


def test_rest_resumes_an_upload_keeping_the_first_bytes(ftp_server):
    """REST n then STOR keeps the file's first n bytes and writes the rest from n (what was after n is replaced)."""
    data = random.Random(12).randbytes(150_000)
    client = ftp_server.client()
    upload(client, "resume-up.bin", data[:100_000] + b"x" * 5_000)  # an interrupted upload with junk at its end
    reply = client.storbinary("STOR resume-up.bin", io.BytesIO(data[100_000:]), rest=100_000)
    assert reply.startswith("226")
    assert (ftp_server.home("alice") / "resume-up.bin").read_bytes() == data
    client.quit()


def test_rest_past_the_end_or_not_a_number_is_refused_and_rest_is_forgotten(ftp_server):
    """An offset past the end is 554, a bad one 501; another command between REST and RETR cancels it."""
    client = ftp_server.client()
    upload(client, "short.txt", b"0123456789")
    with pytest.raises(ftplib.error_perm, match="^554"):
        client.retrbinary("RETR short.txt", io.BytesIO().write, rest=11)
    with pytest.raises(ftplib.error_perm, match="^554"):
        client.storbinary("STOR short.txt", io.BytesIO(b"more"), rest=11)
    assert (ftp_server.home("alice") / "short.txt").read_bytes() == b"0123456789"  # nothing lost
    with pytest.raises(ftplib.error_perm, match="^501"):
        client.sendcmd("REST -5")
    with pytest.raises(ftplib.error_perm, match="^501"):
        client.sendcmd("REST five")
    with pytest.raises(ftplib.error_perm, match="^550"):
        client.storbinary("STOR missing.txt", io.BytesIO(b"x"), rest=1)  # nothing to resume
    assert client.sendcmd("REST 4").startswith("350")
    client.sendcmd("NOOP")
    assert download(client, "short.txt") == b"0123456789"  # NOOP cancelled the REST
    client.quit()


def test_an_upload_cut_off_by_a_reset_is_not_a_success(ftp_server):
    """When the data connection of a STOR is reset, the reply is 426, not 226, and the session goes on."""
    raw = RawControl(ftp_server.port)
    raw.command(b"USER alice")
    assert raw.command(b"PASS alice-pass").startswith(b"230")
    reply = raw.command(b"PASV")
    host, port = ftplib.parse227(reply.decode())
    data = socket.create_connection((host, port), timeout=TIMEOUT)
    assert raw.command(b"STOR cut-off.bin").startswith(b"125")
    data.sendall(b"x" * 100_000)
    data.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    data.close()  # linger 0: a reset instead of a clean end
    assert raw.reply().startswith(b"426")
    assert raw.command(b"NOOP").startswith(b"200")
    raw.close()


def test_passive_ports_come_from_the_configured_range(ftp_server):
    """PASV announces the client's server address and a port inside passive_port_range."""
    client = ftp_server.client()
    host, port = client.makepasv()
    assert host == "127.0.0.1"
    first, last = ftp_server.passive_ports
    assert first <= port <= last
    client.close()


def test_a_burst_of_pipelined_passive_commands_uses_one_port_at_a_time(ftp_server):
    """Each PASV/EPSV closes the session's previous port before opening the next: more commands in one write
    than the range has ports all get a port, and the last one carries a transfer."""
    raw = RawControl(ftp_server.port)
    assert raw.command(b"USER alice").startswith(b"331")
    assert raw.command(b"PASS alice-pass").startswith(b"230")
    count = PASSIVE_PORTS * 3
    raw.send(b"".join(b"EPSV\r\n" if index % 2 else b"PASV\r\n" for index in range(count)))
    replies = [raw.reply() for _ in range(count)]
    assert [reply[:3] for reply in replies] == [b"227" if index % 2 == 0 else b"229" for index in range(count)]
    port = int(replies[-1].split(b"|||")[1].split(b"|")[0])
    first, last = ftp_server.passive_ports
    assert first <= port <= last
    data = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    assert raw.command(b"NLST")[:3] in (b"125", b"150")
    while data.recv(65536):
        pass
    data.close()
    assert raw.reply().startswith(b"226")
    raw.close()
    assert "no free passive port" not in ftp_server.process.log_text()


def test_passive_data_ports_write_no_log_lines(ftp_server):
    """Twisted logs each port's start and close; a passive data port's two lines per transfer are not written."""
    client = ftp_server.client()
    upload(client, "quiet.txt", b"quiet")
    assert download(client, "quiet.txt") == b"quiet"
    assert "quiet.txt" in client.nlst()
    client.quit()
    ftp_server.client().quit()  # a later turn of the reactor than the ports' closing
    first, last = ftp_server.passive_ports
    lines = [
        line for line in ftp_server.process.log_text().splitlines()
        for port in re.findall(r"starting on (\d+)|Port (\d+) Closed", line)
        if first <= int(port[0] or port[1]) <= last
    ]
    assert lines == []
    assert "_DataChannelFactory" not in ftp_server.process.log_text()


def test_active_mode_transfer_works(ftp_server):
    """A PORT (active mode) data connection to the client's own address transfers data."""
    client = ftp_server.client()
    client.set_pasv(False)
    upload(client, "active.txt", b"active mode")
    assert download(client, "active.txt") == b"active mode"
    client.quit()


def test_port_to_another_address_is_refused(ftp_server):
    """PORT naming an address other than the client's is refused (no FTP bounce)."""
    client = ftp_server.client()
    with pytest.raises(ftplib.error_perm, match="^501"):
        client.sendcmd("PORT 10,1,2,3,200,1")
    with pytest.raises(ftplib.error_perm, match="^501"):
        client.sendcmd("PORT 127,0,0,1,0,22")
    assert client.voidcmd("NOOP").startswith("200")
    client.quit()


def test_eprt_whose_network_protocol_does_not_match_its_address_is_refused(ftp_server):
    """QA, session 26: |2| (IPv6) with an IPv4 address was taken (RFC 2428 calls it a bad argument)."""
    client = ftp_server.client()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with pytest.raises(ftplib.error_perm, match="^501 Network protocol 2 does not match the address 127.0.0.1"):
            client.sendcmd(f"EPRT |2|127.0.0.1|{port}|")
        with pytest.raises(ftplib.error_perm, match="^501 Network protocol 1 does not match"):
            client.sendcmd(f"EPRT |1|::1|{port}|")
        assert client.sendcmd(f"EPRT |1|127.0.0.1|{port}|").startswith("200")
    client.quit()


# -- listings and file operations ------------------------------------------------------


def test_list_and_nlst_show_the_folder(ftp_server):
    """LIST shows each entry with its size and a d flag for folders; NLST only the names."""
    home = ftp_server.home("alice")
    (home / "listed").mkdir(exist_ok=True)
    (home / "listed" / "a.txt").write_bytes(b"12345")
    (home / "listed" / "sub").mkdir(exist_ok=True)
    client = ftp_server.client()
    lines = listing(client, "listed")
    assert len(lines) == 2
    by_name = {line.split()[-1]: line for line in lines}
    assert by_name["a.txt"].startswith("-rw")
    assert by_name["a.txt"].split()[4] == "5"
    # the account and its primary group, as SFTP shows them (not the system owner); LIST columns are 8 wide
    assert by_name["a.txt"].split()[2:4] == ["alice", "DEFAULT_"]
    assert by_name["sub"].startswith("d")
    assert sorted(client.nlst("listed")) == ["a.txt", "sub"]
    client.cwd("listed")
    assert sorted(client.nlst()) == ["a.txt", "sub"]
    assert client.nlst("*.txt") == ["a.txt"]
    assert [line.split()[-1] for line in listing(client, "-la")] == ["a.txt", "sub"]
    client.cwd("/")
    # A glob in a folder gives paths, as a shell's does, so "for name in nlst('listed/*'): RETR name" works.
    assert sorted(client.nlst("listed/*")) == ["listed/a.txt", "listed/sub"]
    assert client.nlst("/listed/*.txt") == ["/listed/a.txt"]
    for name in client.nlst("listed/*.txt"):
        assert client.size(name) == 5
    client.quit()


def test_mlsd_and_mlst_give_exact_facts(ftp_server):
    """MLSD lists type, size, UTC modify time to the second and perm; MLST answers for one path on the control line."""
    client = ftp_server.client()
    client.mkd("mlsx")
    upload(client, "mlsx/data.bin", b"x" * 1234)
    client.mkd("mlsx/inner")
    os.utime(ftp_server.home("alice") / "mlsx" / "data.bin", (0, 1_700_000_123))
    assert " MLST type*;size*;modify*;perm*;" in client.sendcmd("FEAT").splitlines()
    entries = dict(client.mlsd("mlsx"))
    assert entries == {
        "data.bin": {"type": "file", "size": "1234", "modify": "20231114221523", "perm": "adfrw"},
        "inner": {"type": "dir", "modify": entries["inner"]["modify"], "perm": "cdeflmp"},
    }
    reply = client.sendcmd("MLST mlsx/data.bin").splitlines()
    assert reply == ["250-Listing /mlsx/data.bin", " type=file;size=1234;modify=20231114221523;perm=adfrw; /mlsx/data.bin", "250 End"]
    with pytest.raises(ftplib.error_perm, match="^550"):
        client.sendcmd("MLST mlsx/missing")
    # OPTS MLST chooses the facts (ftplib sends it for facts=...); unknown names are ignored.
    chosen = dict(client.mlsd("mlsx", facts=["size", "type", "colour"]))
    assert chosen == {"data.bin": {"type": "file", "size": "1234"}, "inner": {"type": "dir"}}
    client.quit()


def test_mlsd_of_a_file_is_501_and_mlst_of_it_answers(ftp_server):
    """MLSD lists folders only: a file is 501 (RFC 3659 7.2.1, as pyftpdlib answers), a missing path 550; MLST of the file answers."""
    client = ftp_server.client()
    upload(client, "mlsd-file.bin", b"xyz")
    with pytest.raises(ftplib.error_perm, match="^501 /mlsd-file.bin: Not a folder"):
        list(client.mlsd("mlsd-file.bin"))
    with pytest.raises(ftplib.error_perm, match="^550"):
        list(client.mlsd("mlsd-missing"))
    assert client.sendcmd("MLST mlsd-file.bin").splitlines()[1].startswith(" type=file;size=3;")
    assert client.voidcmd("NOOP").startswith("200")
    client.quit()


def test_a_large_folder_lists_completely_and_names_cannot_forge_lines(ftp_server):
    """20,000 entries come through LIST, NLST and MLSD whole; control characters in a name are sent as '?'."""
    folder = ftp_server.home("alice") / "big"
    folder.mkdir(exist_ok=True)
    for index in range(20_000):
        (folder / f"file_{index:05d}_with_a_longish_name.txt").touch()
    (folder / "evil\n-rw-r--r-- 1 root root 9 Jan 01 00:00 PAYROLL\x1b[31m").touch()
    client = ftp_server.client()
    lines = listing(client, "big")
    assert len(lines) == 20_001
    assert not any(line.startswith("-rw-r--r-- 1 root") for line in lines)
    shown = "evil?-rw-r--r-- 1 root root 9 Jan 01 00:00 PAYROLL?[31m"
    assert [line for line in lines if "PAYROLL" in line][0].endswith(" " + shown)
    names = client.nlst("big")
    assert len(names) == 20_001 and names[:2] == [shown, "file_00000_with_a_longish_name.txt"]
    facts = dict(client.mlsd("big"))
    assert len(facts) == 20_001 and facts["file_19999_with_a_longish_name.txt"]["type"] == "file"
    client.quit()


def test_rename_moves_a_file(ftp_server):
    """RNFR/RNTO renames a file; the old name is gone."""
    client = ftp_server.client()
    upload(client, "before.txt", b"x")
    assert client.rename("before.txt", "after.txt").startswith("250")
    assert download(client, "after.txt") == b"x"
    with pytest.raises(ftplib.error_perm, match="^550"):
        download(client, "before.txt")
    client.quit()


def test_rnfr_of_a_missing_name_or_a_link_leading_outside_is_550(ftp_server):
    """RNFR answers 550 for a name that does not exist or leads outside the home (as ProFTPD, vsftpd), 350 for one that exists."""
    home = ftp_server.home("alice")
    if not os.path.lexists(home / "rnfr-outside"):
        os.symlink("/etc/passwd", home / "rnfr-outside")
    client = ftp_server.client()
    with pytest.raises(ftplib.error_perm, match="^550 /rnfr-missing: No such file"):
        client.sendcmd("RNFR rnfr-missing")
    with pytest.raises(ftplib.error_perm, match="^550 /rnfr-outside: No such file"):
        client.sendcmd("RNFR rnfr-outside")
    with pytest.raises(ftplib.error_perm, match="^503"):
        client.sendcmd("RNTO rnfr-target")  # a refused RNFR leaves no rename pending
    upload(client, "rnfr-here.txt", b"x")
    assert client.sendcmd("RNFR rnfr-here.txt").startswith("350")
    assert client.sendcmd("RNTO rnfr-there.txt").startswith("250")
    assert client.sendcmd("RNFR rnfr-there.txt").startswith("350")
    assert client.sendcmd("NOOP").startswith("200")  # RFC 959: RNTO must come right after RNFR
    with pytest.raises(ftplib.error_perm, match="^503"):
        client.sendcmd("RNTO rnfr-stale.txt")
    client.quit()
    assert os.path.islink(home / "rnfr-outside") and (home / "rnfr-there.txt").read_bytes() == b"x"


def test_rnto_onto_a_link_leading_outside_names_the_target(ftp_server):
    """RNTO onto a link that leads outside the home is 550 naming the target the client gave, not the source."""
    home = ftp_server.home("alice")
    outside = ftp_server.folder / "rnto-outside.bin"  # beside the homes: outside alice's
    if not os.path.lexists(home / "rnto-outside"):
        os.symlink(outside, home / "rnto-outside")
    client = ftp_server.client()
    upload(client, "ov.bin", b"ov")
    assert client.sendcmd("RNFR ov.bin").startswith("350")
    with pytest.raises(ftplib.error_perm, match="^550 /rnto-outside: No such file"):
        client.sendcmd("RNTO rnto-outside")
    client.quit()
    assert (home / "ov.bin").read_bytes() == b"ov" and not os.path.lexists(outside)


def test_delete_removes_a_file(ftp_server):
    """DELE removes a file; deleting it again is 550."""
    client = ftp_server.client()
    upload(client, "doomed.txt", b"x")
    assert client.delete("doomed.txt").startswith("250")
    assert not (ftp_server.home("alice") / "doomed.txt").exists()
    with pytest.raises(ftplib.error_perm, match="^550"):
        client.delete("doomed.txt")
    client.quit()


def test_make_and_remove_a_folder(ftp_server):
    """MKD creates a folder (reply names its absolute path), CWD enters it, RMD removes it."""
    client = ftp_server.client()
    assert client.mkd("made") == "/made"
    client.cwd("made")
    assert client.pwd() == "/made"
    client.cwd("..")
    with pytest.raises(ftplib.error_perm, match="^550"):
        client.mkd("made")
    assert client.rmd("made").startswith("250")
    assert not (ftp_server.home("alice") / "made").exists()
    client.quit()


def test_removing_a_folder_that_is_not_empty_fails(ftp_server):
    """RMD of a folder with files in it is 550 and the folder stays."""
    client = ftp_server.client()
    client.mkd("full")
    upload(client, "full/file.txt", b"x")
    with pytest.raises(ftplib.error_perm, match="^550"):
        client.rmd("full")
    assert (ftp_server.home("alice") / "full" / "file.txt").exists()
    client.quit()


def test_size_and_mdtm(ftp_server):
    """SIZE gives the exact byte count and MDTM the file's modification time in UTC."""
    home = ftp_server.home("alice")
    (home / "dated.txt").write_bytes(b"0123456789")
    os.utime(home / "dated.txt", (1700000000, 1700000000))
    client = ftp_server.client()
    assert client.size("dated.txt") == 10
    assert client.sendcmd("MDTM dated.txt") == "213 " + time.strftime("%Y%m%d%H%M%S", time.gmtime(1700000000))
    with pytest.raises(ftplib.error_perm, match="^550"):
        client.size("/")
    client.quit()


def test_mfmt_sets_the_modification_time(ftp_server):
    """MFMT sets a file's modification time, which MDTM and the disk then show."""
    client = ftp_server.client()
    upload(client, "stamped.txt", b"x")
    assert client.sendcmd("MFMT 20200102030405 stamped.txt") == "213 Modify=20200102030405; stamped.txt"
    assert client.sendcmd("MDTM stamped.txt") == "213 20200102030405"
    assert (ftp_server.home("alice") / "stamped.txt").stat().st_mtime == 1577934245
    with pytest.raises(ftplib.error_perm, match="^501"):
        client.sendcmd("MFMT yesterday stamped.txt")
    # The reply gives the time stored, which the filesystem may clamp (ext4: 1901-12-13 to 2446).
    for asked in ("19000101000000", "99991231235959"):
        stored = client.sendcmd(f"MFMT {asked} stamped.txt")
        on_disk = (ftp_server.home("alice") / "stamped.txt").stat().st_mtime
        assert stored == f"213 Modify={time.strftime('%Y%m%d%H%M%S', time.gmtime(on_disk))}; stamped.txt"
        assert client.sendcmd("MDTM stamped.txt") == "213 " + stored[len("213 Modify="):][:14]
    client.quit()


def test_abor_behind_telnet_interrupt_bytes_is_understood(ftp_server):
    """ABOR preceded by Telnet IP/Synch bytes (as lftp sends it) is ABOR, not an unknown command."""
    raw = RawControl(ftp_server.port)
    raw.command(b"USER alice")
    assert raw.command(b"PASS alice-pass").startswith(b"230")
    assert raw.command(b"\xff\xf4\xff\xf2ABOR").startswith(b"226")
    raw.close()


def _stalled_download(ftp_server, name: str) -> tuple[RawControl, socket.socket]:
    """A RETR of a 32 MB file whose data connection the client does not read: the server's sending stalls."""
    path = ftp_server.home("alice") / name
    if not path.exists():
        path.write_bytes(os.urandom(1 << 20) * 32)
    raw = RawControl(ftp_server.port)
    raw.command(b"USER alice")
    assert raw.command(b"PASS alice-pass").startswith(b"230")
    host, port = ftplib.parse227(raw.command(b"PASV").decode())
    data = socket.socket()
    data.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data.settimeout(TIMEOUT)
    data.connect((host, port))
    assert raw.command(f"RETR {name}".encode())[:1] == b"1"  # 125 or 150: the transfer started
    time.sleep(0.5)  # the buffers fill up; the transfer is now waiting for the client
    return raw, data


def test_abor_during_a_stalled_download_aborts_it_at_once(ftp_server):
    """ABOR sent while a transfer runs is read at once: the transfer answers 426, then ABOR 226.

    Before, commands were read only after the running one ended, so ABOR
    waited for the idle timeout (300 s) when the client stopped reading.
    """
    raw, data = _stalled_download(ftp_server, "abor-stalled.bin")
    raw.send(b"\xff\xf4\xff\xf2ABOR\r\n")
    assert raw.reply().startswith(b"426")
    assert raw.reply().startswith(b"226")
    received = 0
    try:
        while chunk := data.recv(1 << 16):  # the data connection was cut, well before the end of the file
            received += len(chunk)
    except ConnectionResetError:
        pass
    assert received < 32 << 20
    assert raw.command(b"NOOP").startswith(b"200")  # the session goes on
    raw.close()
    data.close()


def test_ftplib_abort_of_a_download_aborts_it_and_the_session_goes_on(ftp_server):
    """``ftplib.FTP.abort()`` (ABOR with its LF as TCP urgent data) aborts a running RETR; PWD works after it.

    Before SO_OOBINLINE on the control socket the kernel took the urgent LF
    out of the stream: the ABOR line never ended and abort() hung.
    """
    path = ftp_server.home("alice") / "abort-ftplib.bin"
    if not path.exists():
        path.write_bytes(os.urandom(1 << 20) * 32)
    client = ftp_server.client()
    data = client.transfercmd("RETR abort-ftplib.bin")
    assert data.recv(1000)
    assert client.abort().startswith("426")  # the transfer's answer...
    assert client.voidresp().startswith("226")  # ...then ABOR's (RFC 959); ftplib's abort() reads only the first
    data.close()
    assert client.pwd() == "/"
    client.quit()


def test_quit_during_a_stalled_download_ends_the_session(ftp_server):
    """QUIT during a transfer is answered 221 and the session ends, without waiting for the transfer."""
    raw, data = _stalled_download(ftp_server, "quit-stalled.bin")
    assert raw.command(b"QUIT").startswith(b"221")
    assert raw.sock.recv(100) == b""
    raw.close()
    data.close()


def test_commands_sent_during_a_transfer_are_answered_after_it_in_order(ftp_server):
    """A command pipelined behind RETR waits for the transfer's 226 and is answered after it."""
    (ftp_server.home("alice") / "pipelined.bin").write_bytes(b"p" * 300_000)
    raw = RawControl(ftp_server.port)
    raw.command(b"USER alice")
    assert raw.command(b"PASS alice-pass").startswith(b"230")
    host, port = ftplib.parse227(raw.command(b"PASV").decode())
    data = socket.create_connection((host, port), timeout=TIMEOUT)
    raw.send(b"RETR pipelined.bin\r\nNOOP\r\nPWD\r\n")
    received = b""
    while chunk := data.recv(1 << 16):
        received += chunk
    assert received == b"p" * 300_000
    replies = [raw.reply()[:3] for _ in range(4)]
    assert replies[0] in (b"125", b"150") and replies[1:] == [b"226", b"200", b"257"]
    raw.close()
    data.close()


def _replies(client: ftplib.FTP, commands: list[str]) -> list[str]:
    """Each command's reply, refusals included."""
    replies = []
    for command in commands:
        try:
            replies.append(client.sendcmd(command))
        except ftplib.error_perm as error:
            replies.append(str(error))
    return replies


def test_rfc_775_x_commands_answer_as_their_rfc_959_names(ftp_server):
    """XMKD, XCWD, XPWD, XCUP and XRMD (Windows ftp.exe) are MKD, CWD, PWD, CDUP and RMD: same replies, same checks."""
    client = ftp_server.client()
    rfc_959 = _replies(client, ["MKD x-names", "CWD x-names", "PWD", "CDUP", "PWD", "MKD x-names", "RMD x-names", "RMD x-names"])
    rfc_775 = _replies(client, ["XMKD x-names", "XCWD x-names", "XPWD", "XCUP", "XPWD", "XMKD x-names", "XRMD x-names", "XRMD x-names"])
    assert rfc_775 == rfc_959
    assert rfc_775[:3] == ['257 "/x-names" created.', "250 Requested File Action Completed OK", '257 "/x-names" is the current folder.']
    assert rfc_775[5].startswith("550") and rfc_775[7].startswith("550")
    assert not any(line.strip().startswith("X") for line in client.sendcmd("FEAT").splitlines())
    help_names = _replies(client, ["HELP"])[0].split()  # the command list has them, FEAT does not
    assert {"XPWD", "XCWD", "XCUP", "XMKD", "XRMD"} <= set(help_names)
    client.quit()
    reader = ftp_server.client("reader", "reader-pass")
    assert _replies(reader, ["XMKD x-refused"]) == _replies(reader, ["MKD x-refused"])
    assert _replies(reader, ["XMKD x-refused"])[0].startswith("550 /x-refused: Permission denied")
    reader.quit()
    assert not (ftp_server.home("reader") / "x-refused").exists()


def test_utf8_file_names_round_trip(ftp_server):
    """Names with é and 日本 are stored as UTF-8 on disk and listed and read back unchanged."""
    client = ftp_server.client()
    assert client.mkd("日本") == "/日本"
    upload(client, "日本/café.txt", "déjà vu".encode())
    assert (ftp_server.home("alice") / "日本" / "café.txt").read_bytes() == "déjà vu".encode()
    assert client.nlst("日本") == ["café.txt"]
    client.cwd("日本")
    assert client.pwd() == "/日本"
    assert download(client, "café.txt") == "déjà vu".encode()
    assert listing(client)[0].endswith(" café.txt")
    client.quit()


# -- permissions -------------------------------------------------------------------------


def test_read_only_account_can_read_and_list(ftp_server):
    """An account in a group with allow-read and allow-list downloads and lists."""
    (ftp_server.home("reader") / "notice.txt").write_bytes(b"read me")
    client = ftp_server.client("reader", "reader-pass")
    assert download(client, "notice.txt") == b"read me"
    assert "notice.txt" in client.nlst()
    client.quit()


def test_mlsd_perm_shows_what_a_read_only_account_may_do(ftp_server):
    """perm follows the group's permissions: reading and listing only."""
    (ftp_server.home("reader") / "shown.txt").write_bytes(b"r")
    (ftp_server.home("reader") / "shown-folder").mkdir(exist_ok=True)
    client = ftp_server.client("reader", "reader-pass")
    perms = {name: facts["perm"] for name, facts in client.mlsd()}
    assert perms["shown.txt"] == "r" and perms["shown-folder"] == "el"
    client.quit()


def test_read_only_account_cannot_store_delete_or_make_folders(ftp_server):
    """STOR, APPE, DELE, MKD, RMD and RNTO are "550 Permission denied" without the permissions."""
    home = ftp_server.home("reader")
    (home / "keep.txt").write_bytes(b"keep")
    (home / "folder").mkdir(exist_ok=True)
    client = ftp_server.client("reader", "reader-pass")
    for command in ("STOR", "APPE"):
        with pytest.raises(ftplib.error_perm, match="^550 .*Permission denied"):
            upload(client, "new.txt", b"x", command=command)
    with pytest.raises(ftplib.error_perm, match="^550 .*Permission denied"):
        client.delete("keep.txt")
    with pytest.raises(ftplib.error_perm, match="^550 .*Permission denied"):
        client.mkd("newfolder")
    with pytest.raises(ftplib.error_perm, match="^550 .*Permission denied"):
        client.rmd("folder")
    with pytest.raises(ftplib.error_perm, match="^550 .*Permission denied"):
        client.rename("keep.txt", "moved.txt")
    with pytest.raises(ftplib.error_perm, match="^550 .*Permission denied"):
        client.sendcmd("MFMT 20000101000000 keep.txt")
    assert client.voidcmd("NOOP").startswith("200")
    client.quit()
    assert not (home / "new.txt").exists() and not (home / "newfolder").exists()
    assert (home / "keep.txt").read_bytes() == b"keep" and (home / "folder").is_dir()


# -- logins and the audit log ------------------------------------------------------------


def _failed_login(ftp_server, username: str, password: str) -> str:
    client = ftplib.FTP(timeout=TIMEOUT, encoding="utf-8")
    client.connect("127.0.0.1", ftp_server.port)
    with pytest.raises(ftplib.error_perm) as raised:
        client.login(username, password)
    client.close()
    return str(raised.value)


def _audited_failure(ftp_server, username: str) -> dict:
    return ftp_server.wait_for_audit(
        lambda event: event["event"] == "authentication"
        and event["username"] == username
        and event["outcome"] == "failure"
        and event["service"] == "ftp-test"
    )


def test_wrong_password_is_530_and_audited_as_invalid_password(ftp_server):
    """A wrong password answers a plain "530 Login failed." and the audit says invalid-password."""
    assert _failed_login(ftp_server, "alice", "not-alice-pass") == "530 Login failed."
    event = _audited_failure(ftp_server, "alice")
    assert event["reason"] == "invalid-password"
    assert event["protocol"] == "ftp"
    assert event["peer"] == "127.0.0.1"
    assert "not-alice-pass" not in (ftp_server.folder / "audit.jsonl").read_text()


def test_unknown_user_is_530_and_audited_as_unknown_user(ftp_server):
    """A name no method knows answers 530 and the audit says unknown-user."""
    assert _failed_login(ftp_server, "nobody-here", "whatever") == "530 Login failed."
    assert _audited_failure(ftp_server, "nobody-here")["reason"] == "unknown-user"


def test_disabled_account_is_530_and_audited_as_account_disabled(ftp_server):
    """A disabled account cannot log in even with its password; the audit says account-disabled."""
    assert _failed_login(ftp_server, "dave", "dave-pass") == "530 Login failed."
    assert _audited_failure(ftp_server, "dave")["reason"] == "account-disabled"


def test_empty_password_is_530_and_audited_as_empty_password(ftp_server):
    """An empty password is refused before any method runs; the audit says empty-password."""
    assert _failed_login(ftp_server, "carol", "") == "530 Login failed."
    assert _audited_failure(ftp_server, "carol")["reason"] == "empty-password"


def test_anonymous_is_just_an_unknown_name(ftp_server):
    """USER anonymous has no guest login: it goes through the chain and fails as unknown-user."""
    raw = RawControl(ftp_server.port)
    assert raw.command(b"USER anonymous").startswith(b"331 ")
    assert raw.command(b"PASS guest@example.com") == b"530 Login failed."
    assert raw.command(b"PWD").startswith(b"530 ")
    raw.close()
    assert _audited_failure(ftp_server, "anonymous")["reason"] == "unknown-user"


def test_commands_before_login_are_refused(ftp_server):
    """Without a login, file commands answer 530 and nothing is read."""
    raw = RawControl(ftp_server.port)
    assert raw.command(b"RETR /etc/passwd").startswith(b"530 ")
    assert raw.command(b"LIST").startswith(b"530 ")
    assert raw.command(b"PASS x").startswith(b"503 ")
    raw.close()


def test_session_start_and_end_are_audited_when_the_client_disappears(ftp_server):
    """A login records session-start; dropping the TCP connection without QUIT records session-end."""
    ended = _session_ends(ftp_server, "carol")
    client = ftp_server.client("carol", "carol-pass")
    start = ftp_server.wait_for_audit(lambda e: e["event"] == "session-start" and e["username"] == "carol")
    assert start["service"] == "ftp-test" and start["protocol"] == "ftp"
    assert start["home_folder"] == str(ftp_server.homes / "carol")
    assert _session_ends(ftp_server, "carol") == ended
    client.close()  # no QUIT: the socket just goes away
    assert _next_session_end(ftp_server, "carol", ended)["reason"] == "connection-closed"


def test_an_account_with_an_sftpplus_password_hash_logs_in(ftp_server):
    """An [accounts/..] section copied from SFTPPlus, with its SHA-crypt ($5$) hash, works unchanged."""
    ftp_server.client("migrated", "SFTPPlus-pass").quit()
    with pytest.raises(ftplib.error_perm, match="^530 "):
        ftp_server.client("migrated", "SFTPPlus-pass ")


def test_quit_ends_the_session_with_reason_logout(ftp_server):
    ended = _session_ends(ftp_server, "alice")
    ftp_server.client("alice", "alice-pass").quit()
    assert _next_session_end(ftp_server, "alice", ended)["reason"] == "logout"


def test_an_idle_session_ends_with_reason_idle_timeout(ftp_server):
    """A logged-in session that sends nothing for idle_connection_timeout (1 s) gets 421; its session-end says why."""
    ended = _session_ends(ftp_server, "carol")
    client = ftp_server.client("carol", "carol-pass", port=ftp_server.idle_port)
    with pytest.raises(ftplib.error_temp, match="^421 No activity"):
        client.getresp()  # the 421 the server sends after a second of silence
    assert _next_session_end(ftp_server, "carol", ended)["reason"] == "idle-timeout"
    client.close()


def _session_ends(ftp_server, username: str) -> int:
    return sum(1 for e in ftp_server.audit_events() if e["event"] == "session-end" and e["username"] == username)


def _next_session_end(ftp_server, username: str, already: int) -> dict:
    """The first session-end of ``username`` after the ``already`` ones seen before."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        ends = [e for e in ftp_server.audit_events() if e["event"] == "session-end" and e["username"] == username]
        if len(ends) > already:
            return ends[already]
        assert time.monotonic() < deadline, ftp_server.audit_events()[-5:]
        time.sleep(0.05)


# -- the jail ----------------------------------------------------------------------------


def test_cd_above_the_home_folder_stays_at_root(ftp_server):
    """CWD ../.. from / stays in the home folder: PWD is still "/" and the listing is the home's."""
    (ftp_server.home("alice") / "marker-in-home").write_bytes(b"")
    client = ftp_server.client()
    try:
        client.cwd("../..")
    except ftplib.error_perm as error:
        assert str(error).startswith("550")
    assert client.pwd() == "/"
    assert "marker-in-home" in client.nlst()
    client.cwd("/")
    client.sendcmd("CDUP")
    assert client.pwd() == "/"
    client.quit()


def test_absolute_and_climbing_paths_cannot_read_system_files(ftp_server):
    """RETR /etc/passwd and ../../../etc/passwd are 550: absolute names are inside the home."""
    client = ftp_server.client()
    for path in ("/etc/passwd", "../../../../etc/passwd", "/../../etc/passwd"):
        with pytest.raises(ftplib.error_perm, match="^550"):
            download(client, path)
    with pytest.raises(ftplib.error_perm, match="^550"):
        client.cwd("/etc")
    assert client.pwd() == "/"
    client.quit()


def test_symlink_to_outside_is_invisible_and_unusable(ftp_server):
    """A symlink to /etc planted in the home is not listed, and RETR, LIST, CWD through it fail."""
    home = ftp_server.home("alice")
    link = home / "etc-link"
    if not link.is_symlink():
        link.symlink_to("/etc")
    client = ftp_server.client()
    with pytest.raises(ftplib.error_perm, match="^550"):
        download(client, "etc-link/passwd")
    with pytest.raises(ftplib.error_perm, match="^550"):
        listing(client, "etc-link")
    with pytest.raises(ftplib.error_perm, match="^550"):
        client.cwd("etc-link")
    with pytest.raises(ftplib.error_perm, match="^550"):
        client.size("etc-link/passwd")
    assert not any("etc-link" in line for line in listing(client))
    assert "etc-link" not in client.nlst()
    assert client.pwd() == "/"
    client.quit()


def test_symlink_inside_the_home_folder_works(ftp_server):
    """A symlink that points to a folder inside the home can be listed and read through."""
    home = ftp_server.home("alice")
    (home / "real").mkdir(exist_ok=True)
    (home / "real" / "data.txt").write_bytes(b"inside")
    link = home / "shortcut"
    if not link.is_symlink():
        link.symlink_to(home / "real")
    client = ftp_server.client()
    assert download(client, "shortcut/data.txt") == b"inside"
    assert client.nlst("shortcut") == ["data.txt"]
    assert "shortcut" in client.nlst()
    client.quit()


def test_a_link_to_a_file_is_listed_under_its_own_name(ftp_server):
    """LIST, NLST and MLST of a link to a file name the link (as ``ls -l link``), with the file's size."""
    home = ftp_server.home("alice")
    (home / "small.bin").write_bytes(b"12345")
    if not os.path.lexists(home / "in-file"):
        os.symlink("small.bin", home / "in-file")
    client = ftp_server.client()
    (line,) = listing(client, "in-file")
    assert line.split()[4] == "5" and line.endswith(" in-file")
    assert client.nlst("in-file") == ["in-file"]
    assert client.sendcmd("MLST in-file").splitlines()[1].endswith(" /in-file")
    client.quit()


def test_each_change_and_refusal_is_a_server_log_line(ftp_server):
    """STOR, MKD, RNFR/RNTO, DELE, RMD and MFMT leave a line naming the session, the change and the path, as SFTP's do."""
    client = ftp_server.client()
    upload(client, "logged.txt", b"logged")
    client.mkd("logged-dir")
    client.rename("logged.txt", "logged-dir/renamed.txt")
    client.sendcmd("MFMT 20200101000000 logged-dir/renamed.txt")
    client.delete("logged-dir/renamed.txt")
    client.rmd("logged-dir")
    with pytest.raises(ftplib.error_perm):
        client.delete("logged-missing.txt")
    client.quit()
    reader = ftp_server.client("reader", "reader-pass")
    with pytest.raises(ftplib.error_perm):
        upload(reader, "logged-by-reader.txt", b"no")
    reader.quit()
    expected = [
        "ftp alice: upload to /logged.txt",
        "ftp alice: make folder /logged-dir",
        "ftp alice: rename /logged.txt -> /logged-dir/renamed.txt",
        "ftp alice: set times /logged-dir/renamed.txt",
        "ftp alice: remove /logged-dir/renamed.txt",
        "ftp alice: remove folder /logged-dir",
        "ftp alice: remove /logged-missing.txt refused: no such file or folder",
        "ftp reader: upload to /logged-by-reader.txt refused: permission denied: allow-write is not granted",
    ]
    log = ftp_server.process.wait_for_log(lambda text: all(line in text for line in expected))
    positions = [log.index(line) for line in expected]
    assert positions == sorted(positions)


def _tree_with_links(home: Path, name: str) -> None:
    """``name/`` holding a file, a link to a sibling folder and a link to the home; the sibling has a file."""
    shutil.rmtree(home / name, ignore_errors=True)
    shutil.rmtree(home / f"{name}-kept", ignore_errors=True)
    (home / name).mkdir()
    (home / f"{name}-kept").mkdir()
    (home / name / "own.txt").write_bytes(b"own")
    (home / f"{name}-kept" / "kept.txt").write_bytes(b"kept")
    os.symlink(home / f"{name}-kept", home / name / "to-sibling")  # a server path: shown in the session's terms
    os.symlink("..", home / name / "up")


def test_list_and_mlsd_show_a_symlink_as_a_link_to_its_target_in_the_session_s_terms(ftp_server):
    """``l... name -> target`` and ``type=OS.unix=slink:target``: never what it points to, never a server path."""
    home = ftp_server.home("alice")
    _tree_with_links(home, "shown-links")
    client = ftp_server.client()
    lines = {line.split()[8]: line for line in listing(client, "shown-links")}
    assert lines["to-sibling"].startswith("lrwxrwxrwx") and lines["to-sibling"].endswith(" to-sibling -> ../shown-links-kept")
    assert lines["up"].startswith("lrwxrwxrwx") and lines["up"].endswith(" up -> ..")
    assert lines["own.txt"].startswith("-rw")
    facts = dict(client.mlsd("shown-links", facts=["type", "size"]))
    assert facts["to-sibling"] == {"type": "OS.unix=slink:../shown-links-kept"}
    assert facts["up"] == {"type": "OS.unix=slink:.."}
    assert facts["own.txt"] == {"type": "file", "size": "3"}
    assert str(home) not in "".join(lines.values())
    assert download(client, "shown-links/to-sibling/kept.txt") == b"kept"  # used, a link still leads there
    client.quit()


@pytest.mark.parametrize("listing_command", ["MLSD", "LIST"])
def test_lftp_rm_r_deletes_links_not_what_they_point_to(ftp_server, lftp, tmp_path, listing_command):
    """``rm -r`` of a folder holding links to a sibling folder and to the home removes the links, nothing behind them.

    When links were listed as what they point to, lftp went through them:
    it deleted the sibling's files, and through ``up`` it looped until its
    paths grew past 4 KB, deleting nearly everything in the home.
    """
    home = ftp_server.home("alice")
    name = f"rm-r-{listing_command.lower()}"
    _tree_with_links(home, name)
    (home / f"{name}-bystander.txt").write_bytes(b"bystander")
    use_mlsd = "yes" if listing_command == "MLSD" else "no"
    result = run_lftp(lftp, ftp_server, f"set ftp:use-mlsd {use_mlsd}; debug 5; rm -r {name}", tmp_path)
    log = result.stderr.decode(errors="replace")
    assert result.returncode == 0, log
    assert f"---> {listing_command}" in log, log
    assert not os.path.lexists(home / name)
    assert (home / f"{name}-kept" / "kept.txt").read_bytes() == b"kept"
    assert (home / f"{name}-bystander.txt").read_bytes() == b"bystander"


def test_dele_and_rename_of_a_symlink_act_on_the_link_not_the_file(ftp_server):
    """DELE of a link to a file in the home deletes the link, RNFR/RNTO renames the link; the file stays."""
    home = ftp_server.home("alice")
    (home / "linked.txt").write_bytes(b"linked")
    for name in ("doomed-link", "moving-link", "moved-link"):
        if os.path.lexists(home / name):
            os.remove(home / name)
    os.symlink(home / "linked.txt", home / "doomed-link")
    os.symlink("linked.txt", home / "moving-link")
    client = ftp_server.client()
    assert client.delete("doomed-link").startswith("250")
    assert client.rename("moving-link", "moved-link").startswith("250")
    client.quit()
    assert not os.path.lexists(home / "doomed-link") and not os.path.lexists(home / "moving-link")
    assert os.readlink(home / "moved-link") == "linked.txt"
    assert (home / "linked.txt").read_bytes() == b"linked"


# -- bad input ----------------------------------------------------------------------------


def test_commands_between_pasv_and_the_data_connection_are_answered_in_order(ftp_server):
    """After PASV the client may send TYPE and NOOP before connecting: each is answered at once, in order.

    Before, the server waited for the data connection (up to its 10 s
    timeout) and then sent an unsolicited 425, so every later reply was one
    command late.
    """
    raw = RawControl(ftp_server.port)
    raw.command(b"USER alice")
    assert raw.command(b"PASS alice-pass").startswith(b"230")
    (ftp_server.home("alice") / "pasv-order.txt").write_bytes(b"in order")
    host, port = ftplib.parse227(raw.command(b"PASV").decode())
    raw.sock.settimeout(3)  # the old behaviour answered only after 10 s
    assert raw.command(b"TYPE I").startswith(b"200")
    assert raw.command(b"NOOP").startswith(b"200")
    raw.sock.settimeout(TIMEOUT)
    raw.send(b"RETR pasv-order.txt\r\n")  # sent before connecting: the transfer waits for the connection
    data = socket.create_connection((host, port), timeout=TIMEOUT)
    assert raw.reply()[:3] in (b"125", b"150")
    received = b""
    while chunk := data.recv(65536):
        received += chunk
    data.close()
    assert received == b"in order"
    assert raw.reply().startswith(b"226")
    assert raw.command(b"NOOP").startswith(b"200")
    raw.close()


@pytest.mark.parametrize("name", ["kept.bin", "never-made.bin"])
def test_an_upload_cut_off_before_its_first_byte_changes_no_file(ftp_server, name):
    """QA, session 27: a data connection reset after 150 (a cancelled upload) emptied the file it was to replace."""
    home = ftp_server.home("alice")
    if name == "kept.bin":
        (home / name).write_bytes(b"precious")
    raw = RawControl(ftp_server.port)
    assert raw.command(b"USER alice").startswith(b"331")
    assert raw.command(b"PASS alice-pass").startswith(b"230")
    host, port = ftplib.parse227(raw.command(b"PASV").decode())
    data = socket.create_connection((host, port), timeout=TIMEOUT)
    assert raw.command(b"STOR " + name.encode())[:3] in (b"125", b"150")
    data.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    data.close()  # a reset, not an end of file
    assert raw.reply().startswith(b"426")
    if name == "kept.bin":
        assert (home / name).read_bytes() == b"precious"
    else:
        assert not (home / name).exists()
    assert raw.command(b"NOOP").startswith(b"200")
    raw.close()
    outcome = "the file is as it was" if name == "kept.bin" else "the file it created is removed"
    ftp_server.process.wait_for_log(lambda text: f"ftp alice: upload to /{name} got no data: {outcome}" in text)


def test_malformed_commands_get_errors_and_the_connection_goes_on(ftp_server):
    """Unknown, malformed and argument-less commands get 5xx replies; the session keeps working."""
    raw = RawControl(ftp_server.port)
    assert raw.command(b"USER alice").startswith(b"331")
    assert raw.command(b"PASS alice-pass").startswith(b"230")
    replies = {
        line: raw.command(line)
        for line in (
            b"XYZZY",
            b"",
            b"RETR",
            b"PORT garbage",
            b"PORT 1,2,3",
            b"EPRT |9|x|y|",
            b"EPRT",
            b"EPSV 7",
            b"TYPE Q",
            b"TYPE ",
            b"NOOP extra",
            b"RNTO nothing",
            b"OPTS FOO BAR",
            b"\xff\xfe\xfd",
            b"MKD bad\xffname",
            b"SIZE bad\xffname",
            b"DELE x\x00y",
        )
    }
    for line, reply in replies.items():
        assert reply[:1] == b"5", (line, reply)
    (ftp_server.home("alice") / "rename-dropped.txt").write_bytes(b"x")  # its own file: runs alone with -k too
    assert raw.command(b"RNFR rename-dropped.txt").startswith(b"350")
    assert raw.command(b"PWD").startswith(b"503")  # RNTO was required: the rename is dropped
    assert raw.command(b"NOOP").startswith(b"200")
    assert raw.command(b"PWD") == b'257 "/" is the current folder.'
    raw.close()
    client = ftp_server.client()
    assert client.pwd() == "/"
    client.quit()


def test_non_utf8_username_fails_the_login_only(ftp_server):
    """A USER with bytes that are not UTF-8 is a failed login (invalid-username), not a crash."""
    raw = RawControl(ftp_server.port)
    assert raw.command(b"USER al\xffice").startswith(b"331")
    assert raw.command(b"PASS alice-pass") == b"530 Login failed."
    assert raw.command(b"USER alice").startswith(b"331")
    assert raw.command(b"PASS alice-pass").startswith(b"230")
    raw.close()
    event = ftp_server.wait_for_audit(
        lambda e: e["event"] == "authentication" and e["username"].startswith("al") and e["username"] != "alice"
    )
    assert event["reason"] == "invalid-username"
    assert event["username"] == "al\\xffice"  # the byte as text: every reader of the audit log can show it


def test_a_100_kb_username_is_refused_and_the_service_survives(ftp_server):
    """A 100 KB command line gets a 500 (or the connection closed); the next client logs in fine."""
    raw = RawControl(ftp_server.port)
    raw.send(b"USER " + b"a" * 100_000 + b"\r\nPASS x\r\n")
    try:
        reply = raw.reply()
    except (ConnectionError, OSError):
        reply = b"(closed)"
    assert reply.startswith(b"500") or reply == b"(closed)"
    raw.close()
    client = ftp_server.client()
    assert client.pwd() == "/"
    client.quit()


def test_a_long_username_under_the_line_limit_is_audited_as_invalid(ftp_server):
    """A 10 KB username reaches the chain, answers 530 and is audited as invalid-username."""
    name = "b" * 10_000
    assert _failed_login(ftp_server, name, "x") == "530 Login failed."
    event = ftp_server.wait_for_audit(
        lambda e: e["event"] == "authentication" and e["username"].startswith("bbbbbbbb")
    )
    assert event["reason"] == "invalid-username"
    assert len(event["username"]) < 400  # the audit log shortens it


def test_idle_connection_is_closed_after_the_timeout(ftp_server):
    """With idle_connection_timeout = 1, a silent connection gets 421 and is closed."""
    raw = RawControl(ftp_server.idle_port)
    started = time.monotonic()
    assert raw.reply().startswith(b"421")
    assert time.monotonic() - started < 5
    assert raw.sock.recv(100) == b""
    raw.close()


# -- lftp ---------------------------------------------------------------------------------


@pytest.fixture
def lftp():
    path = shutil.which("lftp")
    if path is None:
        if _integration_required():
            pytest.fail("SFTPAUTH_REQUIRE_INTEGRATION=1 but lftp is not installed", pytrace=False)
        pytest.skip("lftp is not installed")
    return path


def run_lftp(lftp: str, ftp_server, commands: str, cwd: Path, user: str = "alice,alice-pass"):
    script = "set ftp:ssl-allow no; set net:max-retries 1; set net:timeout 10; set cmd:fail-exit yes; " + commands
    return subprocess.run(
        [lftp, "-u", user, "-p", str(ftp_server.port), "-e", script + "; bye", "127.0.0.1"],
        cwd=cwd,
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_lftp_uploads_lists_and_downloads(ftp_server, lftp, tmp_path):
    """lftp puts a file, lists it and gets it back identical."""
    data = random.Random(7).randbytes(300_000)
    (tmp_path / "lftp-up.bin").write_bytes(data)
    result = run_lftp(
        lftp, ftp_server, "mkdir lftp-dir; cd lftp-dir; put lftp-up.bin; ls; get lftp-up.bin -o lftp-down.bin", tmp_path
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"lftp-up.bin" in result.stdout
    assert (tmp_path / "lftp-down.bin").read_bytes() == data
    assert (ftp_server.home("alice") / "lftp-dir" / "lftp-up.bin").read_bytes() == data


def test_lftp_continues_interrupted_transfers(ftp_server, lftp, tmp_path):
    """lftp's get -c and put -c resume from what is already there (REST), and the results are whole."""
    data = random.Random(8).randbytes(400_000)
    (ftp_server.home("alice") / "lftp-resume-down.bin").write_bytes(data)
    (tmp_path / "lftp-resume-down.bin").write_bytes(data[:150_000])  # a download cut off half way
    (tmp_path / "lftp-resume-up.bin").write_bytes(data)
    (ftp_server.home("alice") / "lftp-resume-up.bin").write_bytes(data[:250_000])  # an upload cut off
    result = run_lftp(lftp, ftp_server, "debug 5; get -c lftp-resume-down.bin; put -c lftp-resume-up.bin", tmp_path)
    log = result.stderr.decode(errors="replace")
    assert result.returncode == 0, log
    assert (tmp_path / "lftp-resume-down.bin").read_bytes() == data
    assert (ftp_server.home("alice") / "lftp-resume-up.bin").read_bytes() == data
    assert "350 Restarting at 150000" in log and "350 Restarting at 250000" in log, log  # resumed, not sent in full


def test_lftp_mirror_uses_mlsd_and_keeps_exact_times(ftp_server, lftp, tmp_path):
    """lftp's mirror reads the folder with MLSD and gives the copies the server's modification times."""
    folder = ftp_server.home("alice") / "mirrored"
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "one.txt").write_bytes(b"one")
    (folder / "sub" / "two.txt").write_bytes(b"two")
    os.utime(folder / "one.txt", (0, 1_600_000_007))
    os.utime(folder / "sub" / "two.txt", (0, 1_500_000_009))
    result = run_lftp(lftp, ftp_server, "debug 5; mirror mirrored local-copy", tmp_path)
    log = result.stderr.decode(errors="replace")
    assert result.returncode == 0, log
    assert "MLSD" in log, log
    assert (tmp_path / "local-copy" / "sub" / "two.txt").read_bytes() == b"two"
    assert os.stat(tmp_path / "local-copy" / "one.txt").st_mtime == 1_600_000_007
    assert os.stat(tmp_path / "local-copy" / "sub" / "two.txt").st_mtime == 1_500_000_009


def test_lftp_with_a_wrong_password_fails(ftp_server, lftp, tmp_path):
    """lftp reports the login failure and exits non-zero."""
    result = run_lftp(lftp, ftp_server, "ls", tmp_path, user="alice,wrong-pass")
    assert result.returncode != 0
    assert b"Login failed" in result.stderr


def test_lftp_read_only_account_cannot_put(ftp_server, lftp, tmp_path):
    """lftp as the read-only account fails to upload, and nothing is written."""
    (tmp_path / "nope.txt").write_bytes(b"nope")
    result = run_lftp(lftp, ftp_server, "put nope.txt", tmp_path, user="reader,reader-pass")
    assert result.returncode != 0
    assert not (ftp_server.home("reader") / "nope.txt").exists()


# -- shutdown -----------------------------------------------------------------------------


def test_sigterm_stops_the_process_with_status_zero(tmp_path):
    """A separate server logs a session in and out, then exits 0 on SIGTERM with both events audited."""
    server = FTPTestServer(tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        server.process.start()
    try:
        client = server.client()
        upload(client, "x.txt", b"x")
        client.quit()
        server.wait_for_audit(lambda e: e["event"] == "session-end" and e["username"] == "alice")
    finally:
        status = server.process.stop()
    assert status == 0
    events = [event["event"] for event in server.audit_events()]
    assert events.count("session-start") == 1 and events.count("session-end") == 1
    assert events.index("session-start") < events.index("session-end")
    assert "Traceback" not in server.process.log_text()


def test_existing_names_that_are_not_utf8_stay_usable(ftp_server):
    """A file made on the server with a Latin-1 name is listed with its bytes, downloaded, renamed and deleted; a new such name is 553."""
    home = os.fsencode(ftp_server.home("alice"))
    stem = f"latin1-{time.monotonic_ns()}"
    with open(os.path.join(home, stem.encode() + b"-caf\xe9.txt"), "wb") as made:
        made.write(b"old file")
    with open(os.path.join(home, stem.encode() + b"-d\xe9j\xe0.txt"), "wb") as made:
        made.write(b"to delete")
    client = ftp_server.client()
    client.encoding = "latin-1"  # each character one byte: the names' own bytes go on the wire
    assert f"{stem}-caf\xe9.txt" in client.nlst()
    assert download(client, f"{stem}-caf\xe9.txt") == b"old file"
    control = ftplib.FTP(timeout=TIMEOUT, encoding="latin-1")  # replies on the control connection too
    control.connect("127.0.0.1", ftp_server.port)
    control.login("alice", "alice-pass")
    mlst = control.sendcmd(f"MLST {stem}-caf\xe9.txt").splitlines()  # the name's own bytes, not "?"
    assert mlst[0] == f"250-Listing /{stem}-caf\xe9.txt" and mlst[1].endswith(f"; /{stem}-caf\xe9.txt")
    control.quit()
    client.rename(f"{stem}-caf\xe9.txt", f"{stem}-caf\xc3\xa9.txt")  # to the UTF-8 name
    client.delete(f"{stem}-d\xe9j\xe0.txt")
    with pytest.raises(ftplib.error_perm, match="^553 File name not allowed: the name is not valid UTF-8"):
        upload(client, f"{stem}-new\xff.txt", b"new")
    with pytest.raises(ftplib.error_perm, match="^553"):
        client.mkd(f"{stem}-folder\xff")
    client.quit()
    assert sorted(name for name in os.listdir(home) if name.startswith(stem.encode())) == [
        stem.encode() + b"-caf\xc3\xa9.txt"
    ]


def test_a_folder_swapped_for_a_link_while_a_client_uses_it_never_leads_outside(ftp_server, tmp_path):
    """SPEC §4 under a race: another local process swaps a folder of the home for a link outside, and back."""
    home = ftp_server.home("carol")
    outside = tmp_path / "outside"
    jail_race.prepare(home, outside)
    client = ftp_server.client("carol", "carol-pass")
    downloads, uploads = [], 0
    with jail_race.swapping(home):
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                downloads.append(download(client, "sw/secret.txt"))
            except (ftplib.error_perm, ftplib.error_temp):
                pass  # the folder was missing or a link: refused
            try:
                upload(client, f"sw/planted-{uploads}.txt", b"planted")
                uploads += 1
            except (ftplib.error_perm, ftplib.error_temp):
                pass
    client.quit()
    assert jail_race.OUTSIDE not in downloads
    assert jail_race.INSIDE in downloads and uploads  # the swaps left room for some to work
    assert jail_race.outside_unchanged(outside)


def test_a_second_upload_to_a_file_being_uploaded_is_told_the_file_is_busy(ftp_server):
    """Two STORs into one file at once would interleave their bytes: the second gets 450 and changes nothing."""
    first, second = ftp_server.client(), ftp_server.client()
    name = f"busy-{time.monotonic_ns()}.bin"
    data = first.transfercmd(f"STOR {name}")  # the first upload is under way: its data connection is open
    data.sendall(b"first " * 1000)
    with pytest.raises(ftplib.error_temp, match=r"^450 .*busy"):
        upload(second, name, b"second")
    data.sendall(b"end")
    data.close()
    assert first.voidresp().startswith("226")
    assert (ftp_server.home("alice") / name).read_bytes() == b"first " * 1000 + b"end"
    upload(second, name, b"second")  # once the first is over, the file is free
    assert (ftp_server.home("alice") / name).read_bytes() == b"second"
    first.quit()
    second.quit()
