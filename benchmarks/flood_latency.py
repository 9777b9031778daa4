"""Login latency of a legitimate FTP user while another address floods bad logins (a benchmark, not a test).

Starts a real ``twistd -n sftpauth`` (local accounts with production
argon2id hashes) with two FTP services: one on the default security policy
(ban after 5 failures) and one with bans disabled (the worst case: the
flood never stops). For each, it measures the legitimate user's login
(connect, USER, PASS, 230, QUIT) from 127.0.0.2, first alone, then while
``--flooders`` connections from 127.0.0.66 send wrong passwords as fast as
the server answers.

    .venv/bin/python benchmarks/flood_latency.py [--samples 40] [--flooders 16]
"""

from __future__ import annotations

import argparse
import ftplib
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from sftpauth.auth.passwords import hash_password  # noqa: E402
from tests.integration.server import SftpauthServer, free_port  # noqa: E402

LEGIT, FLOOD = "127.0.0.2", "127.0.0.66"


def config(folder: Path, ports: dict[str, int]) -> str:
    return f"""
[server]
audit_log = {folder / "audit.jsonl"}

[services/ftp-default]
type = ftp
port = {ports["default"]}

[services/ftp-no-bans]
type = ftp
port = {ports["no-bans"]}
security_policy = no-bans

[security-policies/no-bans]
source_ip_ban_after_count = 0

[groups/DEFAULT_GROUP]
home_folder_path = {folder / "homes"}
create_home_folder = yes

[accounts/alice]
password = {hash_password("alice-pass")}

[accounts/mallory]
password = {hash_password("mallory-pass")}
"""


def login_seconds(port: int) -> float:
    started = time.perf_counter()
    client = ftplib.FTP(timeout=30, source_address=(LEGIT, 0))
    client.connect("127.0.0.1", port)
    client.login("alice", "alice-pass")
    elapsed = time.perf_counter() - started
    client.quit()
    return elapsed


def measure(port: int, samples: int) -> list[float]:
    results = []
    for _ in range(samples):
        results.append(login_seconds(port))
        time.sleep(0.05)
    return results


class Flood:
    """``count`` threads, each a connection from FLOOD sending wrong passwords, reconnecting when closed."""

    def __init__(self, port: int, count: int):
        self.port = port
        self.stop = threading.Event()
        self.attempts = 0
        self.refused_connections = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(count)]

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                client = ftplib.FTP(timeout=30, source_address=(FLOOD, 0))
                client.connect("127.0.0.1", self.port)
            except (ftplib.error_temp, OSError, EOFError):
                with self.lock:
                    self.refused_connections += 1
                time.sleep(0.01)
                continue
            try:
                while not self.stop.is_set():
                    try:
                        client.login("mallory", "wrong-password")
                    except ftplib.error_perm:
                        pass
                    with self.lock:
                        self.attempts += 1
            except (ftplib.Error, OSError, EOFError):
                pass
            finally:
                client.close()

    def __enter__(self) -> "Flood":
        self.started = time.perf_counter()
        for thread in self.threads:
            thread.start()
        time.sleep(1.0)  # let it reach full speed
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.elapsed = time.perf_counter() - self.started
        for thread in self.threads:
            thread.join(35)


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return f"p50 {statistics.median(ordered) * 1000:7.1f} ms   p95 {p95 * 1000:7.1f} ms   max {ordered[-1] * 1000:7.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40, help="legitimate logins per measurement")
    parser.add_argument("--flooders", type=int, default=16, help="parallel flooding connections")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder_name:
        folder = Path(folder_name)
        ports = {"default": free_port(), "no-bans": free_port()}
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
        server = SftpauthServer(folder, config(folder, ports), ports=tuple(ports.values())).start()
        try:
            print(f"sftpauth pid {server.process.pid}, {os.cpu_count()} CPUs, {args.flooders} flooding connections, "
                  f"{args.samples} logins per line")
            for name, port in (("default policy (ban after 5)", ports["default"]), ("bans disabled", ports["no-bans"])):
                login_seconds(port)  # warm up
                alone = measure(port, args.samples)
                with Flood(port, args.flooders) as flood:
                    during = measure(port, args.samples)
                rate = flood.attempts / flood.elapsed
                print(f"{name}:")
                print(f"  alone        {summary(alone)}")
                print(f"  during flood {summary(during)}   flood: {flood.attempts} bad logins answered "
                      f"({rate:.0f}/s), {flood.refused_connections} connections refused")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
