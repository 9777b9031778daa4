"""``[server] workers = 2`` end to end: a real ``twistd -n sftpauth``, its two workers, a real slapd.

Which worker serves a connection is the kernel's choice: every worker waits
on the one shared socket, the kernel wakes them all, and the first to call
accept() wins. With another process busy on one CPU, the worker pinned to
the idle CPU wins every time. So a test that wants a connection on a given
worker stops the other workers (SIGSTOP) while it connects
(:meth:`Site.accepting_only`), and :func:`serving_worker` checks who holds
the server side of the connection (``/proc/net/tcp`` and each worker's
``/proc/PID/fd``). The audit ``worker`` field says the same from the
server's side.
"""

from __future__ import annotations

import contextlib
import ftplib
import functools
import io
import json
import os
import random
import re
import signal
import socket
import ssl
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import paramiko
import pyotp
import pytest
from cryptography.hazmat.primitives import serialization

from sftpauth.tls import load_server_certificate

from .ldap_helpers import BASE, ENGINEERING
from .manager_helpers import _CHEAP, HTTPSClient
from .server import SftpauthServer, free_port, serving
from .disk import small_file_system
from .sftp_fixtures import server_host_key
from .test_ftps import pem_with_key
from .tls_certs import TestPKI

TIMEOUT = 10
FAILED = "530 Login failed."
TOTP_USERS = f"ou=workers-totp,{BASE}"
SECRET = "KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU"
ADMIN_PASSWORD = "workers-admin-pass"


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, T for stopped, Z...); "" once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def alive(pid: int) -> bool:
    return process_state(pid) not in ("", "Z")


def serving_worker(server_port: int, client: socket.socket, workers: set[int], timeout: float = 5.0) -> int:
    """The pid of the worker holding the server end of ``client``'s connection."""
    client_port = client.getsockname()[1]
    deadline = time.monotonic() + timeout
    while True:
        inodes = set()
        with open("/proc/net/tcp", encoding="ascii") as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
                if local == server_port and remote == client_port:
                    inodes.add(f"socket:[{fields[9]}]")
        for pid in workers:
            try:
                names = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for name in names:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{name}") in inodes:
                        return pid
                except OSError:
                    continue
        if time.monotonic() > deadline:
            raise AssertionError(f"no worker of {workers} holds the connection from port {client_port}")
        time.sleep(0.05)


def totp_ldif() -> str:
    return textwrap.dedent(
        f"""\
        dn: {TOTP_USERS}
        objectClass: organizationalUnit
        ou: workers-totp

        dn: uid=tessa,{TOTP_USERS}
        objectClass: top
        objectClass: inetOrgPerson
        objectClass: sftpauthTestUser
        uid: tessa
        cn: Tessa
        sn: Tessa
        userPassword: tessa-pass
        totpSharedSecret: otpauth://totp/Srv:tessa?secret={SECRET}&issuer=Srv
        """
    )


class Site:
    """sftpauth with workers = 2: FTP (passive range of two ports), SFTP, FTPS, FTP with TOTP, a Web Manager."""

    def __init__(self, folder: Path, slapd):
        self.folder = Path(folder)
        names = ("ftp", "sftp", "ftps", "totp", "web")
        self.ports = {name: free_port() for name in names}
        self.passive = free_port_pair()
        self.pki = TestPKI(self.folder / "pki")
        self.certificate = pem_with_key(self.pki.good, self.folder / "ftps.pem")
        config = textwrap.dedent(
            f"""
            [server]
            authentications = plain
            audit_log = {self.folder}/audit.jsonl
            data_folder = {self.folder}/data
            workers = 2

            [security-policies/DEFAULT-SECURITY-POLICY]
            source_ip_ban_after_count = 4
            source_ip_ban_interval = 60

            [security-policies/relaxed]
            source_ip_ban_after_count = 1000

            [services/ftp]
            type = ftp
            port = {self.ports["ftp"]}
            passive_port_range = {self.passive}-{self.passive + 1}

            [services/sftp]
            type = ssh
            port = {self.ports["sftp"]}

            [services/ftps]
            type = ftp
            port = {self.ports["ftps"]}
            ssl_certificate = {self.certificate}
            security_policy = relaxed

            [services/totp]
            type = ftp
            port = {self.ports["totp"]}
            authentications = totp
            security_policy = relaxed

            [services/web]
            type = manager
            port = {self.ports["web"]}
            security_policy = relaxed

            [groups/DEFAULT_GROUP]
            home_folder_path = {self.folder}/homes
            create_home_folder = yes

            [administrators/admin]
            password = {_CHEAP.hash(ADMIN_PASSWORD)}

            [authentications/plain]
            type = ldap
            address = 127.0.0.1
            port = {slapd.port}
            bind_dn = {ENGINEERING}
            username_attribute = uid

            [authentications/totp]
            type = ldap
            address = 127.0.0.1
            port = {slapd.port}
            bind_dn = {TOTP_USERS}
            username_attribute = uid
            extension_entry_point = python:sftpauth.ldap.totp.AugmentedTOTP
            extension_configuration = {{"mfa_attribute": "totpSharedSecret"}}
            """
        )
        self.server = SftpauthServer(self.folder, config, ports=tuple(self.ports.values()))
        self.manager = SimpleNamespace(port=self.ports["web"], certificate=self.folder / "data" / "manager" / "certificate.pem")

    def workers(self, count: int = 2, timeout: float = 15.0) -> set[int]:
        """The worker pids once ``count`` of them have said they are ready."""
        return self.server.ready_workers(count, timeout)

    def events(self, predicate: Callable[[dict], bool]) -> list[dict]:
        return [event for event in self.server.audit_events() if predicate(event)]

    def event(self, predicate: Callable[[dict], bool], timeout: float = 10.0) -> dict:
        return self.server.wait_for_audit(predicate, timeout=timeout)

    @contextlib.contextmanager
    def accepting_only(self, pid: int) -> Iterator[set[int]]:
        """Inside the block only worker ``pid`` runs: the others are stopped, and continued after it.

        A stopped worker cannot accept, so a connection made inside the block
        goes to ``pid`` (the kernel keeps it queued on the shared socket until
        a running worker accepts it). Yields the set of ready workers.
        """
        workers = self.workers()
        assert pid in workers, (pid, workers)
        others = workers - {pid}
        try:
            for other in others:
                os.kill(other, signal.SIGSTOP)
            deadline = time.monotonic() + 10
            while not all(process_state(other) == "T" for other in others):
                assert time.monotonic() < deadline, {other: process_state(other) for other in others}
                time.sleep(0.01)
            yield workers
        finally:
            for other in others:
                os.kill(other, signal.SIGCONT)

    def ftp_on_worker(self, service: str, pid: int, source: str = "127.0.0.1", client_class=ftplib.FTP) -> ftplib.FTP:
        """An FTP connection (greeted, not logged in) served by the worker ``pid``."""
        with self.accepting_only(pid) as workers:
            client = client_class(timeout=TIMEOUT, encoding="utf-8", source_address=(source, 0))
            client.connect("127.0.0.1", self.ports[service])  # returns with the greeting: accepted
            assert serving_worker(self.ports[service], client.sock, workers) == pid
        return client

    def ftp_on_each_worker(self, service: str, source: str = "127.0.0.1") -> dict[int, ftplib.FTP]:
        """An FTP connection (greeted, not logged in) served by each worker, by worker pid."""
        return {pid: self.ftp_on_worker(service, pid, source) for pid in sorted(self.workers())}

    def ftps_certificate_of(self, pid: int) -> bytes:
        """The certificate (DER) worker ``pid`` shows after ``AUTH TLS`` on the FTPS service."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the certificate is what is looked at
        client = self.ftp_on_worker("ftps", pid, client_class=functools.partial(ftplib.FTP_TLS, context=context))
        try:
            client.auth()
            return client.sock.getpeercert(binary_form=True)
        finally:
            client.close()


def certificate_der(pem_path: Path) -> bytes:
    """The server certificate of an ``ssl_certificate`` file, as DER (what a TLS client is shown)."""
    return load_server_certificate(str(pem_path), check_expiry=False).certificate.public_bytes(serialization.Encoding.DER)


def free_port_pair() -> int:
    """A port p with p and p + 1 free now, below the kernel's ephemeral range.

    Ports from free_port() are ephemeral ones: any client socket of a later
    test may then take p + 1 as its local port, and the passive range of two
    ports had none free (seen once in CI).
    """
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(20000, first_ephemeral - 1)
        with socket.socket() as low, socket.socket() as high:
            try:
                low.bind(("127.0.0.1", port))
                high.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise AssertionError("no two consecutive free ports")


@pytest.fixture(scope="module")
def site(tmp_path_factory, slapd) -> Iterator[Site]:
    slapd.add_ldif(totp_ldif())
    site = Site(tmp_path_factory.mktemp("workers"), slapd)
    with serving(site.server):
        site.workers()
        yield site


def worker_index(site: Site, pid: int) -> int:
    """The index (audit ``worker``) of the worker with this pid, from the parent's log."""
    found = re.search(rf"worker (\d+) started \(pid {pid}\)", site.server.log_text())
    assert found, site.server.log_tail()
    return int(found.group(1))


def expected_cpus(index: int) -> set[int]:
    """Worker ``index``'s CPUs with worker_cpu_affinity = auto: the index-th of those this machine lets us use."""
    allowed = sorted(os.sched_getaffinity(0))
    return {allowed[(index - 1) % len(allowed)]} if len(allowed) > 1 else set(allowed)


def thread_cpus(pid: int) -> dict[int, set[int]]:
    """The CPU affinity of each thread of a process, by thread id."""
    return {int(tid): os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def audited_worker(site: Site, username: str, outcome: str = "success", service: str = "ftp") -> int:
    event = site.event(
        lambda e: e["event"] == "authentication" and e["username"] == username and e["outcome"] == outcome and e["service"] == service
    )
    return event["worker"]


def test_ftp_and_sftp_logins_are_served_by_both_workers(site):
    """A login on a connection of each worker succeeds; the audit says which worker served it (1 and 2)."""
    for client in site.ftp_on_each_worker("ftp").values():
        client.login("alice", "alice-pass")
        assert client.pwd() == "/"
        client.quit()
    for index in (1, 2):  # each worker sends its events in its own batches: wait for both
        site.event(lambda e, index=index: e["event"] == "session-end" and e["service"] == "ftp" and e["worker"] == index)
    events = site.events(lambda e: e["event"] == "authentication" and e["service"] == "ftp" and e["outcome"] == "success")
    assert {event["worker"] for event in events} == {1, 2}
    for pid in sorted(site.workers()):
        with site.accepting_only(pid) as workers:
            sock = socket.create_connection(("127.0.0.1", site.ports["sftp"]), timeout=TIMEOUT)
            assert serving_worker(site.ports["sftp"], sock, workers) == pid
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        try:
            transport.connect(username="alice", password="alice-pass")
            assert paramiko.SFTPClient.from_transport(transport).listdir(".") == []
        finally:
            transport.close()
    for index in (1, 2):
        site.event(lambda e, index=index: e["event"] == "session-end" and e["service"] == "sftp" and e["worker"] == index)
    sftp_workers = {e["worker"] for e in site.events(lambda e: e["event"] == "session-start" and e["service"] == "sftp")}
    assert sftp_workers == {1, 2}


def test_failures_spread_over_both_workers_ban_the_address_on_both(site):
    """Two failures on each worker make the fourth, and one ban that every worker enforces."""
    source = "127.0.0.61"
    connections = site.ftp_on_each_worker("ftp", source)
    order = list(connections.values()) * 2
    for number, client in enumerate(order):
        with pytest.raises(ftplib.error_perm) as failure:
            client.login(f"ghost-{number}", "wrong")
        assert str(failure.value) == FAILED
        site.event(lambda e, n=number: e["event"] == "authentication" and e["username"] == f"ghost-{n}")
    failures = site.events(lambda e: e["event"] == "authentication" and e["peer"] == source)
    assert sorted(event["worker"] for event in failures) == [1, 1, 2, 2]
    ban = site.event(lambda e: e["event"] == "ban" and e["peer"] == source)
    assert ban["failures"] == 4
    for client in connections.values():
        client.close()
    # Every new connection is refused, whichever worker accepts it.
    for _ in range(6):
        with socket.create_connection(("127.0.0.1", site.ports["ftp"]), timeout=TIMEOUT, source_address=(source, 0)) as refused:
            refused.settimeout(TIMEOUT)
            assert refused.recv(100) == b"421 Connection refused.\r\n"
    time.sleep(0.3)
    assert len(site.events(lambda e: e["event"] == "ban" and e["peer"] == source)) == 1


def test_a_totp_code_used_on_one_worker_is_refused_on_the_other(site):
    """The code that logged in on worker A is ``totp-replayed`` on worker B: the replay store is the parent's."""
    connections = site.ftp_on_each_worker("totp", "127.0.0.62")
    first, second = connections.values()
    code = pyotp.TOTP(SECRET).now()
    first.login("tessa", "tessa-pass" + code)
    first.quit()
    with pytest.raises(ftplib.error_perm) as refused:
        second.login("tessa", "tessa-pass" + code)
    assert str(refused.value) == FAILED
    second.close()
    accepted = site.event(lambda e: e.get("username") == "tessa" and e.get("outcome") == "success")
    replayed = site.event(lambda e: e.get("username") == "tessa" and e.get("reason") == "totp-replayed")
    assert {accepted["worker"], replayed["worker"]} == {1, 2}


def test_a_taken_passive_port_is_skipped(site):
    """PASV on a worker while another process holds the first port of the range answers with the second."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", site.passive))
        holder.listen()
        client = ftplib.FTP(timeout=TIMEOUT, encoding="utf-8")
        client.connect("127.0.0.1", site.ports["ftp"])
        client.login("alice", "alice-pass")
        data, _ = client.ntransfercmd("NLST")  # PASV, then the data connection to the port it announced
        with data:
            assert data.getpeername()[1] == site.passive + 1
            assert data.recv(100) == b""
        assert client.voidresp().startswith("226")
        client.quit()
    # A worker writes no line for a passive port's start or close (ftp._QuietPort).
    assert f"starting on {site.passive + 1}" not in site.server.log_text()
    assert f"Port {site.passive + 1} Closed" not in site.server.log_text()


def test_the_web_manager_in_the_parent_sees_the_workers(site):
    """The manager (in the parent) logs in, shows FTP/SFTP running, and counts and lists the workers' logins."""
    for ftp in site.ftp_on_each_worker("ftp", "127.0.0.64").values():  # this test's own logins, one per worker
        ftp.login("alice", "alice-pass")
        ftp.quit()
    for index in (1, 2):
        site.event(lambda e, index=index: e["event"] == "authentication" and e["peer"] == "127.0.0.64" and e["worker"] == index)
    client = HTTPSClient(site.manager)
    assert client.login("admin", ADMIN_PASSWORD)[0] == 200
    status, body = client.get_json("/api/v1/services")
    assert status == 200
    states = {service["id"]: service["state"] for service in body["services"]}
    assert states == {"ftp": "running", "sftp": "running", "ftps": "running", "totp": "running", "web": "running"}
    status, body = client.get_json("/api/v1/events?limit=200")
    assert status == 200 and {event.get("worker") for event in body["events"]} >= {1, 2}
    status, _, metrics = client.request("GET", "/metrics")
    assert status == 200
    line = next(line for line in metrics.decode().splitlines() if line.startswith('sftpauth_login_attempts_total{method="plain",outcome="success",service="ftp"}'))
    assert float(line.split()[-1]) >= 2


def test_sighup_reloads_the_certificate_once_and_every_worker_serves_it(site):
    """SIGHUP: the parent reads the FTPS certificate again (one log line, not one per worker) and gives it to
    each worker, which serves it from its next TLS session on; no worker is replaced."""
    before = site.workers()
    new = site.pki.issue("reloaded", "reloaded.localhost", ("localhost", "127.0.0.1"))
    pem_with_key(new, site.certificate)  # the test leaves it in use: the file and the workers agree after it
    site.server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        log = site.server.log_text()
        using = {index for index in (1, 2)
                 if f"worker {index}: [sftpauth.tls#info] service ftps: using the reloaded ssl_certificate" in log}
        if using == {1, 2}:
            break
        assert time.monotonic() < deadline, site.server.log_tail()
        time.sleep(0.1)
    assert len(re.findall(r"^\S+ \[sftpauth\.tls#info\] service ftps: reloaded ssl_certificate", log, re.M)) == 1, log
    assert "worker 1: [sftpauth.tls#info] service ftps: reloaded" not in log  # workers do not read the file
    assert {pid: site.ftps_certificate_of(pid) for pid in before} == {pid: certificate_der(site.certificate) for pid in before}
    assert site.server.worker_pids() == before


def test_each_worker_keeps_to_its_own_cpu_with_its_threads(site):
    """worker_cpu_affinity = auto (the default): worker N runs on the Nth allowed CPU, its thread pool too."""
    for client in site.ftp_on_each_worker("ftp").values():
        client.login("alice", "alice-pass")  # home folder work runs in the worker's thread pool
        client.storbinary("STOR affinity.txt", io.BytesIO(b"x"))
        client.delete("affinity.txt")
        client.quit()
    for pid in site.workers():
        index = worker_index(site, pid)
        threads = thread_cpus(pid)
        assert len(threads) > 1, "the worker has no thread pool yet"
        assert set(map(frozenset, threads.values())) == {frozenset(expected_cpus(index))}, (index, threads)
        if len(os.sched_getaffinity(0)) > 1:
            assert f"worker {index} started (pid {pid}) on CPU {min(expected_cpus(index))}" in site.server.log_text()
    assert os.sched_getaffinity(site.server.process.pid) == os.sched_getaffinity(0)  # the parent is not pinned


def test_a_killed_worker_is_started_again(site):
    """SIGKILL of a worker: the parent logs it, ends the sessions it held in the audit log, starts a new one."""
    before = site.workers()
    victim = min(before)
    # From an address of its own: the audit events of earlier tests' alice sessions, which reach
    # the audit file up to 50 ms after those tests ended, cannot pass for this session's start.
    held = site.ftp_on_worker("ftp", victim, source="127.0.0.63")  # a session open on the victim when it dies
    index = worker_index(site, victim)

    def started_there(event):
        return (
            event["event"] == "session-start" and event["peer"] == "127.0.0.63"
            and event["username"] == "alice" and event["worker"] == index
        )

    held.login("alice", "alice-pass")
    # QA: a restarted worker read the FTPS certificate file again, and did not start while it could not be
    # used (tried again and again with a growing delay). It is given the certificate in use.
    certificate_text = site.certificate.read_bytes()  # in use (the SIGHUP test leaves its own in place)
    site.certificate.write_text("-----BEGIN CERTIFICATE-----\nbeing replaced\n")
    # QA: a restarted worker read the host key files again (and generated a key when one was gone), so
    # clients met another host key on that worker. Replaced on disk now, the new worker must not use it.
    host_key = server_host_key(site.ports["sftp"], {"keys": ["ssh-rsa", "rsa-sha2-256", "rsa-sha2-512"]})
    key_file = site.folder / "data" / "ssh" / "ssh_host_ed25519_key"
    original_key_text = key_file.read_bytes()
    key_file.write_bytes(new_ed25519_key_text())
    deadline = time.monotonic() + 10
    while not site.events(started_there):  # the parent has this session's start
        assert time.monotonic() < deadline, site.server.log_tail()
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        now = site.server.worker_pids()
        if victim not in now and len(now) == 2 and all(f"(pid {pid}) is ready" in site.server.log_text() for pid in now):
            break
        assert time.monotonic() < deadline, site.server.log_tail()
        time.sleep(0.1)
    assert f"(pid {victim}) was killed by signal 9" in site.server.log_text()
    ended = site.event(lambda e: e["event"] == "session-end" and e.get("reason") == "worker-exited")
    assert (ended["username"], ended["service"], ended["peer"], ended["worker"]) == ("alice", "ftp", "127.0.0.63", index)
    assert ended["detail"].endswith("was killed by signal 9")
    held.close()
    # The new worker serves logins. (Not "both serve": an idle restarted worker, the last to wait on
    # the shared socket, is the one the kernel wakes first, so it may take every connection for a while.)
    (new_pid,) = now - before
    assert os.sched_getaffinity(new_pid) == expected_cpus(index)  # the same CPU as the worker it replaces
    client = site.ftp_on_worker("ftp", new_pid)
    client.login("alice", "alice-pass")
    assert client.pwd() == "/"
    client.quit()
    served = site.ftps_certificate_of(new_pid)
    site.certificate.write_bytes(certificate_text)
    assert served == certificate_der(site.certificate)
    seen = {server_host_key(site.ports["sftp"], {"keys": ["ssh-rsa", "rsa-sha2-256", "rsa-sha2-512"]}).asbytes()
            for _ in range(12)}  # both workers, the new one first (see above)
    key_file.write_bytes(original_key_text)
    assert seen == {host_key.asbytes()}


def new_ed25519_key_text() -> bytes:
    """A new Ed25519 private key in OpenSSH format."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def carol_config(tmp_path: Path, port: int, audit_log: str, more: str = "") -> str:
    """Two workers, one FTP service on ``port``, the local account carol (carol-pass) and ``more`` sections."""
    return textwrap.dedent(
        f"""
        [server]
        data_folder = {tmp_path}/data
        audit_log = {audit_log}
        workers = 2
        [services/ftp]
        type = ftp
        port = {port}
        [accounts/carol]
        password = {_CHEAP.hash("carol-pass")}
        home_folder_path = {tmp_path}/carol
        """
    ) + more


def test_sigterm_stops_every_worker_and_exits_0(tmp_path):
    """SIGTERM on the parent: both workers stop, then the parent exits 0, with no traceback in the log.

    A session still open then has its session-end in the audit log: the worker
    ends it as its service stops, the parent writes the event once the workers
    have exited, and closes the file only after that.
    """
    port = free_port()
    (tmp_path / "carol").mkdir()
    server = SftpauthServer(tmp_path, carol_config(tmp_path, port, f"{tmp_path}/audit.jsonl"), ports=(port,))
    with serving(server):
        workers = server.ready_workers()
        assert len(workers) == 2
        held = ftplib.FTP()
        held.connect("127.0.0.1", port, timeout=10)
        held.login("carol", "carol-pass")
        server.wait_for_audit(lambda event: event["event"] == "session-start" and event.get("username") == "carol")
    held.close()
    assert server.process.returncode == 0
    assert not [pid for pid in workers if alive(pid)]
    assert "the running worker processes have stopped (2)" in server.log_text()
    ends = [event for event in server.audit_events() if event["event"] == "session-end"]
    # The worker ended the session as its FTP service stopped, before its channel closed: not "worker-exited".
    assert [(event.get("username"), event.get("reason")) for event in ends] == [("carol", "shutdown")], server.audit_events()


def _fill(folder: Path) -> None:
    """Fill the file system of ``folder`` to its last byte."""
    with open(folder / "filler", "wb", buffering=0) as filler:
        with contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 4096)
        with contextlib.suppress(OSError):
            while True:
                filler.write(b"\0")


def test_a_full_audit_disk_stops_no_worker_no_login_and_no_ban(tmp_path):
    """QA, session 29 (high): with the audit log's disk full, the parent's write raised inside the workers' channel,
    so both workers stopped, cutting every session, and kept dying when started again; with one process, every
    valid login was refused and failures were never counted toward a ban. Now the events go to the server log."""
    port = free_port()
    (tmp_path / "carol").mkdir()
    with small_file_system(tmp_path / "small", 256 * 1024) as small:
        policy = "[security-policies/DEFAULT-SECURITY-POLICY]\nsource_ip_ban_after_count = 3\n"
        server = SftpauthServer(tmp_path, carol_config(tmp_path, port, f"{small}/audit.jsonl", policy), ports=(port,))
        with serving(server):
            workers = set(server.ready_workers())
            held = ftplib.FTP()
            held.connect("127.0.0.1", port, timeout=10)
            held.login("carol", "carol-pass")
            _fill(small)
            for _ in range(30):  # the audit file's last page still takes a few events
                if "cannot write the audit log" in server.log_text():
                    break
                fresh = ftplib.FTP()
                fresh.connect("127.0.0.1", port, timeout=10)
                assert fresh.login("carol", "carol-pass").startswith("230")
                fresh.quit()
                time.sleep(0.1)
            for _ in range(3):
                guesser = ftplib.FTP(source_address=("127.0.0.77", 0))
                guesser.connect("127.0.0.1", port, timeout=10)
                with pytest.raises(ftplib.error_perm, match="^530"):
                    guesser.login("carol", "guess")
                guesser.close()
            deadline = time.monotonic() + 5
            while True:  # the ban reaches every worker
                try:
                    banned = ftplib.FTP(source_address=("127.0.0.77", 0))
                    greeting = banned.connect("127.0.0.1", port, timeout=10)
                    banned.close()
                except (ftplib.error_temp, EOFError, OSError) as refused:
                    greeting = str(refused)
                if not greeting.startswith("220") or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert not greeting.startswith("220"), "the address was not banned"
            fresh = ftplib.FTP()
            fresh.connect("127.0.0.1", port, timeout=10)
            assert fresh.login("carol", "carol-pass").startswith("230")
            fresh.quit()
            assert held.voidcmd("NOOP").startswith("200")
            assert set(server.ready_workers()) == workers and all(alive(pid) for pid in workers)
            log = server.log_text()
            assert "cannot write the audit log" in log and "No space left on device" in log
            assert '"username": "carol"' in log  # the events are in the server log instead
            # space again: the file takes the next event, and the log says how many it missed
            (small / "filler").unlink()
            held.quit()
            deadline = time.monotonic() + 10
            while "written again;" not in server.log_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "written again;" in server.log_text()
            last = (small / "audit.jsonl").read_bytes().split(b"\n")[-2]
            assert json.loads(last)["event"] == "session-end" and json.loads(last)["username"] == "carol"
