"""Login throughput and latency of sftpauth against a real slapd, beside the LDAP floor (issue 7).

Starts a throw-away slapd with ``--users`` generated inetOrgPerson entries
(uid=userNNNNN under ou=Engineering / ou=Accounting, ``{SSHA}`` passwords)
and the real ``twistd -n sftpauth`` with an FTP and an SFTP service and one
LDAP method, once per ``--bind-type`` (parent, search: the service account
is the slapd admin). Bans are off (source_ip_ban_after_count = 0) and every
account gets a home folder created on first login under a temporary folder.

Cells (each bounded by ``--logins`` and ``--seconds``):

* floor: what one login needs from LDAP, done directly against slapd by a
  raw-BER asyncio client: connect, [service BIND + subtree search,] BIND as
  the user, read the entry (base search), UNBIND; concurrency 1, 8, 32;
* ftp: connect, USER, PASS, PWD, QUIT (asyncio client); 1, 8, 32, 128;
* sftp: connect, key exchange, password, SFTP subsystem, list the home
  folder, close (TCP_NODELAY; ``--sftp-client libssh2`` (default:
  ssh2-python in non-blocking mode, every connection in one thread, about
  0.7-1 ms of client CPU per login), ``libssh2-threads`` (a blocking
  libssh2 session per thread: 0.2-0.4 ms more) or ``paramiko`` (threads,
  5-7 ms, which on 2 shared cores bounds what sftpauth can show)); 1, 8,
  32, 128.

For each: logins/s, latency p50/p95/p99, failures, and the CPU time of the
sftpauth (twistd) process and of slapd per login (/proc/PID/stat utime +
stime before and after the cell). The client runs on the same machine and
takes its share of the CPU: the numbers are for comparison between
versions of sftpauth on one machine, not absolute.

    .venv/bin/python benchmarks/login_benchmark.py [--users 1000] [--logins 200] [--seconds 30]
        [--bind-type parent search] [--workers 1 2] [--json benchmarks/results/login.json]
        [--png benchmarks/results/login.png]

``--workers 1 2`` runs the ftp and sftp cells once per ``[server] workers``
value (a fresh sftpauth each; the CPU column then counts the parent and its
workers) and prints each value's logins/s against workers = 1. ``--rounds N``
splits each cell into N rounds that take the workers values in turn (ABBA),
so that the servers compared are measured over the same minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import resource
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import benchlib as lib

HOST = "127.0.0.1"
OPERATION_TIMEOUT = 60.0


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[rank]


class Cell:
    """The counters of one (bind type, kind, concurrency) measurement."""

    def __init__(self, logins: int, seconds: float, users: int, start_index: int):
        self.logins = logins
        self.deadline = time.monotonic() + seconds
        self.users = users
        self.counter = itertools.count(start_index)
        self.issued = 0
        self.latencies: list[float] = []
        self.failures = 0
        self.errors: dict[str, int] = {}
        self.lock = threading.Lock()

    def take(self):
        """The next user index, or None when the cell is over (count or time)."""
        with self.lock:
            if self.issued >= self.logins or time.monotonic() >= self.deadline:
                return None
            self.issued += 1
            return next(self.counter) % self.users

    def record(self, started: float, error: BaseException | None) -> None:
        elapsed = time.monotonic() - started
        with self.lock:
            if error is None:
                self.latencies.append(elapsed)
            else:
                self.failures += 1
                key = f"{type(error).__name__}: {error}"[:120]
                self.errors[key] = self.errors.get(key, 0) + 1


async def _async_cell(cell: Cell, concurrency: int, login, sources: bool) -> None:
    async def worker(number):
        source = lib.source_address(number if sources else None)
        while (index := cell.take()) is not None:
            started = time.monotonic()
            try:
                await asyncio.wait_for(login(index, source), OPERATION_TIMEOUT)
                cell.record(started, None)
            except Exception as error:  # noqa: BLE001 - counted as a failure
                cell.record(started, error)

    await asyncio.gather(*(worker(number) for number in range(concurrency)))


def _thread_cell(cell: Cell, concurrency: int, login, sources: bool) -> None:
    def worker(number):
        source = lib.source_address(number if sources else None)
        while (index := cell.take()) is not None:
            started = time.monotonic()
            try:
                login(index, source)
                cell.record(started, None)
            except Exception as error:  # noqa: BLE001 - counted as a failure
                cell.record(started, error)

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker, number) for number in range(concurrency)]:
            future.result()


def measure(kind: str, concurrency: int, args, logins: int, seconds: float, start_index: int, login, pids: dict,
            server=None) -> dict:
    """Run one part of a cell (``logins`` logins or ``seconds``); what :func:`summarize` adds up."""
    cell = Cell(logins, seconds, args.users, start_index)
    children = {name: server.worker_pids() if name == "sftpauth" and server else () for name in pids}
    cpu_before = {name: lib.tree_cpu_seconds(pid, children[name]) for name, pid in pids.items()}
    client_before = _own_cpu_seconds()
    started = time.monotonic()
    if kind == "sftp" and args.sftp_client == "libssh2":
        lib.run_libssh2_cell(cell, HOST, server.ports[1], concurrency, args.sources == "many", OPERATION_TIMEOUT)
    elif kind == "sftp":
        _thread_cell(cell, concurrency, login, args.sources == "many")
    else:
        asyncio.run(_async_cell(cell, concurrency, login, args.sources == "many"))
    wall = time.monotonic() - started
    cpu = {name: lib.tree_cpu_seconds(pid, children[name]) - cpu_before[name] for name, pid in pids.items()}
    # The load generator itself (this process: its asyncio loop or SFTP client threads) shares the cores.
    cpu["client"] = _own_cpu_seconds() - client_before
    return {"latencies": cell.latencies, "failures": cell.failures, "errors": cell.errors, "wall": wall, "cpu": cpu}


def summarize(bind_type: str, kind: str, workers: int, concurrency: int, parts: list[dict]) -> dict:
    """One row of the table from the parts (rounds) of a cell: their logins over their summed wall time."""
    latencies = [value for part in parts for value in part["latencies"]]
    failures = sum(part["failures"] for part in parts)
    errors: dict[str, int] = {}
    for part in parts:
        for key, count in part["errors"].items():
            errors[key] = errors.get(key, 0) + count
    wall = sum(part["wall"] for part in parts)
    done = len(latencies) + failures
    ms = [value * 1000 for value in latencies]
    result = {
        "bind_type": bind_type,
        "kind": kind,
        "workers": workers,
        "concurrency": concurrency,
        "attempts": done,
        "ok": len(latencies),
        "failures": failures,
        "errors": errors,
        "seconds": round(wall, 3),
        "logins_per_s": round(len(latencies) / wall, 1) if wall else 0.0,
        "p50_ms": round(percentile(ms, 0.50), 2),
        "p95_ms": round(percentile(ms, 0.95), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "mean_ms": round(statistics.fmean(ms), 2) if ms else float("nan"),
    }
    if len(parts) > 1:
        result["rounds_logins_per_s"] = [round(len(part["latencies"]) / part["wall"], 1) if part["wall"] else 0.0
                                         for part in parts]
    for name in parts[0]["cpu"]:
        seconds = sum(part["cpu"][name] for part in parts)
        result[f"{name}_cpu_ms_per_login"] = round(seconds * 1000 / done, 2) if done else float("nan")
    return result


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def print_row(row: dict) -> None:
    sftpauth_cpu = row.get("sftpauth_cpu_ms_per_login", "")
    print(f"{row['bind_type']:<7} {row['kind']:<5} {row.get('workers', 1):>2} {row['concurrency']:>4} {row['ok']:>5} "
          f"{row['failures']:>4} "
          f"{row['logins_per_s']:>8.1f} {row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f} {row['p99_ms']:>8.1f} "
          f"{sftpauth_cpu!s:>9} {row['slapd_cpu_ms_per_login']!s:>8} {row.get('client_cpu_ms_per_login', '')!s:>8}", flush=True)


HEADER = (f"{'bind':<7} {'kind':<5} {'w':>2} {'conc':>4} {'ok':>5} {'fail':>4} {'login/s':>8} {'p50 ms':>8} "
          f"{'p95 ms':>8} {'p99 ms':>8} {'cpu/twd':>9} {'cpu/sl':>8} {'cpu/cli':>8}\n"
          "(w: [server] workers; cpu/twd, cpu/sl, cpu/cli: ms of CPU per login of the sftpauth processes,\n"
          " of slapd and of this load generator, which shares the same cores)")


def cpu_ceiling(base: dict, row: dict, cpus: int) -> float:
    """The highest workers ratio the measured CPU per login allows when every process shares ``cpus`` cores.

    One worker runs on at most one core; all processes together on at most
    ``cpus``. So logins/s can be at most min(workers / s, cpus / (s + slapd +
    client)), with s the sftpauth CPU per login of that cell. Returns 0.0
    when a cell lacks a CPU figure.
    """
    def most(cell: dict) -> float:
        figures = [cell.get(key) for key in ("sftpauth_cpu_ms_per_login", "slapd_cpu_ms_per_login", "client_cpu_ms_per_login")]
        if not all(isinstance(value, (int, float)) and value > 0 for value in figures):
            return 0.0
        sftpauth, slapd, client = figures
        return min(cell.get("workers", 1) / sftpauth, cpus / (sftpauth + slapd + client))

    one, more = most(base), most(row)
    return more / one if one and more else 0.0


def print_worker_ratios(rows: list[dict], cpus: int = 0) -> None:
    """For each ftp/sftp cell measured with several worker counts: logins/s against workers = 1 (and per round).

    With ``cpus``, also the ceiling that the cells' own CPU per login puts on
    that ratio on this many shared cores (:func:`cpu_ceiling`).
    """
    single = {(row["bind_type"], row["kind"], row["concurrency"]): row for row in rows if row.get("workers", 1) == 1}
    for row in rows:
        base = single.get((row["bind_type"], row["kind"], row["concurrency"]))
        if row.get("workers", 1) > 1 and base is not None and base["logins_per_s"]:
            rounds = ""
            if row.get("rounds_logins_per_s") and base.get("rounds_logins_per_s"):
                ratios = [mine / theirs for mine, theirs in zip(row["rounds_logins_per_s"], base["rounds_logins_per_s"])
                          if theirs]
                rounds = "; rounds " + " ".join(f"{ratio:.2f}" for ratio in ratios)
            ceiling = cpu_ceiling(base, row, cpus) if cpus else 0.0
            limit = f"; CPU ceiling on {cpus} shared cores {ceiling:.2f}" if ceiling else ""
            print(f"{row['bind_type']:<7} {row['kind']:<5} concurrency {row['concurrency']:>3}: "
                  f"workers={row['workers']} / workers=1 = {row['logins_per_s'] / base['logins_per_s']:.2f} "
                  f"({row['logins_per_s']:.1f} / {base['logins_per_s']:.1f} logins/s{rounds}{limit})", flush=True)


def draw(rows: list[dict], path: Path, peers: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r benchmarks/requirements.txt): no PNG")
        return
    figure, (rate_axis, p99_axis) = plt.subplots(1, 2, figsize=(12, 5))
    styles = {"floor": ":", "ftp": "-", "sftp": "--"}
    markers = {"parent": "o", "search": "s"}
    series: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        series.setdefault((row["kind"], row["bind_type"], row.get("workers", 1)), []).append(row)
    for (kind, bind_type, workers), points in sorted(series.items()):
        points.sort(key=lambda row: row["concurrency"])
        label = f"{'LDAP floor' if kind == 'floor' else kind.upper()} ({bind_type}{f', {workers} workers' if workers > 1 else ''})"
        xs = [row["concurrency"] for row in points]
        rate_axis.plot(xs, [row["logins_per_s"] for row in points], styles[kind], marker=markers.get(bind_type, "x"),
                       label=label)
        p99_axis.plot(xs, [row["p99_ms"] for row in points], styles[kind], marker=markers.get(bind_type, "x"),
                      label=label)
    for name, (value, colour) in peers.items():
        rate_axis.scatter([32], [value], color=colour, marker="*", s=120, zorder=5, label=name)
    rate_axis.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="logins/s",
                  title="Throughput (higher is better)")
    p99_axis.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="p99 latency (ms)",
                 title="p99 latency (lower is better)")
    for axis in (rate_axis, p99_axis):
        axis.set_xticks([1, 8, 32, 128], labels=["1", "8", "32", "128"])
        axis.grid(True, which="both", alpha=0.3)
    rate_axis.legend(fontsize=7)
    figure.suptitle("sftpauth logins against slapd, beside the LDAP floor (same 2-core machine)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--logins", type=int, default=200, help="logins per cell (upper bound)")
    parser.add_argument("--seconds", type=float, default=30.0, help="time limit per cell")
    parser.add_argument("--bind-type", nargs="+", default=["parent", "search"], choices=["parent", "search"])
    parser.add_argument("--kinds", nargs="+", default=["floor", "ftp", "sftp"], choices=["floor", "ftp", "sftp"])
    parser.add_argument("--floor-concurrency", default="1,8,32")
    parser.add_argument("--concurrency", default="1,8,32,128", help="for ftp and sftp")
    parser.add_argument("--json", type=Path, default=lib.REPOSITORY / "benchmarks/results/login.json")
    parser.add_argument("--png", type=Path, default=lib.REPOSITORY / "benchmarks/results/login.png")
    parser.add_argument("--sources", choices=["many", "one"], default="many",
                        help="many (default): each concurrent client from its own 127.0.x.y address, as many "
                             "users are; one: all from 127.0.0.1, where sftpauth runs at most 2 logins of one "
                             "address at once and queues the others (up to 1,000)")
    parser.add_argument("--sftp-client", choices=sorted(lib.SFTP_CLIENTS), default="libssh2",
                        help="the SFTP load generator: libssh2 (default, ssh2-python, every connection in one "
                             "thread: about 0.7-1 ms of CPU per login), libssh2-threads (a thread per connection: "
                             "0.2-0.4 ms more) or paramiko (5-7 ms, as much as sftpauth itself)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    parser.add_argument("--workers", nargs="+", type=int, default=[1],
                        help="[server] workers values to run the ftp and sftp cells with (e.g. 1 2); the ratio "
                             "of each to workers = 1 is printed at the end")
    parser.add_argument("--rounds", type=int, default=1,
                        help="split each cell into this many rounds (of --logins / N logins and --seconds / N "
                             "seconds), taking the workers values in turn each round (ABBA order): ratios "
                             "then compare servers measured over the same minutes")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    part_logins = max(1, args.logins // args.rounds)
    part_seconds = args.seconds / args.rounds
    floor_levels = [int(value) for value in args.floor_concurrency.split(",")]
    levels = [int(value) for value in args.concurrency.split(",")]
    lib.raise_nofile()

    sftp_login = lib.SFTP_CLIENTS[args.sftp_client]
    rows: list[dict] = []
    folder = Path(tempfile.mkdtemp(prefix="sftpauth-bench-"))
    slapd = lib.start_slapd(args.users)
    admin = (slapd.admin_dn, slapd.admin_password)
    print(HEADER, flush=True)
    next_index = 0
    try:
        for bind_type in args.bind_type:
            # One sftpauth per workers value, all started before the first cell: each cell is then
            # measured with every workers value in turn, so a ratio compares cells a few seconds apart
            # (this machine's speed drifts by a quarter within the hour).
            servers = {}
            try:
                for workers in args.workers:
                    server, ftp_port, sftp_port = lib.start_sftpauth(folder / f"{bind_type}-{workers}", slapd,
                                                                     bind_type, workers=workers)
                    servers[workers] = server
                    # warm up: host keys, first home folders, imports in the server (in every worker)
                    for _ in range(2 * workers):
                        asyncio.run(lib.ftp_login(HOST, ftp_port, 0))
                        sftp_login(HOST, sftp_port, 0)
                for kind in args.kinds:
                    for concurrency in (floor_levels if kind == "floor" else levels):
                        # The floor does not depend on sftpauth: measured once.
                        measured = {workers: server for workers, server in servers.items()
                                    if kind != "floor" or workers == args.workers[0]}
                        parts: dict[int, list[dict]] = {workers: [] for workers in measured}
                        for turn in range(args.rounds):
                            # ABBA...: odd rounds take the workers values in reverse order, so a steady
                            # drift of the machine's speed weighs on each value alike.
                            order = list(measured.items())
                            for workers, server in (order if turn % 2 == 0 else order[::-1]):
                                ftp_port, sftp_port = server.ports
                                logins = {
                                    "floor": lambda index, source, b=bind_type: lib.floor_login(
                                        HOST, slapd.port, index, b, admin, source),
                                    "ftp": lambda index, source, port=ftp_port: lib.ftp_login(HOST, port, index,
                                                                                             source),
                                    "sftp": lambda index, source, port=sftp_port: sftp_login(HOST, port, index,
                                                                                            source),
                                }
                                pids = {"slapd": slapd.process.pid}
                                if kind != "floor":
                                    pids["sftpauth"] = server.process.pid
                                part = measure(kind, concurrency, args, part_logins, part_seconds, next_index,
                                               logins[kind], pids, server)
                                next_index += len(part["latencies"]) + part["failures"]
                                parts[workers].append(part)
                        for workers in measured:
                            row = summarize(bind_type, kind, workers, concurrency, parts[workers])
                            rows.append(row)
                            print_row(row)
                            if row["errors"]:
                                print(f"        errors: {row['errors']}", flush=True)
            finally:
                for server in servers.values():
                    server.stop()
    finally:
        slapd.stop()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"kept {folder}")

    report = {
        "benchmark": "login",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": lib.os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {"users": args.users, "logins_per_cell": args.logins, "seconds_per_cell": args.seconds,
                     "sources": args.sources, "sftp_client": args.sftp_client,
                     "bind_types": args.bind_type, "workers": args.workers, "rounds": args.rounds},
        "cells": rows,
    }
    print_worker_ratios(rows, lib.os.cpu_count() or 0)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    draw(rows, args.png, PEERS)


PEERS = {"ProFTPD FTP @32 (issue 7)": (255, "tab:red"), "ProFTPD SFTP @32 (issue 7)": (110, "tab:purple")}


if __name__ == "__main__":
    main()
