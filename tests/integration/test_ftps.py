"""FTPS of a real ``twistd -n sftpauth``: explicit (AUTH TLS) and implicit, with real clients.

One server for the module, its certificate signed by a throw-away CA
(tls_certs.TestPKI) that the clients trust:

* ``ftps``: ``type = ftp`` with the defaults: TLS required on the control
  connection (no USER before AUTH TLS), PROT P required, and each data
  connection must resume its control connection's TLS session;
* ``ftpsi``: ``type = ftpsi``, TLS from the first byte;
* ``lenient``: ``type = ftp`` with a certificate but every ``ftps_*`` policy
  off, so plain FTP, PROT C and clients that do not resume sessions work:
  the control experiment of the packet captures.

Proof that file data never crosses in clear: Python's data sockets are
checked to be TLS sockets that resumed the control session, and the
transfers of lftp and curl run under a raw capture of the loopback
interface (AF_PACKET, root only) in which a marker of the file, and the
password, must never appear, while the same capture does see them in a
plain FTP transfer.
"""

from __future__ import annotations

import contextlib
import ftplib
import io
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from sftpauth.auth.passwords import hash_password

from .disk import small_file_system
from .server import SftpauthServer, free_port, read_audit
from .sftp_fixtures import integration_required, plugin_on_python_path
from .tls_certs import TestPKI

PASSWORD = "ftps-Secret-7f3a9c"
TIMEOUT = 10
MARKER = os.urandom(12).hex().encode("ascii")  # 24 characters no other traffic contains


def pem_with_key(pair, path: Path) -> Path:
    """One PEM file with the certificate and its key, as ``ssl_certificate`` wants it."""
    path.write_bytes(pair.certificate.read_bytes() + pair.key.read_bytes())
    path.chmod(0o600)
    return path


def marked_file(size: int = 200_000) -> bytes:
    """Random-looking content with MARKER in every line: any clear-text copy of it shows."""
    rng = random.Random(size)
    lines = []
    while sum(map(len, lines)) < size:
        lines.append(MARKER + b" " + rng.randbytes(24).hex().encode("ascii") + b"\n")
    return b"".join(lines)


class FTPSSite:
    def __init__(self, folder: Path):
        self.folder = folder
        self.pki = TestPKI(folder / "pki")
        self.certificate = pem_with_key(self.pki.good, folder / "server.pem")
        self.homes = folder / "homes"
        self.explicit_port, self.implicit_port, self.lenient_port = free_port(), free_port(), free_port()
        first = random.randrange(41000, 59000)
        self.passive = (first, first + 59)
        self.server = SftpauthServer(
            folder, self.config(), ports=(self.explicit_port, self.implicit_port, self.lenient_port)
        )

    def config(self) -> str:
        first, last = self.passive
        return f"""
[server]
audit_log = {self.folder / "audit.jsonl"}

[services/ftps]
type = ftp
port = {self.explicit_port}
ssl_certificate = {self.certificate}
passive_port_range = {first}-{first + 19}

[services/ftpsi]
type = ftpsi
port = {self.implicit_port}
ssl_certificate = {self.certificate}
passive_port_range = {first + 20}-{first + 39}

[services/lenient]
type = ftp
port = {self.lenient_port}
ssl_certificate = {self.certificate}
ftps_force_secured_command_channel = no
ftps_force_secured_data_channel = no
ftps_require_session_reuse = no
passive_port_range = {first + 40}-{last}

[groups/DEFAULT_GROUP]
home_folder_path = {self.homes}
create_home_folder = yes

[accounts/alice]
password = {hash_password(PASSWORD)}
"""

    def home(self) -> Path:
        path = self.homes / "alice"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca_bundle))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The running server with the ftps, ftpsi and lenient services."""
    site = FTPSSite(tmp_path_factory.mktemp("ftps"))
    with plugin_on_python_path():
        site.server.start()
    try:
        yield site
    finally:
        status = site.server.stop()
    log = site.server.log_text()
    assert "Traceback" not in log, site.server.log_tail(200)
    assert status == 0


class SessionReusingFTP_TLS(ftplib.FTP_TLS):
    """ftplib.FTP_TLS that resumes the control session on data connections (as lftp, curl, FileZilla do).

    ``data_sockets`` says, for every data connection, whether it was TLS,
    its TLS version and whether it resumed the control session.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_sockets: list[tuple[bool, Optional[str], bool]] = []

    def ntransfercmd(self, cmd, rest=None):
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=self.sock.session)
        tls = isinstance(conn, ssl.SSLSocket)
        self.data_sockets.append((tls, conn.version() if tls else None, tls and conn.session_reused))
        return conn, size


def explicit_client(site: FTPSSite, cls=SessionReusingFTP_TLS, port: int = 0, **kwargs) -> ftplib.FTP_TLS:
    client = cls(context=site.context(), timeout=TIMEOUT, **kwargs)
    client.connect("127.0.0.1", port or site.explicit_port)
    client.auth()
    client.login("alice", PASSWORD)
    client.prot_p()
    return client


def download(client: ftplib.FTP, path: str) -> bytes:
    out = io.BytesIO()
    client.retrbinary(f"RETR {path}", out.write)
    return out.getvalue()


class RawControl:
    """A bare control connection (``port``) or one over an already connected socket, optionally upgraded to TLS."""

    def __init__(self, port: int = 0, sock: Optional[socket.socket] = None):
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buffer = b""
        self.greeting = self.reply()

    def reply(self) -> bytes:
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed; got {lines!r} {self.buffer!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line)
            if line[:3] == lines[0][:3] and line[3:4] == b" ":
                return b"\r\n".join(lines)

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def start_tls(self, context: ssl.SSLContext) -> None:
        assert self.command(b"AUTH TLS").startswith(b"234")
        self.sock = context.wrap_socket(self.sock, server_hostname="127.0.0.1")

    def close(self) -> None:
        self.sock.close()


class LoopbackCapture:
    """Every packet on the loopback interface while the block runs (AF_PACKET, needs root)."""

    def __init__(self):
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            self.sock.bind(("lo", 0))
        except (AttributeError, OSError) as error:
            message = f"cannot capture loopback packets (root and Linux needed): {error}"
            if integration_required():
                pytest.fail(f"SFTPAUTH_REQUIRE_INTEGRATION=1 but {message}", pytrace=False)
            pytest.skip(message)
        self.sock.settimeout(0.1)
        self.packets: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.packets.append(self.sock.recv(1 << 18))
            except socket.timeout:
                continue
            except OSError:
                return

    def __enter__(self) -> "LoopbackCapture":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.2)  # the last packets of the transfer
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def saw(self, needle: bytes) -> bool:
        return any(needle in packet for packet in self.packets) or needle in b"".join(self.packets)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if integration_required():
            pytest.fail(f"SFTPAUTH_REQUIRE_INTEGRATION=1 but {name} is not installed", pytrace=False)
        pytest.skip(f"{name} is not installed")
    return path


def run_lftp(site: FTPSSite, commands: str, cwd: Path, extra: str = "") -> subprocess.CompletedProcess:
    script = (
        f"set ssl:ca-file {site.pki.ca_bundle}; set ssl:verify-certificate yes; "
        "set ftp:ssl-force true; set ftp:ssl-protect-data true; "
        f"set net:max-retries 1; set net:timeout 10; set cmd:fail-exit yes; {extra}{commands}; bye"
    )
    return subprocess.run(
        [require_tool("lftp"), "-u", f"alice,{PASSWORD}", "-p", str(site.explicit_port), "-e", script, "127.0.0.1"],
        cwd=cwd,
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def run_curl(site: FTPSSite, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_tool("curl"), "-sS", "--max-time", "30", "--cacert", str(site.pki.ca_bundle), "-u", f"alice:{PASSWORD}", *arguments],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


# -- explicit FTPS: the protocol --------------------------------------------------------


def test_feat_lists_auth_tls_pbsz_and_prot(site):
    """FEAT before login advertises AUTH TLS, PBSZ and PROT on the explicit service."""
    raw = RawControl(site.explicit_port)
    features = raw.command(b"FEAT").decode().splitlines()
    assert {" AUTH TLS", " PBSZ", " PROT", " UTF8"} <= set(features)
    raw.close()


def test_user_before_auth_tls_is_refused_with_530(site):
    """With ftps_force_secured_command_channel (the default) USER in clear is 530 and PASS is 503."""
    raw = RawControl(site.explicit_port)
    reply = raw.command(b"USER alice")
    assert reply.startswith(b"530 ") and b"AUTH TLS" in reply
    assert raw.command(b"PASS " + PASSWORD.encode()).startswith(b"503")
    raw.close()


def test_commands_sent_in_clear_behind_auth_tls_close_the_connection(site):
    """Plain text pipelined behind AUTH TLS (command injection) is answered 421 and the connection closed, never 331."""
    raw = RawControl(site.explicit_port)
    raw.sock.sendall(b"AUTH TLS\r\nUSER alice\r\n")
    assert raw.reply().startswith(b"421")
    with pytest.raises((ConnectionError, OSError)):
        raw.reply()
    raw.close()


def test_pbsz_and_prot_need_tls_and_protection_is_enforced(site):
    """PBSZ before AUTH is 503; after login PASV before PROT P is 521, PROT C 534, PROT S 536, CCC 502."""
    raw = RawControl(site.explicit_port)
    assert raw.command(b"PBSZ 0").startswith(b"503")
    raw.start_tls(site.context())
    assert raw.command(b"PROT P").startswith(b"503")  # PBSZ first
    raw.command(b"USER alice")
    assert raw.command(b"PASS " + PASSWORD.encode()).startswith(b"230")
    assert raw.command(b"PASV").startswith(b"521")
    assert raw.command(b"EPSV").startswith(b"521")
    assert raw.command(b"PORT 127,0,0,1,200,1").startswith(b"521")
    assert raw.command(b"PBSZ 0") == b"200 PBSZ=0"
    assert raw.command(b"PROT C").startswith(b"534")
    assert raw.command(b"PROT S").startswith(b"536")
    assert raw.command(b"CCC").startswith(b"502")
    assert raw.command(b"PROT P").startswith(b"200")
    assert raw.command(b"PASV").startswith(b"227")
    raw.close()


def test_ftplib_prot_p_transfers_run_on_tls_data_sockets_resuming_the_session(site):
    """ftplib.FTP_TLS with prot_p(): upload, listing and download each use a TLS data socket that resumed the control session."""
    data = marked_file(50_000)
    client = explicit_client(site)
    assert client.storbinary("STOR python.bin", io.BytesIO(data)).startswith("226")
    assert "python.bin" in client.nlst()
    assert download(client, "python.bin") == data
    assert (site.home() / "python.bin").read_bytes() == data
    client.quit()
    assert len(client.data_sockets) == 3
    for tls, version, resumed in client.data_sockets:
        assert tls and version in ("TLSv1.2", "TLSv1.3") and resumed


def test_stat_of_a_big_folder_streams_over_the_tls_control_connection(site):
    """STAT PATH of 5,000 entries comes whole over TLS, twice on one session; a client leaving mid-reply harms nothing."""
    folder = site.home() / "stat-many"
    folder.mkdir(exist_ok=True)
    names = sorted(f"entry-{index:04d}-{'n' * 60}.txt" for index in range(5000))
    for name in names:
        (folder / name).touch()
    client = explicit_client(site)
    for _ in range(2):  # the second STAT also works: the first let go of the control connection
        lines = client.sendcmd("STAT stat-many").splitlines()
        assert lines[0] == "213-Status of /stat-many:" and lines[-1] == "213 End of status."
        assert [line.rsplit(" ", 1)[1] for line in lines[1:-1]] == names
        assert all(line.startswith(" -rw") for line in lines[1:-1])
    assert client.sendcmd("NOOP").startswith("200")
    client.sock.sendall(b"STAT stat-many\r\n")
    client.sock.close()  # gone before reading the reply (the server log must stay free of errors)
    again = explicit_client(site)
    assert again.sendcmd("STAT stat-many").splitlines()[-1] == "213 End of status."
    again.quit()


def test_ftplib_active_mode_with_prot_p(site):
    """An active (PORT) data connection under PROT P is TLS too, with the server as TLS server."""
    client = explicit_client(site)
    client.set_pasv(False)
    client.storbinary("STOR active.txt", io.BytesIO(b"active and private"))
    assert download(client, "active.txt") == b"active and private"
    client.quit()
    assert len(client.data_sockets) == 2
    assert all(tls and resumed for tls, version, resumed in client.data_sockets)


def _refused_transfer(client, transfer) -> str:
    """The reply to a transfer whose data connection the server refuses (pytest.fail if it succeeds)."""
    try:
        transfer()
    except ftplib.error_perm as error:  # the handshake looked complete to the client (TLS 1.3)
        return str(error)
    except (ssl.SSLError, OSError, EOFError):
        with pytest.raises(ftplib.error_perm) as answer:
            client.getresp()
        return str(answer.value)
    pytest.fail("the transfer succeeded without session reuse")


def test_data_connection_without_session_reuse_is_refused_with_522(site):
    """Stock ftplib (no session resumption) gets no file byte: its data handshake is refused and RETR answers 522."""
    (site.home() / "guarded.txt").write_bytes(MARKER)
    client = explicit_client(site, cls=ftplib.FTP_TLS)
    received = io.BytesIO()
    reply = _refused_transfer(client, lambda: client.retrbinary("RETR guarded.txt", received.write))
    assert reply.startswith("522 ") and "session" in reply
    assert MARKER not in received.getvalue()
    assert client.voidcmd("NOOP").startswith("200")
    client.close()


@pytest.mark.parametrize("command", ["STOR", "APPE"])
def test_an_upload_whose_data_connection_is_refused_changes_no_file(site, command):
    """QA, session 27: a refused STOR (its data connection without session reuse) had already emptied the file."""
    (site.home() / "kept.bin").write_bytes(MARKER)
    client = explicit_client(site, cls=ftplib.FTP_TLS)
    for name in ("kept.bin", "new.bin"):
        reply = _refused_transfer(client, lambda: client.storbinary(f"{command} {name}", io.BytesIO(b"replacement")))
        assert reply.startswith("522 ") and "session" in reply
    assert (site.home() / "kept.bin").read_bytes() == MARKER
    assert not (site.home() / "new.bin").exists()  # made by the refused upload's opening, then removed
    assert client.voidcmd("NOOP").startswith("200")
    client.close()


def test_data_connection_resuming_another_control_sessions_tls_is_refused(site):
    """A data connection that resumes the TLS session of another control connection (same user) gets nothing."""
    (site.home() / "theft.txt").write_bytes(MARKER * 100)
    victim = explicit_client(site)
    thief = explicit_client(site)
    host, port = ftplib.parse227(victim.sendcmd("PASV"))
    stolen = socket.create_connection((host, port), timeout=TIMEOUT)
    victim.sock.sendall(b"RETR theft.txt\r\n")
    assert victim.getresp().startswith("125")
    received = b""
    with pytest.raises((ssl.SSLError, OSError)):
        tls = thief.context.wrap_socket(stolen, server_hostname="127.0.0.1", session=thief.sock.session)
        while chunk := tls.recv(65536):
            received += chunk
        raise OSError("the server closed the data connection")
    assert MARKER not in received
    with pytest.raises(ftplib.error_perm, match="^522"):
        victim.getresp()
    stolen.close()
    victim.close()
    thief.close()


def test_clear_text_client_on_a_protected_data_connection_gets_no_data(site):
    """A data connection that never starts TLS receives no file byte and the transfer is answered 522."""
    (site.home() / "plain-attempt.txt").write_bytes(MARKER * 100)
    client = explicit_client(site)
    host, port = ftplib.parse227(client.sendcmd("PASV"))
    plain = socket.create_connection((host, port), timeout=TIMEOUT)
    client.sock.sendall(b"RETR plain-attempt.txt\r\n")
    assert client.getresp().startswith("125")
    plain.sendall(b"GET / HTTP/1.0\r\n\r\n")  # anything but a TLS ClientHello
    received = b""
    with contextlib.suppress(OSError):
        while chunk := plain.recv(65536):
            received += chunk
    assert MARKER not in received
    with pytest.raises(ftplib.error_perm, match="^522"):
        client.getresp()
    plain.close()
    client.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_below_1_2_is_refused_by_the_server(site):
    """A client limited to TLS 1.1 is refused with a protocol-version alert; TLS 1.2 alone works and is what FTPS negotiates."""
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", site.implicit_port), timeout=TIMEOUT) as sock:
        with pytest.raises(ssl.SSLError) as refused:
            old.wrap_socket(sock)
    assert "NO_PROTOCOLS_AVAILABLE" not in str(refused.value)  # the server refused, not our own OpenSSL
    modern = site.context()
    modern.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", site.implicit_port), timeout=TIMEOUT) as sock:
        with modern.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.2"
            assert tls.recv(100).startswith(b"220")
    # TLS 1.2 is the FTPS maximum (sftpauth.ftp.FTPS_MAXIMUM_VERSION: TLS 1.3 tickets break lftp uploads).
    with socket.create_connection(("127.0.0.1", site.implicit_port), timeout=TIMEOUT) as sock:
        with site.context().wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.2"
            assert tls.cipher()[0].startswith(("ECDHE-", "TLS_")) and ("GCM" in tls.cipher()[0] or "CHACHA20" in tls.cipher()[0])


# -- real clients, under a packet capture ------------------------------------------------


def test_capture_sees_a_plain_ftp_transfer(site):
    """Control experiment: the loopback capture does see the marker and the password of a clear-text FTP session."""
    (site.home() / "clear.txt").write_bytes(marked_file(20_000))
    with LoopbackCapture() as capture:
        client = ftplib.FTP(timeout=TIMEOUT)
        client.connect("127.0.0.1", site.lenient_port)
        client.login("alice", PASSWORD)
        assert MARKER in download(client, "clear.txt")
        client.quit()
    assert capture.saw(MARKER)
    assert capture.saw(PASSWORD.encode())


def test_lftp_ssl_force_and_protect_data_put_ls_get(site, tmp_path):
    """lftp (ftp:ssl-force, ftp:ssl-protect-data, trusting the test CA) puts, lists and gets; the capture never sees the data or password."""
    data = marked_file()
    (tmp_path / "lftp-up.bin").write_bytes(data)
    with LoopbackCapture() as capture:
        result = run_lftp(site, "put lftp-up.bin; ls; get lftp-up.bin -o lftp-down.bin", tmp_path)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"lftp-up.bin" in result.stdout
    assert (tmp_path / "lftp-down.bin").read_bytes() == data
    assert (site.home() / "lftp-up.bin").read_bytes() == data
    assert capture.packets, "the capture saw nothing at all"
    assert not capture.saw(MARKER)
    assert not capture.saw(PASSWORD.encode())


def test_lftp_active_mode_with_protected_data(site, tmp_path):
    """lftp in active mode (PORT) with PROT P transfers both ways."""
    (tmp_path / "active-up.txt").write_bytes(b"lftp active\n")
    result = run_lftp(
        site, "put active-up.txt; get active-up.txt -o active-down.txt", tmp_path, extra="set ftp:passive-mode off; "
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert (tmp_path / "active-down.txt").read_bytes() == b"lftp active\n"


def test_lftp_without_tls_cannot_log_in(site, tmp_path):
    """lftp with TLS turned off is refused at USER: nothing is sent before AUTH TLS."""
    result = run_lftp(site, "ls", tmp_path, extra="set ftp:ssl-allow no; ")
    assert result.returncode != 0
    assert b"530" in result.stderr


def test_curl_ssl_reqd_downloads_and_uploads(site, tmp_path):
    """curl --ssl-reqd (explicit FTPS) downloads and uploads; the capture never sees the data."""
    data = marked_file(80_000)
    (site.home() / "curl-down.bin").write_bytes(data)
    (tmp_path / "curl-up.bin").write_bytes(data[::-1])
    url = f"ftp://127.0.0.1:{site.explicit_port}/"
    with LoopbackCapture() as capture:
        got = run_curl(site, "--ssl-reqd", url + "curl-down.bin", "-o", str(tmp_path / "got.bin"))
        put = run_curl(site, "--ssl-reqd", "-T", str(tmp_path / "curl-up.bin"), url)
    assert got.returncode == 0, got.stderr
    assert put.returncode == 0, put.stderr
    assert (tmp_path / "got.bin").read_bytes() == data
    assert (site.home() / "curl-up.bin").read_bytes() == data[::-1]
    assert not capture.saw(MARKER) and not capture.saw(MARKER[::-1])
    assert not capture.saw(PASSWORD.encode())


def test_curl_without_ssl_is_refused(site):
    """curl over plain FTP to the explicit service gets 530 (access denied), no file."""
    result = run_curl(site, f"ftp://127.0.0.1:{site.explicit_port}/anything.txt")
    assert result.returncode == 67, result.stderr


# -- implicit FTPS ----------------------------------------------------------------------


def test_curl_implicit_ftps_lists_downloads_and_uploads(site, tmp_path):
    """curl ftps:// (implicit, TLS from the first byte) lists, downloads and uploads; the capture never sees the data."""
    data = marked_file(60_000)
    (site.home() / "implicit-down.bin").write_bytes(data)
    (tmp_path / "implicit-up.bin").write_bytes(b"implicit " + data)
    url = f"ftps://127.0.0.1:{site.implicit_port}/"
    with LoopbackCapture() as capture:
        listing = run_curl(site, url)
        got = run_curl(site, url + "implicit-down.bin", "-o", str(tmp_path / "got.bin"))
        put = run_curl(site, "-T", str(tmp_path / "implicit-up.bin"), url)
    assert listing.returncode == 0 and b"implicit-down.bin" in listing.stdout, listing.stderr
    assert got.returncode == 0, got.stderr
    assert put.returncode == 0, put.stderr
    assert (tmp_path / "got.bin").read_bytes() == data
    assert (site.home() / "implicit-up.bin").read_bytes() == b"implicit " + data
    assert not capture.saw(MARKER)
    assert not capture.saw(PASSWORD.encode())


def test_implicit_service_starts_in_tls_and_refuses_auth(site):
    """On the ftpsi port the greeting comes inside TLS, FEAT lists PBSZ and PROT but not AUTH TLS, and AUTH is 503."""
    with socket.create_connection(("127.0.0.1", site.implicit_port), timeout=TIMEOUT) as sock:
        with site.context().wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            raw = RawControl(sock=tls)
            assert raw.greeting.startswith(b"220")
            features = raw.command(b"FEAT").decode().splitlines()
            assert {" PBSZ", " PROT"} <= set(features) and " AUTH TLS" not in features
            assert raw.command(b"AUTH TLS").startswith(b"503")


def store_until_refused(client: ftplib.FTP, path: str, size: int) -> str:
    """STOR ``size`` bytes and return the reply, also when the server closes the data connection early."""
    data, _ = client.ntransfercmd(f"STOR {path}")
    try:
        data.sendall(os.urandom(size))
    except OSError:
        pass  # the server stopped reading: its reply says why
    data.close()
    try:
        return client.getresp()
    except ftplib.Error as error:
        return str(error)


@pytest.mark.parametrize("protected", [True, False], ids=["prot-p", "plain"])
def test_a_full_disk_answers_452_and_the_server_log_says_why(site, protected):
    """A full disk answers 452 over a TLS data connection as over a plain one (TLS answered 426), and is logged."""
    folder = f"small-{'tls' if protected else 'plain'}"
    with small_file_system(site.home() / folder, 1024 * 1024):
        if protected:
            client = explicit_client(site)
        else:
            client = ftplib.FTP(timeout=TIMEOUT)
            client.connect("127.0.0.1", site.lenient_port)
            client.login("alice", PASSWORD)
        reply = store_until_refused(client, f"{folder}/big.bin", 4 * 1024 * 1024)
        assert reply.startswith("452 "), reply
        assert client.voidcmd("NOOP").startswith("200")  # the session goes on
        client.quit()
    wanted = f"ftp alice: writing /{folder}/big.bin failed after "
    lines = [line for line in site.server.log_text().splitlines() if wanted in line]
    assert len(lines) == 1 and lines[0].endswith(" bytes: No space left on device"), lines


# -- the lenient service ----------------------------------------------------------------


def test_policies_off_allow_plain_login_prot_c_and_no_session_reuse(site):
    """With every ftps_* policy off: plain FTP works, PROT C is accepted and stock ftplib's PROT P works."""
    plain = ftplib.FTP(timeout=TIMEOUT)
    plain.connect("127.0.0.1", site.lenient_port)
    plain.login("alice", PASSWORD)
    plain.storbinary("STOR lenient.txt", io.BytesIO(b"lenient"))
    plain.quit()
    client = explicit_client(site, cls=ftplib.FTP_TLS, port=site.lenient_port)
    assert download(client, "lenient.txt") == b"lenient"
    assert client.prot_c().startswith("200")
    assert download(client, "lenient.txt") == b"lenient"
    client.quit()


def test_the_audit_log_says_whether_an_ftp_login_and_session_used_tls(site):
    """authentication and session-start events of FTP carry ``tls``: a clear-text login is told from an FTPS one."""
    for marker, connect in (
        ("plain", lambda: ftplib.FTP(timeout=TIMEOUT)),
        ("explicit", lambda: ftplib.FTP_TLS(timeout=TIMEOUT, context=site.context())),
    ):
        client = connect()
        client.connect("127.0.0.1", site.lenient_port)
        if marker == "explicit":
            client.auth()
        with pytest.raises(ftplib.error_perm):
            client.login(f"nobody-{marker}", PASSWORD)  # a failed login is audited with it too
        client.login("alice", PASSWORD)
        client.quit()
    with socket.create_connection(("127.0.0.1", site.implicit_port), timeout=TIMEOUT) as sock:
        with site.context().wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            implicit = RawControl(sock=tls)
            assert implicit.command(b"USER alice").startswith(b"331")
            assert implicit.command(b"PASS " + PASSWORD.encode()).startswith(b"230")
            assert implicit.command(b"QUIT").startswith(b"221")
    assert site.server.wait_for_audit(lambda e: e.get("username") == "nobody-plain")["tls"] is False
    assert site.server.wait_for_audit(lambda e: e.get("username") == "nobody-explicit")["tls"] is True
    site.server.wait_for_audit(lambda e: e.get("event") == "session-start" and e.get("service") == "ftpsi")
    events = [e for e in read_audit(site.folder / "audit.jsonl") if e.get("username") == "alice"
              and e.get("event") in ("authentication", "session-start") and e.get("service") in ("lenient", "ftpsi")]
    seen = {(e["service"], e["event"], e["tls"]) for e in events[-6:]}
    assert seen == {("lenient", "authentication", False), ("lenient", "session-start", False),
                    ("lenient", "authentication", True), ("lenient", "session-start", True),
                    ("ftpsi", "authentication", True), ("ftpsi", "session-start", True)}


def fresh_source() -> str:
    """A loopback address no other test used: refusals are audited once a minute per service, address and reason."""
    return f"127.{random.randrange(100, 250)}.{random.randrange(0, 250)}.{random.randrange(2, 250)}"


def raw_from(source: str, port: int) -> RawControl:
    return RawControl(sock=socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0)))


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_refusals_of_the_tls_policy_are_audited_with_their_reason(site):
    """Each refusal of the TLS policy is a ``connection`` event: the administrator sees which client is set up wrong."""
    sources = {name: fresh_source() for name in ("user", "prot", "list", "reuse", "implicit", "explicit")}

    raw = raw_from(sources["user"], site.explicit_port)
    assert raw.command(b"USER batch-job").startswith(b"530")
    raw.close()

    raw = raw_from(sources["prot"], site.explicit_port)
    raw.start_tls(site.context())
    assert raw.command(b"PBSZ 0").startswith(b"200")
    assert raw.command(b"PROT C").startswith(b"534")
    raw.close()

    client = SessionReusingFTP_TLS(context=site.context(), timeout=TIMEOUT, source_address=(sources["list"], 0))
    client.connect("127.0.0.1", site.explicit_port)
    client.auth()
    client.login("alice", PASSWORD)
    with pytest.raises(ftplib.error_perm, match="^521"):
        client.nlst()  # no PROT P
    client.close()

    client = explicit_client(site, cls=ftplib.FTP_TLS, source_address=(sources["reuse"], 0))
    with pytest.raises((ftplib.error_perm, ssl.SSLError, OSError, EOFError)):
        client.nlst()
    client.close()

    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.minimum_version, old.maximum_version = ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1
    sock = socket.create_connection(("127.0.0.1", site.implicit_port), timeout=TIMEOUT, source_address=(sources["implicit"], 0))
    with sock, pytest.raises(ssl.SSLError):
        old.wrap_socket(sock)

    raw = raw_from(sources["explicit"], site.explicit_port)
    assert raw.command(b"AUTH TLS").startswith(b"234")
    raw.sock.sendall(b"USER alice\r\n")  # clear text where the TLS handshake should be
    raw.sock.recv(1024)
    raw.close()

    def refusal(source: str) -> dict:
        event = site.server.wait_for_audit(lambda e: e.get("event") == "connection" and e.get("peer") == source)
        assert event["outcome"] == "refused" and "password" not in json.dumps(event).lower()
        return event

    user = refusal(sources["user"])
    assert (user["service"], user["reason"], user["username"], user["detail"]) == (
        "ftps", "tls-required", "batch-job", "USER before AUTH TLS")
    assert [refusal(sources[name])["detail"] for name in ("prot", "list")] == ["PROT C", "a data connection without PROT P"]
    assert {refusal(sources[name])["reason"] for name in ("prot", "list")} == {"tls-required"}
    reuse = refusal(sources["reuse"])
    assert (reuse["reason"], reuse["detail"]) == ("tls-session-not-reused", "a data connection")
    implicit = refusal(sources["implicit"])
    assert (implicit["service"], implicit["reason"]) == ("ftpsi", "tls-handshake-failed")
    assert "protocol" in implicit["detail"]  # OpenSSL's reason: unsupported protocol
    explicit = refusal(sources["explicit"])
    assert (explicit["service"], explicit["reason"]) == ("ftps", "tls-handshake-failed") and explicit["detail"]


def refusals_after_a_marker(site: FTPSSite, source: str) -> list[tuple[str, str]]:
    """The (reason, detail) of every connection refusal of ``source`` so far, the last being a marker this sends:
    once the marker (USER in clear) is audited, so is everything ``source`` did before it."""
    marker = raw_from(source, site.explicit_port)
    assert marker.command(b"USER marker-" + source.encode()).startswith(b"530")
    marker.close()
    site.server.wait_for_audit(lambda e: e.get("username") == f"marker-{source}")
    return [(e["reason"], e.get("detail", "")) for e in read_audit(site.folder / "audit.jsonl")
            if e.get("event") == "connection" and e.get("peer") == source]


def test_a_tls_error_after_the_handshake_is_not_audited_as_a_handshake_failure(site):
    """Only a handshake that did not complete is ``tls-handshake-failed``: a record broken later is not."""
    source = fresh_source()
    raw = raw_from(source, site.explicit_port)
    raw.start_tls(site.context())
    assert raw.command(b"NOOP").startswith(b"200")
    with socket.fromfd(raw.sock.fileno(), socket.AF_INET, socket.SOCK_STREAM) as plain:  # beneath the TLS layer
        plain.sendall(b"\x17\x03\x03\x00\x20" + os.urandom(32))  # application data that fails its check
    with contextlib.suppress(OSError):
        raw.sock.recv(1024)
    raw.close()
    assert refusals_after_a_marker(site, source) == [("tls-required", "USER before AUTH TLS")]


def test_a_data_connection_that_fails_its_handshake_is_audited_and_one_closed_unused_is_not(site):
    """Clear text on a PROT P data connection is ``tls-handshake-failed``; a data connection closed unused is no refusal."""
    failed, unused = fresh_source(), fresh_source()
    for source, payload in ((failed, b"GET / HTTP/1.0\r\n\r\n"), (unused, b"")):
        client = explicit_client(site, source_address=(source, 0))
        host, port = ftplib.parse227(client.sendcmd("PASV"))
        with socket.create_connection((host, port), timeout=TIMEOUT, source_address=(source, 0)) as plain:
            if payload:
                plain.sendall(payload)
                with contextlib.suppress(OSError):
                    while plain.recv(65536):
                        pass
        time.sleep(0.2)
        assert client.sendcmd("NOOP").startswith("200")
        client.close()
    refusals = {source: refusals_after_a_marker(site, source) for source in (failed, unused)}
    assert refusals[unused] == [("tls-required", "USER before AUTH TLS")]
    (first, detail), second = refusals[failed]
    assert first == "tls-handshake-failed" and detail.startswith("a data connection: ") and second[0] == "tls-required"



@pytest.mark.parametrize("command", ["RETR", "STOR"])
def test_abor_during_a_data_connections_tls_handshake_answers_426_then_226(site, command):
    """Left by QA, session 27: ABOR while the data connection's TLS handshake was pending got 522 (a TLS
    failure, audited as one), then 226; RFC 959 says 426 for the cancelled transfer. The file is unchanged."""
    source = fresh_source()
    (site.home() / "abor.bin").write_bytes(MARKER)
    client = explicit_client(site, source_address=(source, 0))
    host, port = ftplib.parse227(client.sendcmd("PASV"))
    plain = socket.create_connection((host, port), timeout=TIMEOUT, source_address=(source, 0))  # no ClientHello
    client.sock.sendall(f"{command} abor.bin\r\n".encode())
    assert client.getresp().startswith("125")
    client.sock.sendall(b"ABOR\r\n")
    with pytest.raises(ftplib.error_temp, match="^426 "):
        client.getresp()
    assert client.getresp().startswith("226")
    plain.close()
    assert client.voidcmd("NOOP").startswith("200")
    client.close()
    assert (site.home() / "abor.bin").read_bytes() == MARKER
    assert refusals_after_a_marker(site, source) == [("tls-required", "USER before AUTH TLS")]

# -- certificates -----------------------------------------------------------------------


def served_certificate(port: int) -> bytes:
    return ssl.get_server_certificate(("127.0.0.1", port), timeout=TIMEOUT).encode("ascii")


def same_certificate(pem_a: bytes, pem_b: bytes) -> bool:
    return ssl.PEM_cert_to_DER_cert(pem_a.decode()) == ssl.PEM_cert_to_DER_cert(pem_b.decode())


def test_sighup_reloads_the_certificate_and_keeps_it_when_the_new_file_is_bad(tmp_path):
    """After SIGHUP new connections get the new certificate; a broken file on the next SIGHUP is logged and the last good one kept."""
    pki = TestPKI(tmp_path / "pki")
    certificate = pem_with_key(pki.good, tmp_path / "server.pem")
    port = free_port()
    config = f"""
[services/ftpsi]
type = ftpsi
port = {port}
ssl_certificate = {certificate}
"""
    server = SftpauthServer(tmp_path / "run", config, ports=(port,))
    with plugin_on_python_path():
        server.start()
    try:
        assert same_certificate(served_certificate(port), pki.good.certificate.read_bytes())
        pem_with_key(pki.wrong_name, certificate)
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not same_certificate(served_certificate(port), pki.wrong_name.certificate.read_bytes()):
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.1)
        certificate.write_text("not a certificate\n")
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log(lambda text: "not reloaded" in text)
        assert same_certificate(served_certificate(port), pki.wrong_name.certificate.read_bytes())
    finally:
        status = server.stop()
    assert status == 0
    assert "Traceback" not in server.log_text()


@pytest.mark.parametrize("kind", ["missing", "expired", "ftpsi-without-certificate"])
def test_unusable_certificate_stops_start_up_naming_file_section_and_option(tmp_path, kind):
    """A missing or expired ssl_certificate, or an ftpsi without one, ends twistd with status 1 and a clear message."""
    pki = TestPKI(tmp_path / "pki")
    path = {
        "missing": tmp_path / "absent.pem",
        "expired": pem_with_key(pki.expired, tmp_path / "expired.pem"),
        "ftpsi-without-certificate": "",
    }[kind]
    config = f"""
[services/secure]
type = {"ftpsi" if kind == "ftpsi-without-certificate" else "ftp"}
port = {free_port()}
ssl_certificate = {path}
"""
    server = SftpauthServer(tmp_path / "run", config)
    with plugin_on_python_path():
        server.start()
    try:
        status = server.process.wait(30)
        output = server.process.stdout.read().decode(errors="replace")
    finally:
        server.stop()
    assert status == 1, output
    written = server.config_path.read_text(encoding="utf-8").splitlines()
    line = next(number for number, text in enumerate(written, start=1) if text.startswith("ssl_certificate"))
    assert f"{server.config_path}:{line} [services/secure] ssl_certificate:" in output
    assert {"missing": "cannot read", "expired": "expired on", "ftpsi-without-certificate": "required for type = ftpsi"}[kind] in output
    assert "Traceback" not in output


# -- closing: a session ends when the client quits ----------------------------------------


def _open_sessions(site: FTPSSite, service: str) -> int:
    events = [event for event in site.server.audit_events() if event.get("service") == service]
    return sum(1 for e in events if e["event"] == "session-start") - sum(1 for e in events if e["event"] == "session-end")


def _wait_for_no_open_session(site: FTPSSite, service: str, seconds: float = 8.0) -> int:
    deadline = time.monotonic() + seconds
    while (open_now := _open_sessions(site, service)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return open_now


@pytest.mark.parametrize("client", ["lftp", "curl-explicit", "curl-implicit"])
def test_tls_sessions_end_when_the_client_quits(site, tmp_path, client):
    """After QUIT over TLS the server reads the client's close and ends the session (it used to stay open forever)."""
    service = "ftpsi" if client == "curl-implicit" else "ftps"
    assert _wait_for_no_open_session(site, service) == 0  # earlier tests' sessions have ended
    if client == "lftp":
        result = run_lftp(site, "ls", tmp_path)
    elif client == "curl-explicit":
        result = run_curl(site, "--ssl-reqd", f"ftp://127.0.0.1:{site.explicit_port}/")
    else:
        result = run_curl(site, f"ftps://127.0.0.1:{site.implicit_port}/")
    assert result.returncode == 0, result.stderr
    # well within CLOSE_GRACE_SECONDS: the client's own close is what ends it
    assert _wait_for_no_open_session(site, service, seconds=5.0) == 0


def test_a_tls_client_that_never_closes_after_quit_is_cut_off(site):
    """A client that sends QUIT, then neither closes nor answers the TLS close, is disconnected by the server."""
    assert _wait_for_no_open_session(site, "ftps") == 0
    raw = RawControl(port=site.explicit_port)
    try:
        raw.start_tls(site.context())
        assert raw.command(b"USER alice").startswith(b"331")
        assert raw.command(f"PASS {PASSWORD}".encode()).startswith(b"230")
        assert raw.command(b"QUIT").startswith(b"221")
        # This side keeps its socket open and reads nothing more: the server ends it on its own
        # (sftpauth.ftp.CLOSE_GRACE_SECONDS).
        assert _wait_for_no_open_session(site, "ftps", seconds=20.0) == 0
    finally:
        raw.close()
