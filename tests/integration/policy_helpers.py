"""Clients from chosen loopback source addresses, file-descriptor counts, and a real HAProxy.

Linux routes all of 127.0.0.0/8 to the loopback interface, so a client
socket bound to 127.0.0.23 reaches a server on 127.0.0.1 and the server sees
127.0.0.23: each test bans its own address and leaves the others alone.
"""

from __future__ import annotations

import ftplib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import paramiko
import pytest

from .server import free_port

TIMEOUT = 10
FTP_REFUSAL = b"421 Connection refused.\r\n"
SSH_REFUSAL = b"Connection refused.\r\n"


def greeting(port: int, source: str, host: str = "127.0.0.1", wait: float = 10.0) -> bytes:
    """What the server sends a client from ``source`` before the client says anything (up to ``wait`` s or close)."""
    with socket.create_connection((host, port), timeout=TIMEOUT, source_address=(source, 0)) as connection:
        connection.settimeout(0.2)
        data = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = connection.recv(4096)
            except socket.timeout:
                if data.endswith(b"\n"):
                    break
                continue
            if not chunk:
                break
            data += chunk
        return data


def ftp_client(port: int, source: str, host: str = "127.0.0.1") -> ftplib.FTP:
    client = ftplib.FTP(timeout=TIMEOUT, encoding="utf-8", source_address=(source, 0))
    client.connect(host, port)
    return client


def ftp_login(port: int, username: str, password: str, source: str, host: str = "127.0.0.1") -> ftplib.FTP:
    """A logged-in ftplib client; raises ftplib.error_perm (530) when the login fails."""
    client = ftp_client(port, source, host)
    try:
        client.login(username, password)
    except BaseException:
        client.close()
        raise
    return client


def ftp_fails(port: int, username: str, password: str, source: str, host: str = "127.0.0.1") -> str:
    """The reply to a failed FTP login (the test fails if it succeeds)."""
    with pytest.raises(ftplib.error_perm) as failure:
        ftp_login(port, username, password, source, host).quit()
    return str(failure.value)


def ssh_transport(port: int, source: str, host: str = "127.0.0.1") -> paramiko.Transport:
    sock = socket.create_connection((host, port), timeout=TIMEOUT, source_address=(source, 0))
    transport = paramiko.Transport(sock)
    transport.banner_timeout = TIMEOUT
    transport.auth_timeout = TIMEOUT
    return transport


def sftp_listing(port: int, username: str, password: str, source: str, host: str = "127.0.0.1") -> list[str]:
    """Log in over SFTP and list the home folder; raises paramiko errors on failure."""
    transport = ssh_transport(port, source, host)
    try:
        transport.connect(username=username, password=password)
        client = paramiko.SFTPClient.from_transport(transport)
        try:
            return client.listdir(".")
        finally:
            client.close()
    finally:
        transport.close()


def sftp_fails(port: int, username: str, password: str, source: str, host: str = "127.0.0.1") -> None:
    with pytest.raises(paramiko.AuthenticationException):
        sftp_listing(port, username, password, source, host)


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_descriptors(pid: int, expected: Optional[int] = None, timeout: float = 10.0) -> int:
    """The descriptor count once it stops changing (or reaches ``expected``): closing is asynchronous."""
    deadline = time.monotonic() + timeout
    previous = open_descriptors(pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        current = open_descriptors(pid)
        if expected is not None and current <= expected:
            return current
        if expected is None and current == previous:
            return current
        previous = current
    return open_descriptors(pid)


class HAProxy:
    """A real ``haproxy`` in TCP mode: ``frontends`` maps a name to (sftpauth port, "send-proxy-v2" or "send-proxy")."""

    def __init__(self, folder: Path, frontends: dict[str, tuple[int, str]]):
        self.binary = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
        if self.binary is None:
            message = "haproxy is not installed (apt-get install haproxy; scripts/test does)"
            if os.environ.get("SFTPAUTH_REQUIRE_INTEGRATION") == "1":
                pytest.fail(f"SFTPAUTH_REQUIRE_INTEGRATION=1 but {message}", pytrace=False)
            pytest.skip(message)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in frontends}
        sections = [
            "global\n    maxconn 1000\n",
            "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n",
        ]
        for name, (backend_port, option) in frontends.items():
            sections.append(
                f"listen {name}\n    bind 127.0.0.1:{self.ports[name]}\n"
                f"    server sftpauth 127.0.0.1:{backend_port} {option}\n"
            )
        self.config = self.folder / "haproxy.cfg"
        self.config.write_text("\n".join(sections), encoding="utf-8")
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 10.0) -> "HAProxy":
        check = subprocess.run([self.binary, "-c", "-f", str(self.config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refuses its configuration:\n{check.stdout}{check.stderr}")
        self.process = subprocess.Popen(
            [self.binary, "-db", "-f", str(self.config)],
            stdout=open(self.folder / "haproxy.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        for port in self.ports.values():
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"haproxy exited: {(self.folder / 'haproxy.log').read_text(errors='replace')}")
                with socket.socket() as probe:
                    probe.settimeout(0.5)
                    # a bind test, not a connection: a connection would reach sftpauth as a (header-less) client
                    try:
                        probe.bind(("127.0.0.1", port))
                    except OSError:
                        break
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("haproxy did not listen in time")
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
