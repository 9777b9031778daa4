"""Memory of authenticated idle sessions: ``--ftp`` FTP and ``--sftp`` SFTP sessions held open (issue 7).

Starts a throw-away slapd with ``--users`` generated accounts and the real
``twistd -n sftpauth`` (LDAP, bind_dn_type = parent, home folders created on
first login, FTP idle timeout off), once per kind. Opens the sessions
(``--openers`` at a time, each a different LDAP account), each logged in and
then idle (SFTP: with the SFTP subsystem open), then checks they are still
alive (FTP: NOOP on each; SFTP: the transport is active) and reads the RSS of
the sftpauth process before and after: (after - before) / sessions is the
memory of one idle session.

Every session is one file descriptor in sftpauth (and one in this client):
the script raises its own soft RLIMIT_NOFILE to the hard limit (at most
65536) before it starts twistd, which inherits it, and prints the limit the
twistd process really has. In production give the service a high limit
(systemd ``LimitNOFILE=``, or ``ulimit -n`` before ``twistd``).

Opening stops at ``--seconds`` per kind: on a small machine fewer SFTP
sessions than asked may be reached, and the result says how many were.

    .venv/bin/python benchmarks/idle_sessions.py [--ftp 2000] [--sftp 2000] [--seconds 240]
        [--json benchmarks/results/idle.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import benchlib as lib

HOST = "127.0.0.1"


def settle(pid: int, seconds: float = 2.0) -> int:
    time.sleep(seconds)
    return lib.rss_kib(pid)


async def hold_ftp(port: int, count: int, openers: int, seconds: float, pid: int) -> dict:
    sessions: list[tuple] = []
    failures: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    issued = iter(range(1, count + 1))

    async def opener():
        for index in issued:
            if time.monotonic() > deadline:
                return
            try:
                sessions.append(await asyncio.wait_for(lib.ftp_open(HOST, port, index), 60))
            except Exception as error:  # noqa: BLE001 - counted
                key = f"{type(error).__name__}: {error}"[:120]
                failures[key] = failures.get(key, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(opener() for _ in range(openers)))
    opened = time.monotonic() - started
    await asyncio.sleep(2)
    rss_after = lib.rss_kib(pid)
    fds = lib.open_fds(pid)

    async def alive(reader, writer) -> bool:
        try:
            await asyncio.wait_for(lib.ftp_command(reader, writer, "NOOP", 200), 30)
            return True
        except Exception:  # noqa: BLE001
            return False

    answers = []
    for first in range(0, len(sessions), 200):
        answers += await asyncio.gather(*(alive(r, w) for r, w in sessions[first:first + 200]))
    for _, writer in sessions:
        writer.close()
    return {"opened": len(sessions), "open_seconds": round(opened, 1), "alive_at_end": sum(answers),
            "failures": failures, "rss_after_kib": rss_after, "server_fds": fds}


def hold_sftp(port: int, count: int, openers: int, seconds: float, pid: int) -> dict:
    sessions: list[tuple] = []
    failures: dict[str, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    issued = iter(range(1, count + 1))

    def opener():
        while True:
            with lock:
                index = next(issued, None)
            if index is None or time.monotonic() > deadline:
                return
            try:
                session = lib.sftp_open(HOST, port, index)
                with lock:
                    sessions.append(session)
            except Exception as error:  # noqa: BLE001 - counted
                key = f"{type(error).__name__}: {error}"[:120]
                with lock:
                    failures[key] = failures.get(key, 0) + 1

    started = time.monotonic()
    with ThreadPoolExecutor(openers) as pool:
        for future in [pool.submit(opener) for _ in range(openers)]:
            future.result()
    opened = time.monotonic() - started
    rss_after = settle(pid)
    fds = lib.open_fds(pid)
    alive = sum(1 for transport, _ in sessions if transport.is_active())
    for transport, client in sessions:
        transport.close()
    return {"opened": len(sessions), "open_seconds": round(opened, 1), "alive_at_end": alive,
            "failures": failures, "rss_after_kib": rss_after, "server_fds": fds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--ftp", type=int, default=2000)
    parser.add_argument("--sftp", type=int, default=2000)
    parser.add_argument("--openers", type=int, default=16, help="sessions being opened at a time")
    parser.add_argument("--seconds", type=float, default=240.0, help="time limit for opening, per kind")
    parser.add_argument("--json", type=Path, default=lib.REPOSITORY / "benchmarks/results/idle.json")
    args = parser.parse_args()
    limit = lib.raise_nofile()
    print(f"this process RLIMIT_NOFILE: soft {limit[0]}, hard {limit[1]}")

    results = {}
    folder = Path(tempfile.mkdtemp(prefix="sftpauth-idle-"))
    slapd = lib.start_slapd(max(args.users, args.ftp + 1, args.sftp + 1))
    try:
        for kind, count in (("ftp", args.ftp), ("sftp", args.sftp)):
            if count <= 0:
                continue
            server, ftp_port, sftp_port = lib.start_sftpauth(folder / kind, slapd, "parent", idle_timeout=0)
            try:
                pid = server.process.pid
                print(f"{kind}: twistd pid {pid}, max open files {lib.max_open_files(pid)}", flush=True)
                # warm up (imports, host keys, first home folder), then the baseline
                asyncio.run(lib.ftp_login(HOST, ftp_port, 0))
                lib.sftp_login(HOST, sftp_port, 0)
                before = settle(pid)
                if kind == "ftp":
                    result = asyncio.run(hold_ftp(ftp_port, count, args.openers, args.seconds, pid))
                else:
                    result = hold_sftp(sftp_port, count, args.openers, args.seconds, pid)
                result.update(asked=count, rss_before_kib=before,
                              kib_per_session=round((result["rss_after_kib"] - before) / result["opened"], 1)
                              if result["opened"] else None,
                              max_open_files=lib.max_open_files(pid))
                results[kind] = result
                print(f"{kind}: {result['opened']}/{count} sessions opened in {result['open_seconds']}s "
                      f"({result['alive_at_end']} alive at the end, failures {result['failures'] or 0}); "
                      f"RSS {before / 1024:.1f} MiB -> {result['rss_after_kib'] / 1024:.1f} MiB = "
                      f"{result['kib_per_session']} KiB per session; server fds {result['server_fds']}", flush=True)
            finally:
                server.stop(timeout=60)
    finally:
        slapd.stop()
        shutil.rmtree(folder, ignore_errors=True)
    report = {"benchmark": "idle_sessions", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "settings": vars(args) | {"json": str(args.json)}, "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
