"""Starting and signalling the real ``twistd -n sftpauth``: ports that cannot be opened, SIGINT, SIGHUP."""

from __future__ import annotations

import ftplib
import resource
import signal
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.server import REPOSITORY, TWISTD, SftpauthServer, free_port, read_audit

SERVICES = {
    "ftp": "type = ftp",
    "sftp": "type = sftp",
    "manager": "type = manager",
    "ftp-with-workers": "type = ftp",
}


@pytest.mark.parametrize("kind", sorted(SERVICES))
def test_a_port_in_use_stops_start_up_naming_file_line_section_and_option(tmp_path, kind):
    """Exit status 1 and one line: file:line [services/ID] port: cannot listen ... (Address already in use), no traceback."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    workers = "workers = 2" if kind == "ftp-with-workers" else ""
    config = f"""\
[server]
data_folder = {tmp_path}/data
{workers}

[services/other]
type = ftp
address = 127.0.0.1
port = {free_port()}

[services/busy]
{SERVICES[kind]}
address = 127.0.0.1
port = {port}
"""
    server = SftpauthServer(tmp_path / "run", config)
    try:
        server.start()
        status = server.process.wait(30)
    finally:
        server.stop()
        taken.close()
    log = server.log_text()
    assert status == 1, log
    line = config.splitlines().index(f"port = {port}") + 1
    assert (
        f"sftpauth: cannot start: {server.config_path}:{line} [services/busy] port: "
        f"cannot listen on 127.0.0.1:{port}: Address already in use" in log
    ), log
    assert "Traceback" not in log


def test_start_up_reports_every_problem_check_config_reports(tmp_path):
    """QA, session 18: twistd stopped at the configuration's errors and said nothing of the files it names,
    which check-config reads too; now both list the same problems, then the same warnings."""
    path = tmp_path / "sftpauth.ini"
    path.write_text(
        f"""\
[server]
data_folder = {tmp_path}/data

[services/ftps]
type = ftp
port = {free_port()}
ssl_certificate = {tmp_path}/missing.pem

[services/ssh]
type = ssh
port = {free_port()}
sftp = no
bogus_option = 1
""",
        encoding="utf-8",
    )
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY))

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=environment)

    checked = run(str(Path(TWISTD).with_name("sftpauth")), "check-config", str(path))
    assert checked.returncode == 1
    problems = checked.stderr.splitlines()[1:]
    assert [line.split(" [", 1)[0] for line in problems] == [f"{path}:7", f"{path}:13", f"warning: {path}:12"], checked.stderr
    started = run(TWISTD, "-n", "--logfile", "-", "sftpauth", "--config", str(path))
    assert started.returncode == 1
    assert started.stderr.splitlines()[1:] == problems, started.stderr


def test_two_servers_started_from_one_folder_both_run_and_leave_no_pid_file(tmp_path):
    """twistd -n sftpauth --config FILE (SPEC's command) writes no twistd.pid, so a second server in that folder starts too."""
    shared = tmp_path / "shared"
    shared.mkdir()
    servers = []
    for name in ("one", "two"):
        port = free_port()
        config = f"[server]\ndata_folder = {tmp_path}/{name}-data\n\n[services/ftp]\ntype = ftp\nport = {port}\n"
        servers.append(SftpauthServer(tmp_path / name, config, ports=(port,), twistd_options=(), cwd=shared))
    try:
        for server in servers:
            server.start()
        assert all(server.process.poll() is None for server in servers)
        assert list(shared.iterdir()) == []
    finally:
        statuses = [server.stop() for server in servers]
    assert statuses == [0, 0], [server.log_tail() for server in servers]


def test_an_explicit_pidfile_is_still_written(tmp_path):
    """--pidfile FILE keeps twistd's pid file where it is asked for."""
    port = free_port()
    pidfile = tmp_path / "sftpauth.pid"
    config = f"[server]\ndata_folder = {tmp_path}/data\n\n[services/ftp]\ntype = ftp\nport = {port}\n"
    server = SftpauthServer(tmp_path / "run", config, ports=(port,), twistd_options=(f"--pidfile={pidfile}",))
    try:
        server.start()
        assert pidfile.read_text().strip() == str(server.process.pid)
    finally:
        assert server.stop() == 0
    assert not pidfile.exists()


def test_the_soft_limit_on_open_files_is_raised_to_the_hard_limit(tmp_path):
    """Started with the common soft limit of 1,024 open files, the server raises it to the hard limit (and says so)."""
    port = free_port()
    config = f"[server]\ndata_folder = {tmp_path}/data\n\n[services/ftp]\ntype = ftp\nport = {port}\n"
    server = SftpauthServer(tmp_path / "run", config, ports=(port,), open_files=1024)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:
        server.start()
        limits = Path(f"/proc/{server.process.pid}/limits").read_text()
        (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
        assert line.split()[3:5] == [str(hard), str(hard)]
    finally:
        assert server.stop() == 0
    assert f"open files: at most {hard} (raised from 1024)" in server.log_tail()


def test_sigint_stops_cleanly_with_exit_status_0(tmp_path):
    """Ctrl-C (SIGINT) shuts down as SIGTERM does and exits 0, not "killed by SIGINT" (README.rst)."""
    port = free_port()
    config = f"[server]\ndata_folder = {tmp_path}/data\n\n[services/ftp]\ntype = ftp\nport = {port}\n"
    server = SftpauthServer(tmp_path / "run", config, ports=(port,))
    server.start()
    try:
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(15) == 0
    finally:
        server.stop()
    assert "Received SIGINT, shutting down." in server.log_tail()


def _failed_ftp_login(port: int, username: str) -> None:
    with ftplib.FTP() as client:
        client.connect("127.0.0.1", port, timeout=10)
        with pytest.raises(ftplib.error_perm):
            client.login(username, "not-a-password")


def test_sighup_opens_the_audit_log_again_and_never_stops_the_server(tmp_path):
    """One process, no FTPS certificate: SIGHUP killed it (the default action); now it reopens the audit log.

    logrotate moves the file and sends SIGHUP: what comes after goes to a new
    file at the configured path, nothing is lost, and the server goes on.
    """
    port = free_port()
    audit = tmp_path / "run" / "audit.jsonl"  # where server.wait_for_audit reads
    config = (f"[server]\ndata_folder = {tmp_path}/data\naudit_log = {audit}\n\n"
              f"[services/ftp]\ntype = ftp\nport = {port}\n")
    server = SftpauthServer(tmp_path / "run", config, ports=(port,))
    server.start()
    try:
        _failed_ftp_login(port, "before-rotation")
        server.wait_for_audit(lambda event: event.get("username") == "before-rotation")
        audit.rename(audit.with_name("audit.jsonl.1"))
        for _ in range(2):  # a second SIGHUP too: the handler stays installed
            server.process.send_signal(signal.SIGHUP)
            server.wait_for_log(lambda text, times=_ + 1: text.count("opened again") >= times)
        _failed_ftp_login(port, "after-rotation")
        server.wait_for_audit(lambda event: event.get("username") == "after-rotation")
        rotated = {event.get("username") for event in read_audit(audit.with_name("audit.jsonl.1"))}
        assert "before-rotation" in rotated and "after-rotation" not in rotated
    finally:
        assert server.stop() == 0


def test_sighup_says_when_the_configuration_file_changed_and_whether_it_is_valid(tmp_path):
    """SIGHUP applies no configuration change: an edited file is named, with its problems or "restart"."""
    port = free_port()
    config = (f"[server]\ndata_folder = {tmp_path}/data\n\n"
              f"[services/ftp]\ntype = ftp\nport = {port}\n")
    server = SftpauthServer(tmp_path / "run", config, ports=(port,))
    server.start()

    def sighup_and_wait(expected: str) -> str:
        server.process.send_signal(signal.SIGHUP)
        return server.wait_for_log(lambda text: expected in text)

    try:
        server.process.send_signal(signal.SIGHUP)
        time.sleep(1)  # unchanged: nothing to say
        assert server.process.poll() is None and "SIGHUP:" not in server.log_text()
        server.config_path.write_text(config + "bogus_option = 1\n", encoding="utf-8")
        log = sighup_and_wait("is not valid")
        assert f"SIGHUP: {server.config_path} changed since sftpauth started and is not valid" in log
        assert f"{server.config_path}:7 [services/ftp] bogus_option: unknown option" in log
        server.config_path.write_text(config + "banner = Hello\n", encoding="utf-8")
        sighup_and_wait("restart sftpauth to apply the other changes")
    finally:
        assert server.stop() == 0


def test_sigterm_ends_open_ftp_and_sftp_sessions_with_their_session_end(tmp_path):
    """One process: SIGTERM ends the open sessions first, so their session-end (reason shutdown) is written.

    Before, the audit log was closed when the services had stopped, and the
    reactor dropped the connections after that: both session-ends were lost,
    and the clients saw a reset. Now FTP gets 421 and SFTP a disconnect message.
    """
    import paramiko

    from sftpauth.auth.passwords import hash_password

    ftp_port, sftp_port = free_port(), free_port()
    audit = tmp_path / "run" / "audit.jsonl"
    (tmp_path / "bob").mkdir()
    config = (
        f"[server]\ndata_folder = {tmp_path}/data\naudit_log = {audit}\n\n"
        f"[services/ftp]\ntype = ftp\nport = {ftp_port}\n\n[services/sftp]\ntype = sftp\nport = {sftp_port}\n\n"
        f"[accounts/bob]\npassword = {hash_password('bob-pass')}\nhome_folder_path = {tmp_path}/bob\n"
    )
    server = SftpauthServer(tmp_path / "run", config, ports=(ftp_port, sftp_port))
    server.start()
    ftp = ftplib.FTP()
    ssh = paramiko.Transport(("127.0.0.1", sftp_port))
    try:
        ftp.connect("127.0.0.1", ftp_port, timeout=10)
        ftp.login("bob", "bob-pass")
        ssh.connect(username="bob", password="bob-pass")
        assert paramiko.SFTPClient.from_transport(ssh).listdir(".") == []
        server.wait_for_audit(lambda event: event["event"] == "session-start" and event["protocol"] == "sftp")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) == 0
        with pytest.raises(ftplib.error_temp, match="^421 .*shutting down"):
            ftp.getresp()
    finally:
        ftp.close()
        ssh.close()
        server.stop()
    ends = [event for event in read_audit(audit) if event["event"] == "session-end"]
    assert sorted((event["protocol"], event["username"], event.get("reason")) for event in ends) == [
        ("ftp", "bob", "shutdown"),
        ("sftp", "bob", "shutdown"),
    ]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_login_waiting_on_ldap_at_sigterm_is_audited_as_shutdown(tmp_path, workers):
    """QA (lifecycle): a login whose LDAP server had not answered when sftpauth stopped left no audit event.
    SIGTERM now audits it as failed, reason shutdown, with or without workers."""
    from tests.integration.slapd import BlackHole

    hole = BlackHole(accept=True)  # accepts, never answers: the BIND waits for the timeout
    port = free_port()
    audit = tmp_path / "run" / "audit.jsonl"
    config = (
        f"[server]\ndata_folder = {tmp_path}/data\naudit_log = {audit}\nworkers = {workers}\n"
        f"authentications = directory\n\n"
        f"[services/ftp]\ntype = ftp\nport = {port}\n\n"
        f"[groups/DEFAULT_GROUP]\nhome_folder_path = {tmp_path}/homes\ncreate_home_folder = yes\n\n"
        f"[authentications/directory]\ntype = ldap\naddress = 127.0.0.1\nport = {hole.port}\n"
        f"bind_dn = ou=people,dc=example,dc=com\nusername_attribute = uid\ntimeout = 60\n"
    )
    server = SftpauthServer(tmp_path / "run", config, ports=(port,))
    server.start()
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if workers > 1:
            server.ready_workers(workers)
        reader = client.makefile("rb")
        assert reader.readline().startswith(b"220")
        client.sendall(b"USER alice\r\n")
        assert reader.readline().startswith(b"331")
        client.sendall(b"PASS alice-pass\r\n")
        time.sleep(1.0)  # the PASS is read at once; its BIND waits on the black hole for up to 60 s
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
        assert reader.readline().startswith(b"421")  # the client is told, as every open session is
    finally:
        client.close()
        server.stop()
        hole.close()
    logins = [event for event in read_audit(audit) if event["event"] == "authentication"]
    assert [(event["username"], event["outcome"], event["reason"], event["method"]) for event in logins] == [
        ("alice", "failure", "shutdown", "directory")
    ], logins
    log = server.log_text()
    assert "1 logins still in progress at the stop are audited as failed (reason shutdown)" in log
    assert " is down" not in log  # the connections sftpauth closes as it stops say nothing of the server
