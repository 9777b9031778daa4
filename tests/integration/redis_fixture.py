"""A throw-away ``redis-server`` on a free loopback port, for the shared-state tests.

The fixture skips when redis-server is missing, unless
``SFTPAUTH_REQUIRE_INTEGRATION=1`` is set (scripts/test), which makes it fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest

from .server import free_port

INSTALL_HINT = "install it with: apt-get install redis-server (scripts/test does)"


class RedisNotFound(RuntimeError):
    pass


class RedisServer:
    """``redis-server`` without persistence on 127.0.0.1; stop() and start() again keep the port."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.port = free_port()
        self.process: Optional[subprocess.Popen] = None
        self.binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
        if self.binary is None:
            raise RedisNotFound(f"redis-server is not installed; {INSTALL_HINT}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.folder),
                "--logfile", str(self.folder / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if self.command("PING") == "+PONG":
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port}: {self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def command(self, *words: str) -> str:
        """One command in the inline protocol; the first reply line (enough for PING, DBSIZE, PTTL, KEYS count)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as connection:
            connection.sendall((" ".join(words) + "\r\n").encode())
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = connection.recv(65536)
                if not chunk:
                    break
                reply += chunk
            return reply.decode().split("\r\n", 1)[0]

    def log_tail(self) -> str:
        try:
            return (self.folder / "redis.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


def start_redis(folder: Path) -> RedisServer:
    """A started RedisServer, or a skip (a failure with SFTPAUTH_REQUIRE_INTEGRATION=1) when there is none."""
    try:
        return RedisServer(folder).start()
    except RedisNotFound as error:
        if os.environ.get("SFTPAUTH_REQUIRE_INTEGRATION") == "1":
            pytest.fail(f"SFTPAUTH_REQUIRE_INTEGRATION=1 but redis-server cannot be used: {error}", pytrace=False)
        pytest.skip(str(error))
