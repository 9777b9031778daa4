"""The SFTP service of a real ``twistd -n sftpauth``, driven by paramiko and OpenSSH ``sftp``."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest

from . import jail_race
from .disk import small_file_system
from .server import SftpauthServer, free_port
from .sftp_fixtures import (
    PASSWORDS,
    SERVICE_ID,
    count_events,
    login_event,
    open_fds,
    openssh_fingerprint,
    plugin_on_python_path,
    require_tools,
    run_openssh_sftp,
    server_host_key,
    sftp_config,
    sftp_session,
    ssh_transport,
    start_server,
    wait_for_new_event,
)


class Site:
    def __init__(self, server: SftpauthServer, port: int, folder: Path):
        self.server = server
        self.port = port
        self.folder = folder
        self.homes = folder / "homes"

    def home(self, username: str) -> Path:
        home = self.homes / username
        home.mkdir(parents=True, exist_ok=True)
        return home


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One running server for the module: alice (full control), dave (disabled), rita (read-only)."""
    folder = tmp_path_factory.mktemp("sftp")
    with plugin_on_python_path():
        server, port = start_server(folder)
        try:
            yield Site(server, port, folder)
        finally:
            server.stop()


@pytest.fixture(scope="module")
def keys_site(tmp_path_factory):
    """A second server with generated host keys, a 2 s idle timeout and ``sftp = no``."""
    folder = tmp_path_factory.mktemp("sftp-keys")
    with plugin_on_python_path():
        server, port = start_server(folder, "idle_connection_timeout = 2\nsftp = no")
        try:
            yield Site(server, port, folder)
        finally:
            server.stop()


@pytest.fixture
def alice(site):
    with sftp_session(site.port, "alice") as client:
        yield client


def unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


# -- file operations -----------------------------------------------------------------


def test_upload_then_download(site, alice, tmp_path):
    """A file uploaded with put lands in the home folder and downloads with identical bytes."""
    name = unique("upload") + ".txt"
    local = tmp_path / "local.txt"
    local.write_bytes(b"hello sftp\n")
    alice.put(str(local), name)
    assert (site.home("alice") / name).read_bytes() == b"hello sftp\n"
    alice.get(name, str(tmp_path / "back.txt"))
    assert (tmp_path / "back.txt").read_bytes() == b"hello sftp\n"


def test_listdir_and_listdir_attr(site, alice):
    """listdir names the entries of a folder and listdir_attr gives sizes, types and ls -l lines."""
    folder = unique("listing")
    (site.home("alice") / folder).mkdir()
    (site.home("alice") / folder / "a.txt").write_bytes(b"12345")
    (site.home("alice") / folder / "sub").mkdir()
    assert sorted(alice.listdir(folder)) == ["a.txt", "sub"]
    attributes = {entry.filename: entry for entry in alice.listdir_attr(folder)}
    assert attributes["a.txt"].st_size == 5
    assert stat.S_ISREG(attributes["a.txt"].st_mode)
    assert stat.S_ISDIR(attributes["sub"].st_mode)
    assert re.match(r"-rw-r--r-- +1 alice +DEFAULT_GROUP +5 \w{3} [ \d]\d [ \d]\d:\d\d a\.txt$", attributes["a.txt"].longname)
    assert attributes["sub"].longname.startswith("d")


def test_opendir_on_a_file_fails(site, alice):
    """Listing a file as if it were a folder is an error, not a one-entry listing."""
    name = unique("plain") + ".txt"
    (site.home("alice") / name).write_bytes(b"x")
    with pytest.raises(IOError):
        alice.listdir(name)


def test_a_file_name_with_a_trailing_slash_is_not_the_file(site, alice):
    """``name/`` names a folder, as for OpenSSH's sftp-server (ENOTDIR): the file is neither read, removed nor moved."""
    name = unique("slash") + ".txt"
    (site.home("alice") / name).write_bytes(b"kept")
    for operation in (alice.stat, alice.remove, lambda path: alice.open(path).read(), lambda path: alice.rename(path, name + ".moved")):
        with pytest.raises(IOError, match="not a folder"):
            operation(name + "/")
    with pytest.raises(IOError, match="a file name cannot end with /"):
        alice.open(unique("new") + "/", "w")
    assert (site.home("alice") / name).read_bytes() == b"kept"
    assert alice.stat(name).st_size == 4


def test_rename(site, alice):
    """rename moves a file to its new name."""
    old, new = unique("old"), unique("new")
    (site.home("alice") / old).write_bytes(b"content")
    alice.rename(old, new)
    assert not (site.home("alice") / old).exists()
    assert (site.home("alice") / new).read_bytes() == b"content"


def test_moving_a_folder_into_itself_says_so(site, alice):
    """rename and posix-rename of a folder into its own subfolder: a sentence, not the system's "Invalid argument"."""
    folder = unique("outer")
    (site.home("alice") / folder / "inner").mkdir(parents=True)
    for move in (alice.rename, alice.posix_rename):
        with pytest.raises(IOError, match="a folder cannot be moved into itself"):
            move(folder, f"{folder}/inner/moved")
    assert (site.home("alice") / folder / "inner").is_dir()


def test_rename_does_not_replace_an_existing_file(site, alice):
    """rename onto an existing name fails and both files keep their content (SFTP v3 semantics)."""
    first, second = unique("first"), unique("second")
    (site.home("alice") / first).write_bytes(b"1")
    (site.home("alice") / second).write_bytes(b"2")
    with pytest.raises(IOError):
        alice.rename(first, second)
    assert (site.home("alice") / first).read_bytes() == b"1"
    assert (site.home("alice") / second).read_bytes() == b"2"


def test_remove(site, alice):
    """remove deletes a file; removing it again says no such file."""
    name = unique("remove")
    (site.home("alice") / name).write_bytes(b"x")
    alice.remove(name)
    assert not (site.home("alice") / name).exists()
    with pytest.raises(FileNotFoundError):
        alice.remove(name)


def test_posix_rename_replaces_an_existing_file(site, alice):
    """posix-rename@openssh.com (OpenSSH sftp's rename) replaces the target, as FTP's RNTO; never a folder."""
    home = site.home("alice")
    source, target = unique("posix-source"), unique("posix-target")
    (home / source).write_bytes(b"new")
    (home / target).write_bytes(b"old")
    alice.posix_rename(source, target)
    assert (home / target).read_bytes() == b"new" and not (home / source).exists()
    (home / source).write_bytes(b"again")
    alice.mkdir(target + "-folder")
    with pytest.raises(IOError):
        alice.posix_rename(source, target + "-folder")
    assert (home / source).read_bytes() == b"again"


def test_mkdir_and_rmdir(site, alice):
    """mkdir creates a folder, rmdir of a non-empty folder fails, rmdir of an empty one removes it."""
    folder = unique("folder")
    alice.mkdir(folder)
    assert (site.home("alice") / folder).is_dir()
    alice.mkdir(f"{folder}/inner")
    with pytest.raises(IOError):
        alice.rmdir(folder)
    alice.rmdir(f"{folder}/inner")
    alice.rmdir(folder)
    assert not (site.home("alice") / folder).exists()


def test_stat(site, alice):
    """stat gives the size, type and modification time of files and folders; a missing name is ENOENT."""
    name = unique("stat")
    path = site.home("alice") / name
    path.write_bytes(b"x" * 1234)
    os.utime(path, (1_600_000_000, 1_600_000_000))
    result = alice.stat(name)
    assert result.st_size == 1234
    assert stat.S_ISREG(result.st_mode)
    assert result.st_mtime == 1_600_000_000
    assert stat.S_ISDIR(alice.stat("/").st_mode)
    assert stat.S_ISREG(alice.lstat(name).st_mode)
    with pytest.raises(FileNotFoundError):
        alice.stat(unique("missing"))


def test_setstat_sets_times_and_ignores_permission_bits(site, alice):
    """utime changes the times of a file; chmod is accepted but never changes the mode on disk."""
    name = unique("times")
    path = site.home("alice") / name
    path.write_bytes(b"x")
    os.chmod(path, 0o644)
    alice.utime(name, (1_500_000_000, 1_500_000_100))
    assert path.stat().st_mtime == 1_500_000_100
    alice.chmod(name, 0o777)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_setstat_and_fsetstat_change_the_size(site, alice):
    """truncate by path and by handle (as OpenSSH's scp ends an overwrite); a folder is not a file."""
    name = unique("truncate")
    path = site.home("alice") / name
    path.write_bytes(b"0123456789")
    alice.truncate(name, 4)
    assert path.read_bytes() == b"0123"
    with alice.open(name, "r+") as handle:
        handle.write(b"ab")
        handle.truncate(2)
    assert path.read_bytes() == b"ab"
    with alice.open(name, "r") as handle:  # a handle opened for reading cannot change the file
        with pytest.raises(PermissionError):
            handle.truncate(0)
    assert path.read_bytes() == b"ab"
    alice.mkdir(name + "-folder")
    with pytest.raises(IOError, match="is a folder"):
        alice.truncate(name + "-folder", 0)


def test_append_and_exclusive_create(site, alice):
    """Opening with append adds to the end, and exclusive create refuses an existing file."""
    name = unique("append")
    (site.home("alice") / name).write_bytes(b"abc")
    with alice.open(name, "a") as remote:
        remote.write(b"def")
    assert (site.home("alice") / name).read_bytes() == b"abcdef"
    with pytest.raises(IOError):
        alice.open(name, "x")
    assert (site.home("alice") / name).read_bytes() == b"abcdef"


def test_utf8_names(site, alice):
    """File and folder names in UTF-8 are stored as UTF-8 on disk and listed back unchanged."""
    folder = "données-" + unique("δ")
    name = "résumé 文件 ✓.txt"
    alice.mkdir(folder)
    alice.putfo(io.BytesIO(b"unicode"), f"{folder}/{name}")
    on_disk = os.listdir(os.fsencode(site.home("alice") / folder))
    assert on_disk == [name.encode("utf-8")]
    assert alice.listdir(folder) == [name]
    assert alice.open(f"{folder}/{name}").read() == b"unicode"


def test_five_megabytes_round_trip_byte_exact(site, alice):
    """A 5 MB random file uploads and downloads byte for byte."""
    data = os.urandom(5 * 1024 * 1024)
    name = unique("big") + ".bin"
    alice.putfo(io.BytesIO(data), name)
    on_disk = (site.home("alice") / name).read_bytes()
    assert hashlib.sha256(on_disk).digest() == hashlib.sha256(data).digest()
    downloaded = io.BytesIO()
    alice.getfo(name, downloaded)
    assert downloaded.getvalue() == data


def test_a_full_disk_fails_the_upload_with_the_reason_and_is_logged_once(site, tmp_path):
    """OpenSSH sftp's put onto a full disk fails; the server log says once why, not per write.

    (The message of the answer, "No space left on device", is not shown by OpenSSH: it names the status code.)
    """
    require_tools("sftp", "sshpass")
    (tmp_path / "big.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    with small_file_system(site.home("alice") / "small", 1024 * 1024):
        result = run_openssh_sftp(site.port, "alice", PASSWORDS["alice"], "put big.bin small/big.bin\n", tmp_path)
    output = (result.stdout + result.stderr).decode()
    assert result.returncode != 0 and 'write remote "/small/big.bin": Failure' in output, output
    wanted = "sftp alice: writing /small/big.bin failed after "
    lines = [line for line in site.server.log_text().splitlines() if wanted in line]
    assert len(lines) == 1 and lines[0].endswith(" bytes: No space left on device"), lines


def test_an_ipv4_client_of_a_service_on_every_address_is_audited_by_its_ipv4_address(tmp_path):
    """QA (IPv6): on ``address = ::`` SSH audited ``::ffff:127.0.0.1`` where FTP and the ban events write 127.0.0.1."""
    port = free_port()
    config = sftp_config(tmp_path, port).replace("address = 127.0.0.1", "address = ::")
    server = SftpauthServer(tmp_path, config, ports=(port,))
    with plugin_on_python_path():
        server.start()
    try:
        with sftp_session(port, "alice") as client:
            client.listdir(".")
        event = server.wait_for_audit(lambda e: e["event"] == "authentication" and e["outcome"] == "success")
        assert event["peer"] == "127.0.0.1"
        server.wait_for_audit(lambda e: e["event"] == "session-end")
        peers = {event.get("peer") for event in server.audit_events() if "peer" in event}
        assert peers == {"127.0.0.1"}, peers
    finally:
        server.stop()


# -- permissions ---------------------------------------------------------------------


def test_read_only_account_can_list_and_download(site):
    """An account whose group has allow-read and allow-list lists and downloads."""
    (site.home("rita") / "report.txt").write_bytes(b"numbers")
    with sftp_session(site.port, "rita") as rita:
        assert "report.txt" in rita.listdir("/")
        assert rita.open("report.txt").read() == b"numbers"


def test_read_only_account_cannot_change_anything(site):
    """Upload, overwrite, mkdir, rename, remove and rmdir are permission denied for a read-only account."""
    home = site.home("rita")
    (home / "keep.txt").write_bytes(b"keep")
    (home / "keep-folder").mkdir(exist_ok=True)
    before = sorted(os.listdir(home))
    with sftp_session(site.port, "rita") as rita:
        with pytest.raises(PermissionError):
            rita.putfo(io.BytesIO(b"new"), "new.txt")
        with pytest.raises(PermissionError):
            rita.open("keep.txt", "w")
        with pytest.raises(PermissionError):
            rita.open("keep.txt", "a")
        with pytest.raises(PermissionError):
            rita.mkdir("made")
        with pytest.raises(PermissionError):
            rita.rename("keep.txt", "moved.txt")
        with pytest.raises(PermissionError):
            rita.remove("keep.txt")
        with pytest.raises(PermissionError):
            rita.rmdir("keep-folder")
        with pytest.raises(PermissionError):
            rita.utime("keep.txt", (1, 1))
        with pytest.raises(PermissionError):
            rita.truncate("keep.txt", 0)
        with pytest.raises(PermissionError):
            rita.posix_rename("keep.txt", "moved.txt")
    assert sorted(os.listdir(home)) == before
    assert (home / "keep.txt").read_bytes() == b"keep"


# -- logins --------------------------------------------------------------------------


def test_wrong_password_is_refused_and_audited(site):
    """A wrong password fails the login and the audit log says invalid-password."""
    predicate = login_event("alice", "invalid-password")
    already = count_events(site.server, predicate)
    with pytest.raises(paramiko.AuthenticationException):
        with ssh_transport(site.port, "alice", "not-alice-pass"):
            pass
    event = wait_for_new_event(site.server, predicate, already)
    assert event["outcome"] == "failure"
    assert event["service"] == SERVICE_ID
    assert event["protocol"] == "sftp"
    assert event["peer"] == "127.0.0.1"
    assert "not-alice-pass" not in site.server.log_text()


def test_disabled_account_is_refused_and_audited(site):
    """A disabled account cannot log in even with its right password; the audit reason is account-disabled."""
    predicate = login_event("dave", "account-disabled")
    already = count_events(site.server, predicate)
    with pytest.raises(paramiko.AuthenticationException):
        with ssh_transport(site.port, "dave", PASSWORDS["dave"]):
            pass
    wait_for_new_event(site.server, predicate, already)


def test_non_utf8_username_and_password_fail_cleanly(site):
    """Usernames and passwords that are not UTF-8 are failed logins with an audit event, never a crash."""
    bad_name = login_event("al\\xffice", "invalid-username")  # the byte as text (audit.readable)
    already = count_events(site.server, bad_name)
    with pytest.raises(paramiko.AuthenticationException):
        with ssh_transport(site.port, b"al\xffice", "alice-pass"):
            pass
    wait_for_new_event(site.server, bad_name, already)

    bad_password = login_event("alice", "invalid-password")
    already = count_events(site.server, bad_password)
    with pytest.raises(paramiko.AuthenticationException):
        with ssh_transport(site.port, "alice", b"alice-pass\xff"):
            pass
    event = wait_for_new_event(site.server, bad_password, already)
    assert event["detail"] == "the password is not valid UTF-8"
    with sftp_session(site.port, "alice") as alice:
        alice.listdir("/")


def test_huge_username_is_refused(site):
    """A 100 KB username is a failed login (invalid-username) and the service keeps working."""
    predicate = lambda event: event.get("event") == "authentication" and event.get("reason") == "invalid-username"
    already = count_events(site.server, predicate)
    with pytest.raises(paramiko.AuthenticationException):
        with ssh_transport(site.port, "u" * 100_000, "whatever"):
            pass
    event = wait_for_new_event(site.server, predicate, already)
    assert len(event["username"]) < 1000
    with sftp_session(site.port, "alice") as alice:
        alice.listdir("/")


def test_six_failed_passwords_disconnect(site):
    """After six failed passwords on one connection the server disconnects it."""
    transport = paramiko.Transport(("127.0.0.1", site.port))
    try:
        transport.start_client(timeout=10)
        for _ in range(5):
            with pytest.raises(paramiko.AuthenticationException):
                transport.auth_password("alice", "wrong")
            assert transport.is_active()
        with pytest.raises(paramiko.SSHException):
            transport.auth_password("alice", "wrong")
        deadline = time.monotonic() + 5
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not transport.is_active()
    finally:
        transport.close()


def test_session_end_is_audited_when_the_connection_closes(site):
    """Closing the connection runs the realm's logout: a session-end event follows the session-start."""
    ended = lambda event: event.get("event") == "session-end" and event.get("username") == "alice"
    already = count_events(site.server, ended)
    with sftp_session(site.port, "alice") as alice:
        alice.listdir("/")
    event = wait_for_new_event(site.server, ended, already)
    assert event["protocol"] == "sftp" and event["service"] == SERVICE_ID and event["peer"] == "127.0.0.1"
    # paramiko closes its socket without a disconnect message; with the server's last packets unread,
    # its kernel answers them with a reset, so either ending is what happened.
    assert event["reason"] in ("connection-closed", "connection-lost")


def test_a_client_disconnect_message_ends_the_session_with_reason_logout(site):
    """A client that says goodbye (SSH_MSG_DISCONNECT, as OpenSSH and libssh2 send) gets reason logout."""
    ended = lambda event: event.get("event") == "session-end" and event.get("username") == "alice"
    already = count_events(site.server, ended)
    with ssh_transport(site.port, "alice", PASSWORDS["alice"]) as transport:
        message = paramiko.Message()
        message.add_byte(paramiko.common.cMSG_DISCONNECT)
        message.add_int(11)  # SSH_DISCONNECT_BY_APPLICATION
        message.add_string("disconnected by user")
        message.add_string("")
        transport._send_user_message(message)
        deadline = time.monotonic() + 10
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert wait_for_new_event(site.server, ended, already)["reason"] == "logout"


def test_client_leaving_during_the_password_check_leaves_no_open_session(site):
    """A client that disconnects while its password is checked still gets a session-end for its session-start."""
    started = lambda event: event.get("event") == "session-start" and event.get("username") == "alice"
    ended = lambda event: event.get("event") == "session-end" and event.get("username") == "alice"
    succeeded = lambda event: login_event("alice", "")(event) and event.get("outcome") == "success"
    already = count_events(site.server, succeeded)
    transport = paramiko.Transport(("127.0.0.1", site.port))
    transport.start_client(timeout=10)
    attempt = threading.Thread(target=lambda: _ignore_errors(transport.auth_password, "alice", PASSWORDS["alice"]))
    attempt.start()
    time.sleep(0.1)  # the request is on its way; the password hash takes longer than this
    transport.sock.close()
    transport.close()
    attempt.join(10)
    wait_for_new_event(site.server, succeeded, already)
    deadline = time.monotonic() + 10
    while count_events(site.server, ended) < count_events(site.server, started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count_events(site.server, ended) == count_events(site.server, started)


def _ignore_errors(function, *args):
    try:
        function(*args)
    except Exception:
        pass


# -- the jail ------------------------------------------------------------------------


def test_parent_of_the_home_folder_is_the_home_folder(alice):
    """chdir("..") from / stays at / and ../.. normalises to /."""
    assert alice.normalize(".") == "/"
    alice.chdir("..")
    assert alice.getcwd() == "/"
    assert alice.normalize("../..") == "/"
    assert alice.normalize("/../../etc") == "/etc"


def test_system_files_are_out_of_reach(site, alice, tmp_path):
    """/etc/passwd and ../../etc/passwd name files inside the home folder, which do not exist."""
    with pytest.raises(FileNotFoundError):
        alice.get("/etc/passwd", str(tmp_path / "passwd"))
    with pytest.raises(FileNotFoundError):
        alice.open("../../etc/passwd")
    with pytest.raises(FileNotFoundError):
        alice.open("/../../../../etc/passwd")
    with pytest.raises(FileNotFoundError):
        alice.listdir("/etc")
    assert not (tmp_path / "passwd").exists() or (tmp_path / "passwd").read_bytes() == b""


def test_symlink_leading_outside_is_hidden_and_unreadable(site, alice, tmp_path):
    """A symlink planted in the home folder that points to /etc is not listed, not readable, not statable."""
    home = site.home("alice")
    folder_link, file_link = unique("etc-link"), unique("passwd-link")
    os.symlink("/etc", home / folder_link)
    os.symlink("/etc/passwd", home / file_link)
    names = alice.listdir("/")
    assert folder_link not in names and file_link not in names
    assert folder_link not in [entry.filename for entry in alice.listdir_attr("/")]
    with pytest.raises(FileNotFoundError):
        alice.open(f"{folder_link}/passwd")
    with pytest.raises(FileNotFoundError):
        alice.get(file_link, str(tmp_path / "leak"))
    with pytest.raises(FileNotFoundError):
        alice.listdir(folder_link)
    with pytest.raises(FileNotFoundError):
        alice.stat(file_link)
    with pytest.raises(FileNotFoundError):
        alice.open(file_link, "w")
    assert open("/etc/passwd", "rb").read()  # untouched


def test_symlink_inside_the_home_folder_works(site, alice):
    """A symlink planted in the home folder that points inside it can be listed and read through."""
    home = site.home("alice")
    target = unique("docs")
    (home / target).mkdir()
    (home / target / "inside.txt").write_bytes(b"inside")
    link = unique("docs-link")
    os.symlink(home / target, home / link)
    assert link in alice.listdir("/")
    assert alice.listdir(link) == ["inside.txt"]
    assert alice.open(f"{link}/inside.txt").read() == b"inside"


def test_remove_and_rename_of_a_symlink_act_on_the_link_not_the_file(site, alice):
    """SFTP remove of a link to a file deletes the link, rename renames the link; the file keeps its content."""
    home = site.home("alice")
    target, doomed, moving, moved = unique("linked.txt"), unique("doomed-link"), unique("moving-link"), unique("moved")
    (home / target).write_bytes(b"linked")
    os.symlink(home / target, home / doomed)
    os.symlink(target, home / moving)
    alice.remove(doomed)
    alice.rename(moving, moved)
    assert not os.path.lexists(home / doomed) and not os.path.lexists(home / moving)
    assert os.readlink(home / moved) == target
    assert (home / target).read_bytes() == b"linked"


def test_symlinks_are_listed_and_read_as_links_in_the_session_s_terms(site, alice, tmp_path):
    """READDIR and LSTAT give a link as a link, READLINK its target relative to its folder; STAT follows it.

    As OpenSSH's sftp-server does, so a client deleting a folder recursively
    deletes the link instead of going through it. The target never shows a
    server path, even when the link holds one.
    """
    home = site.home("alice")
    folder, sibling = unique("with-links"), unique("sibling")
    (home / folder).mkdir()
    (home / sibling).mkdir()
    (home / sibling / "s.txt").write_bytes(b"sibling")
    (home / folder / "own.txt").write_bytes(b"own")
    os.symlink(home / sibling, home / folder / "to-sibling")
    os.symlink("..", home / folder / "up")
    os.symlink("own.txt", home / folder / "own-link")
    entries = {entry.filename: entry for entry in alice.listdir_attr(folder)}
    assert sorted(entries) == ["own-link", "own.txt", "to-sibling", "up"]
    for name in ("own-link", "to-sibling", "up"):
        assert stat.S_ISLNK(entries[name].st_mode), name
        assert entries[name].longname.startswith("lrwxrwxrwx"), entries[name].longname
    assert stat.S_ISREG(entries["own.txt"].st_mode)
    assert alice.readlink(f"{folder}/to-sibling") == f"../{sibling}"
    assert alice.readlink(f"{folder}/up") == ".."
    assert alice.readlink(f"{folder}/own-link") == "own.txt"
    assert entries["to-sibling"].st_size == len(f"../{sibling}")  # not the length of the server path it holds
    assert stat.S_ISLNK(alice.lstat(f"{folder}/to-sibling").st_mode)
    assert stat.S_ISDIR(alice.stat(f"{folder}/to-sibling").st_mode)
    assert stat.S_ISDIR(alice.lstat(f"{folder}/to-sibling/").st_mode)  # "link/" is what it points to, as lstat(2)
    assert alice.listdir(f"{folder}/to-sibling") == ["s.txt"]
    with pytest.raises(OSError):
        alice.readlink(f"{folder}/own.txt")  # not a link: a failure, as sftp-server's EINVAL
    os.symlink("/etc", home / folder / "outside")
    with pytest.raises(FileNotFoundError):
        alice.readlink(f"{folder}/outside")
    with pytest.raises(FileNotFoundError):
        alice.lstat(f"{folder}/outside")
    result = run_openssh_sftp(site.port, "alice", PASSWORDS["alice"], f"ls -l {folder}\nls -l {folder}/to-sibling/\n", tmp_path)
    shown = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert re.search(r"^lrwxrwxrwx .* up$", shown, re.M) and re.search(r"^-rw.* own.txt$", shown, re.M), shown
    assert re.search(r"^-rw.* s.txt$", shown, re.M), shown  # OpenSSH's ls of "link/" lstats it first
    assert str(home) not in shown


def test_symlink_creation_is_refused(site, alice):
    """The SFTP symlink request is permission denied and nothing is created."""
    name = unique("made-link")
    with pytest.raises(PermissionError):
        alice.symlink("/etc", name)
    assert not os.path.lexists(site.home("alice") / name)


# -- what is not SFTP ----------------------------------------------------------------


def test_exec_shell_and_pty_are_refused_and_the_connection_still_works(site):
    """exec, shell, pty, x11 requests fail cleanly; SFTP on the same connection works afterwards."""
    with ssh_transport(site.port, "alice", PASSWORDS["alice"]) as transport:
        channel = transport.open_session()
        with pytest.raises(paramiko.SSHException):
            channel.exec_command("cat /etc/passwd")
        channel = transport.open_session()
        with pytest.raises(paramiko.SSHException):
            channel.invoke_shell()
        channel = transport.open_session()
        with pytest.raises(paramiko.SSHException):
            channel.get_pty()
        channel = transport.open_session()
        with pytest.raises(paramiko.SSHException):
            channel.request_x11()
        channel = transport.open_session()
        channel.set_environment_variable("LANG", "C")  # no reply wanted: simply ignored
        channel.request_forward_agent(lambda channel: None)
        with pytest.raises(paramiko.SSHException):
            channel.invoke_subsystem("not-sftp")
        assert transport.is_active()
        client = paramiko.SFTPClient.from_transport(transport)
        assert client.normalize(".") == "/"
        client.close()


def test_port_forwarding_is_refused_and_the_connection_still_works(site):
    """direct-tcpip channels and tcpip-forward requests are refused; SFTP keeps working."""
    with socket.socket() as target:
        target.bind(("127.0.0.1", 0))
        target.listen(1)
        target_port = target.getsockname()[1]
        with ssh_transport(site.port, "alice", PASSWORDS["alice"]) as transport:
            with pytest.raises(paramiko.ChannelException) as refused:
                transport.open_channel("direct-tcpip", ("127.0.0.1", target_port), ("127.0.0.1", 0))
            assert refused.value.code == 1  # SSH_OPEN_ADMINISTRATIVELY_PROHIBITED
            with pytest.raises(paramiko.ChannelException):
                transport.open_channel("forwarded-tcpip", ("127.0.0.1", target_port), ("127.0.0.1", 0))
            with pytest.raises(paramiko.ChannelException):
                transport.open_channel("x11", src_addr=("127.0.0.1", 6000))
            with pytest.raises(paramiko.SSHException):
                transport.request_port_forward("127.0.0.1", 0)
            assert transport.is_active()
            client = paramiko.SFTPClient.from_transport(transport)
            assert client.listdir("/") is not None
            client.close()
        target.settimeout(0.2)
        with pytest.raises(socket.timeout):
            target.accept()  # the server never connected on alice's behalf


# -- robustness ----------------------------------------------------------------------


def test_open_files_are_closed_when_the_session_ends(site):
    """Files a client leaves open are closed when its connection drops: no file descriptor leak."""
    if not os.path.isdir(f"/proc/{site.server.process.pid}/fd"):
        pytest.skip("needs /proc to count file descriptors")
    home = site.home("alice")
    for index in range(20):
        (home / f"leak-{index}.txt").write_bytes(b"x")
    # A first session warms up the thread pool, so its threads do not count.
    with sftp_session(site.port, "alice") as alice:
        alice.listdir("/")
    time.sleep(0.5)
    baseline = open_fds(site.server.process.pid)
    transport = paramiko.Transport(("127.0.0.1", site.port))
    transport.connect(username="alice", password=PASSWORDS["alice"])
    client = paramiko.SFTPClient.from_transport(transport)
    handles = [client.open(f"leak-{index}.txt") for index in range(20)]
    handles.append(client.open(unique("leak-written"), "w"))
    assert open_fds(site.server.process.pid) >= baseline + 21
    transport.sock.close()  # the client vanishes without closing anything
    transport.close()
    deadline = time.monotonic() + 10
    while open_fds(site.server.process.pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(site.server.process.pid) <= baseline


def test_oversized_sftp_packet_ends_only_that_session(site):
    """An SFTP packet announcing more than 256 KB closes that session; the connection's other sessions go on.

    The connection's session-end then says protocol-error, however the client leaves.
    """
    ended = lambda event: event.get("event") == "session-end" and event.get("username") == "alice"
    already = count_events(site.server, ended)
    with ssh_transport(site.port, "alice", PASSWORDS["alice"]) as transport:
        good = paramiko.SFTPClient.from_transport(transport)
        channel = transport.open_session()
        channel.invoke_subsystem("sftp")
        channel.sendall(struct.pack("!LB", 2**31, 1) + b"\0" * 1000)
        channel.settimeout(10)
        assert channel.recv(1024) == b""  # closed by the server
        assert good.normalize(".") == "/"
        good.close()
    assert wait_for_new_event(site.server, ended, already)["reason"] == "protocol-error"


def test_requests_on_unknown_handles_get_an_error(site, alice):
    """READ, WRITE, FSTAT, READDIR and CLOSE on a handle the server never gave are answered with an error."""
    from paramiko import sftp as protocol

    for request in (
        (protocol.CMD_READ, b"bogus", protocol.int64(0), 10),
        (protocol.CMD_WRITE, b"bogus", protocol.int64(0), b"data"),
        (protocol.CMD_FSTAT, b"bogus"),
        (protocol.CMD_READDIR, b"bogus"),
        (protocol.CMD_CLOSE, b"bogus"),
    ):
        with pytest.raises(IOError):
            alice._request(*request)
    assert alice.normalize(".") == "/"


def _sftp_packet(kind: int, payload: bytes) -> bytes:
    return struct.pack("!LB", len(payload) + 1, kind) + payload


def _read_sftp_packet(channel) -> tuple[int, bytes]:
    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = channel.recv(count - len(data))
            assert chunk, "the server closed the SFTP session"
            data += chunk
        return data

    length, kind = struct.unpack("!LB", exactly(5))
    return kind, exactly(length - 1)


def test_malformed_and_unknown_requests_are_answered(site):
    """A truncated request gets "bad message", an unknown type "unsupported", and the session goes on."""
    with ssh_transport(site.port, "alice", PASSWORDS["alice"]) as transport:
        channel = transport.open_session()
        channel.settimeout(10)
        channel.invoke_subsystem("sftp")
        channel.sendall(_sftp_packet(1, struct.pack("!L", 3)))  # INIT, version 3
        assert _read_sftp_packet(channel)[0] == 2  # VERSION
        channel.sendall(_sftp_packet(5, struct.pack("!L", 7) + b"\0\0"))  # READ, cut short
        kind, payload = _read_sftp_packet(channel)
        assert (kind, payload[:8]) == (101, struct.pack("!LL", 7, 5))  # STATUS, id 7, FX_BAD_MESSAGE
        channel.sendall(_sftp_packet(150, struct.pack("!L", 8)))  # no such request type
        kind, payload = _read_sftp_packet(channel)
        assert (kind, payload[:8]) == (101, struct.pack("!LL", 8, 8))  # STATUS, id 8, FX_OP_UNSUPPORTED
        channel.sendall(_sftp_packet(16, struct.pack("!L", 9) + struct.pack("!L", 1) + b"."))  # REALPATH .
        kind, payload = _read_sftp_packet(channel)
        assert kind == 104 and payload.endswith(b"/" + struct.pack("!L", 0) + struct.pack("!L", 0))  # NAME "/"


def _version_extensions(payload: bytes) -> dict[bytes, bytes]:
    extensions, rest = {}, payload[4:]
    while rest:
        (length,) = struct.unpack_from("!L", rest)
        name, rest = rest[4 : 4 + length], rest[4 + length :]
        (length,) = struct.unpack_from("!L", rest)
        extensions[name], rest = rest[4 : 4 + length], rest[4 + length :]
    return extensions


def _extended(channel, request_id: int, name: bytes, data: bytes = b"") -> tuple[int, bytes]:
    channel.sendall(_sftp_packet(200, struct.pack("!L", request_id) + _ns(name) + data))
    kind, payload = _read_sftp_packet(channel)
    assert payload[:4] == struct.pack("!L", request_id)
    return kind, payload[4:]


def test_openssh_extensions_are_announced_and_answered(site):
    """VERSION announces OpenSSH's extensions; limits, statvfs, fstatvfs and fsync answer as sftp-server does."""
    name = unique("extensions") + ".txt"
    (site.home("alice") / name).write_bytes(b"x" * 10)
    with ssh_transport(site.port, "alice", PASSWORDS["alice"]) as transport:
        channel = transport.open_session()
        channel.settimeout(10)
        channel.invoke_subsystem("sftp")
        channel.sendall(_sftp_packet(1, struct.pack("!L", 3)))
        kind, payload = _read_sftp_packet(channel)
        assert kind == 2 and payload[:4] == struct.pack("!L", 3)
        assert _version_extensions(payload) == {
            b"posix-rename@openssh.com": b"1",
            b"statvfs@openssh.com": b"2",
            b"fstatvfs@openssh.com": b"2",
            b"fsync@openssh.com": b"1",
            b"limits@openssh.com": b"1",
        }
        kind, body = _extended(channel, 1, b"limits@openssh.com")
        assert kind == 201  # EXTENDED_REPLY: packet, read, write, open handles
        assert struct.unpack("!4Q", body) == (262144, 261120, 261120, 256)
        kind, body = _extended(channel, 2, b"statvfs@openssh.com", _ns(b"/"))
        assert kind == 201 and len(body) == 88
        values = struct.unpack("!11Q", body)
        disk = os.statvfs(site.home("alice"))
        assert values[:3] == (disk.f_bsize, disk.f_frsize, disk.f_blocks) and values[10] == disk.f_namemax
        kind, body = _extended(channel, 3, b"statvfs@openssh.com", _ns(b"/../../etc/no-such"))
        assert (kind, body[:4]) == (101, struct.pack("!L", 2))  # STATUS, FX_NO_SUCH_FILE
        channel.sendall(_sftp_packet(3, struct.pack("!L", 4) + _ns(name.encode()) + struct.pack("!LL", 2 | 1, 0)))
        kind, payload = _read_sftp_packet(channel)
        assert kind == 102  # HANDLE (opened for writing)
        handle = payload[8:]
        kind, body = _extended(channel, 5, b"fstatvfs@openssh.com", _ns(handle))
        assert kind == 201 and struct.unpack("!11Q", body)[2] == disk.f_blocks
        kind, body = _extended(channel, 6, b"fsync@openssh.com", _ns(handle))
        assert (kind, body[:4]) == (101, struct.pack("!L", 0))  # STATUS, FX_OK
        kind, body = _extended(channel, 7, b"fsync@openssh.com", _ns(b"no-such-handle"))
        assert (kind, body[:4]) == (101, struct.pack("!L", 4))  # FX_FAILURE: invalid handle
        kind, body = _extended(channel, 8, b"hardlink@openssh.com", _ns(name.encode()) + _ns(b"linked"))
        assert (kind, body[:4]) == (101, struct.pack("!L", 8))  # FX_OP_UNSUPPORTED
        kind, body = _extended(channel, 9, b"posix-rename@openssh.com", _ns(name.encode()))  # the new name is missing
        assert (kind, body[:4]) == (101, struct.pack("!L", 5))  # FX_BAD_MESSAGE
        (site.home("alice") / (name + "-folder")).mkdir()
        channel.sendall(_sftp_packet(14, struct.pack("!L", 10) + _ns(name.encode() + b"-folder") + struct.pack("!L", 0)))
        kind, payload = _read_sftp_packet(channel)
        # SFTP v3 has no FILE_ALREADY_EXISTS (11): OpenSSH's sftp would print "Unknown status".
        assert (kind, payload[:8]) == (101, struct.pack("!LL", 10, 4))
    assert not (site.home("alice") / "linked").exists()


def test_client_leaving_mid_handshake_does_not_hurt_the_service(site):
    """Clients that close after the version line, after half a packet, send garbage or close at once leave the service working."""
    kexinit = b"\x14" + b"\0" * 16 + b"\xff\xff\xff\xff"  # a name-list claiming 4 GB
    padding = 8 - (5 + len(kexinit)) % 8 + 8
    garbage_packet = struct.pack("!LB", 1 + len(kexinit) + padding, padding) + kexinit + b"\0" * padding
    for payload in (
        b"SSH-2.0-OpenSSH_9.2 half-done\r\n",
        b"SSH-2.0-x\r\n\x00\x00\x01\x00\x05\x14",
        b"",
        b"garbage\n" * 100,
        b"SSH-2.0-x\r\n" + garbage_packet,
        b"SSH-1.5-old\r\n",
    ):
        with socket.create_connection(("127.0.0.1", site.port), timeout=5) as raw:
            if payload:
                assert raw.recv(256).startswith(b"SSH-2.0-")
                raw.sendall(payload)
    assert site.server.process.poll() is None
    with sftp_session(site.port, "alice") as alice:
        assert alice.normalize(".") == "/"
    assert "Traceback" not in site.server.log_tail(200)


# -- limits under hostile use --------------------------------------------------------


def _bytes_read_by(pid: int) -> int:
    """Bytes the process read with read()/pread() so far (its files and sockets)."""
    with open(f"/proc/{pid}/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


def _raw_sftp_session(transport):
    """A session channel with the sftp subsystem, INIT done: for requests no client library would send."""
    channel = transport.open_session()
    channel.settimeout(10)
    channel.invoke_subsystem("sftp")
    channel.sendall(_sftp_packet(1, struct.pack("!L", 3)))
    assert _read_sftp_packet(channel)[0] == 2
    return channel


def test_pipelined_reads_nobody_collects_are_not_served_for_nobody(site):
    """Thousands of pipelined 256 KB reads whose answers are never read: the server stops taking the requests, reads a bounded amount, drops the rest when the client leaves, and other logins go on."""
    pid = site.server.process.pid
    if not os.path.exists(f"/proc/{pid}/io"):
        pytest.skip("needs /proc/PID/io to count the bytes the server reads")
    name = unique("pipelined") + ".bin"
    (site.home("alice") / name).write_bytes(os.urandom(4 * 1024 * 1024))
    wanted = 8000
    with ssh_transport(site.port, "alice", PASSWORDS["alice"]) as transport:
        channel = _raw_sftp_session(transport)
        channel.sendall(_sftp_packet(3, struct.pack("!L", 1) + _ns(name.encode()) + struct.pack("!LL", 1, 0)))
        kind, payload = _read_sftp_packet(channel)
        assert kind == 102  # HANDLE
        handle = payload[8:]
        before = _bytes_read_by(pid)
        channel.settimeout(3)  # paramiko's send waits this long for the server to open its window
        sent = 0
        try:
            for index in range(wanted):
                offset = (index * 262144) % (4 * 1024 * 1024)
                channel.sendall(_sftp_packet(5, struct.pack("!L", 10 + index) + _ns(handle) + struct.pack("!QL", offset, 262144)))
                sent += 1
        except socket.timeout:
            pass
        assert sent < wanted  # the server stopped reading: the client has to wait
    with sftp_session(site.port, "alice") as other:  # another login and listing still work
        assert name in other.listdir("/")
    time.sleep(1)
    # Every READ served costs 256 KB of file reading; the bound is a few dozen, not `sent`.
    assert _bytes_read_by(pid) - before < 64 * 1024 * 1024
    assert site.server.process.poll() is None


def _ns(data: bytes) -> bytes:
    return struct.pack("!L", len(data)) + data


def test_open_handles_are_limited_per_connection_not_per_session(site):
    """Files open in all SFTP sessions of one connection count together: 256, then "too many open files"."""
    name = unique("handles") + ".txt"
    (site.home("alice") / name).write_bytes(b"x")
    with ssh_transport(site.port, "alice", PASSWORDS["alice"]) as transport:
        sessions = [paramiko.SFTPClient.from_transport(transport) for _ in range(3)]
        opened, refusals = [], []
        for session in sessions:
            for _ in range(100):
                try:
                    opened.append(session.open(name))
                except IOError as error:
                    refusals.append(str(error))
        assert len(opened) == 256
        assert refusals and set(refusals) == {"too many open files (at most 256)"}
        opened.pop(0).close()
        sessions[2].open(name).close()  # a closed handle is free again, for any session
        for session in sessions:
            session.close()


def test_big_folder_listing_is_complete_and_exact(site, alice):
    """A folder of 3,000 files is listed whole, each entry with its ls -l line and attributes.

    The entries come in the folder's own order, read a batch at a time, as
    OpenSSH's sftp-server sends them (clients sort): an open listing holds
    one batch in memory, not the folder.
    """
    from sftpauth.ssh import long_name

    folder = site.home("alice") / unique("big-listing")
    folder.mkdir()
    names = [f"file_{index:05d}_with_a_longish_name.txt" for index in range(3000)]
    for index, name in enumerate(names):
        (folder / name).write_bytes(b"x" * (index % 7))
    entries = alice.listdir_attr(folder.name)
    assert sorted(entry.filename for entry in entries) == names
    for entry in entries:
        result = os.stat(folder / entry.filename)
        assert entry.longname == long_name(entry.filename, result, "alice", "DEFAULT_GROUP")
        assert (entry.st_size, entry.st_mode, entry.st_mtime) == (result.st_size, result.st_mode, int(result.st_mtime))


# -- names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["line\nfeed", "forged\n-rw-r--r--   1 root root 9 Jan 01 00:00 PAYROLL.xlsx", "esc\x1b]0;title\x07", "cr\r", "del\x7f"])
def test_names_with_control_characters_are_refused(site, alice, name):
    """Upload, mkdir and rename to a name with a C0 control character or DEL fail with "file name not allowed"; nothing is created."""
    home = site.home("alice")
    source = unique("source")
    (home / source).write_bytes(b"x")
    before = sorted(os.listdir(home))
    for attempt in (
        lambda: alice.putfo(io.BytesIO(b"data"), name),
        lambda: alice.mkdir(name),
        lambda: alice.rename(source, name),
    ):
        with pytest.raises(IOError) as refused:
            attempt()
        assert "file name not allowed: the name contains" in str(refused.value)
    assert sorted(os.listdir(home)) == before


def test_existing_names_with_control_characters_stay_usable(site, alice):
    """A file made on the server with a line feed in its name is listed, downloaded and deleted over SFTP."""
    name = unique("made") + "\nelsewhere"
    (site.home("alice") / name).write_bytes(b"content")
    assert name in alice.listdir("/")
    assert alice.open(name).read() == b"content"
    alice.remove(name)
    assert not (site.home("alice") / name).exists()


def test_existing_names_that_are_not_utf8_stay_usable(site, tmp_path):
    """A file made on the server with a Latin-1 name is listed, downloaded, renamed and deleted by OpenSSH sftp; a new such name is refused."""
    require_tools("sshpass", "sftp")
    home = os.fsencode(site.home("alice"))
    stem = unique("latin1").encode()
    (Path(os.fsdecode(os.path.join(home, stem + b"-caf\xe9.txt")))).write_bytes(b"old file")
    (Path(os.fsdecode(os.path.join(home, stem + b"-d\xe9j\xe0.txt")))).write_bytes(b"to delete")
    local = tmp_path / "upload.txt"
    local.write_bytes(b"new")
    batch = (
        b"ls -1\n"
        b"get " + stem + b"-caf\xe9.txt " + os.fsencode(tmp_path) + b"/got.txt\n"
        b"rename " + stem + b"-caf\xe9.txt " + stem + b"-caf\xc3\xa9.txt\n"
        b"rm " + stem + b"-d\xe9j\xe0.txt\n"
        b"-put " + os.fsencode(local) + b" " + stem + b"-new\xff.txt\n"
    )
    result = run_openssh_sftp(site.port, "alice", PASSWORDS["alice"], batch.decode("utf-8", "surrogateescape"), tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output.decode(errors="replace")
    assert stem + b"-caf\\351.txt" in result.stdout  # listed with its own bytes (sftp prints them in octal)
    assert (tmp_path / "got.txt").read_bytes() == b"old file"
    assert sorted(name for name in os.listdir(home) if name.startswith(stem)) == [stem + b"-caf\xc3\xa9.txt"]
    assert b"-new\\377.txt\": Bad message" in result.stderr  # the new name was refused, nothing made


# -- SSH algorithms ------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, refused",
    [
        ("-oKexAlgorithms=diffie-hellman-group14-sha1", "key exchange method"),
        ("-oKexAlgorithms=diffie-hellman-group1-sha1", "key exchange method"),
        ("-oHostKeyAlgorithms=ssh-rsa", "host key type"),
        ("-oCiphers=aes128-cbc,aes256-cbc,3des-cbc", "cipher"),
        ("-oMACs=hmac-sha1,hmac-md5", "MAC"),
    ],
)
def test_weak_ssh_algorithms_are_refused(site, tmp_path, option, refused):
    """An OpenSSH client that allows only SHA-1 key exchange or signatures, CBC or 3DES, or SHA-1/MD5 MACs cannot connect."""
    require_tools("sshpass", "sftp")
    result = run_openssh_sftp(site.port, "alice", PASSWORDS["alice"], "pwd\n", tmp_path, options=(option,))
    assert result.returncode != 0
    assert f"no matching {refused}" in result.stderr.decode(errors="replace")


@pytest.mark.parametrize(
    "options",
    [
        ("-oKexAlgorithms=curve25519-sha256", "-oHostKeyAlgorithms=ssh-ed25519", "-oCiphers=aes256-ctr", "-oMACs=hmac-sha2-512"),
        ("-oKexAlgorithms=ecdh-sha2-nistp256", "-oHostKeyAlgorithms=rsa-sha2-256", "-oCiphers=aes128-ctr", "-oMACs=hmac-sha2-256"),
        ("-oHostKeyAlgorithms=rsa-sha2-512",),
    ],
)
def test_modern_ssh_algorithms_connect(site, tmp_path, options):
    """OpenSSH sftp connects with each modern key exchange, host key signature, cipher and MAC kept."""
    require_tools("sshpass", "sftp")
    result = run_openssh_sftp(site.port, "alice", PASSWORDS["alice"], "pwd\n", tmp_path, options=options)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert "Remote working directory: /" in result.stdout.decode(errors="replace")


def test_libssh2_logs_in_and_lists(site):
    """libssh2 (ssh2-python, the benchmarks' client) negotiates with the trimmed algorithms, logs in and lists."""
    from ssh2 import session as ssh2_session  # ssh2-python, in the test extras: never skipped
    (site.home("alice") / "for-libssh2.txt").write_bytes(b"x")
    with socket.create_connection(("127.0.0.1", site.port), timeout=10) as sock:
        session = ssh2_session.Session()
        session.handshake(sock)
        session.userauth_password("alice", PASSWORDS["alice"])
        sftp = session.sftp_init()
        listing = sftp.opendir(".")
        names = [name for _, name, _ in listing.readdir()]
        listing.close()
        session.disconnect()
        listing = sftp = session = None
    assert b"for-libssh2.txt" in names


# -- host keys, idle timeout, sftp = no ----------------------------------------------


def test_generated_host_keys_are_private_and_stable_across_restarts(keys_site):
    """Generated Ed25519 and RSA keys are 0600 in a 0700 folder, logged at start and reused after a restart."""
    folder = keys_site.folder / "data" / "ssh"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    key_files = sorted(path.name for path in folder.iterdir())
    assert key_files == ["ssh_host_ed25519_key", "ssh_host_rsa_key"]
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ed25519_before = server_host_key(keys_site.port)
    rsa_before = server_host_key(keys_site.port, disabled_algorithms={"keys": ["ssh-ed25519"]})
    assert ed25519_before.get_name() == "ssh-ed25519"
    assert rsa_before.get_name() == "ssh-rsa" and rsa_before.get_bits() == 3072
    log = keys_site.server.log_text()
    assert openssh_fingerprint(ed25519_before) in log
    assert openssh_fingerprint(rsa_before) in log

    keys_site.server.stop()
    keys_site.server.start()
    assert server_host_key(keys_site.port) == ed25519_before
    assert server_host_key(keys_site.port, disabled_algorithms={"keys": ["ssh-ed25519"]}) == rsa_before
    log = keys_site.server.log_text()
    assert log.count(openssh_fingerprint(ed25519_before)) == 2


def test_idle_connection_is_closed(keys_site):
    """A logged-in connection that sends nothing for idle_connection_timeout seconds is disconnected."""
    ended = lambda event: event.get("event") == "session-end" and event.get("username") == "alice"
    already = count_events(keys_site.server, ended)
    with ssh_transport(keys_site.port, "alice", PASSWORDS["alice"]) as transport:
        assert transport.is_active()
        deadline = time.monotonic() + 10
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not transport.is_active()
        assert time.monotonic() < deadline
    assert wait_for_new_event(keys_site.server, ended, already)["reason"] == "idle-timeout"


def test_sftp_no_refuses_the_subsystem(keys_site):
    """With sftp = no, the login works but the sftp subsystem is refused."""
    with ssh_transport(keys_site.port, "alice", PASSWORDS["alice"]) as transport:
        with pytest.raises(paramiko.SSHException):
            paramiko.SFTPClient.from_transport(transport)


def test_configured_host_keys_are_used(tmp_path):
    """Keys listed in ssh_server_keys (PEM RSA, OpenSSH Ed25519) are the host keys clients see."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    rsa_path, ed25519_path = tmp_path / "host_rsa.pem", tmp_path / "host_ed25519"
    rsa_key = paramiko.RSAKey.generate(2048)
    rsa_key.write_private_key_file(str(rsa_path))
    assert rsa_path.read_text().startswith("-----BEGIN RSA PRIVATE KEY-----")
    ed25519_path.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    ed25519_key = paramiko.Ed25519Key.from_private_key_file(str(ed25519_path))
    with plugin_on_python_path():
        server, port = start_server(tmp_path / "server", f"ssh_server_keys = {rsa_path}, {ed25519_path}")
        try:
            assert server_host_key(port).asbytes() == ed25519_key.asbytes()
            assert server_host_key(port, {"keys": ["ssh-ed25519"]}).asbytes() == rsa_key.asbytes()
            log = server.log_text()
            assert openssh_fingerprint(rsa_key) in log and openssh_fingerprint(ed25519_key) in log
            assert not (tmp_path / "server" / "data" / "ssh").exists()  # nothing generated
        finally:
            server.stop()


def test_missing_host_key_file_stops_the_start(tmp_path):
    """An unreadable ssh_server_keys file makes twistd exit 1 with a message (no traceback) naming file, section and option."""
    folder = tmp_path / "server"
    port = free_port()
    missing = tmp_path / "no-such-key"
    server = SftpauthServer(folder, sftp_config(folder, port, f"ssh_server_keys = {missing}"), ports=(port,))
    with plugin_on_python_path():
        with pytest.raises(RuntimeError) as stopped:
            server.start()
    message = str(stopped.value)
    assert "exited with 1" in message
    assert f"[services/{SERVICE_ID}] ssh_server_keys: cannot read the SSH host key {missing}" in message
    assert "sftpauth.ini" in message
    assert "Traceback" not in message


def test_every_unusable_host_key_is_a_configuration_problem(tmp_path):
    """Missing, public, encrypted, garbage and duplicate-type key files each get a problem naming the file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from sftpauth.config.errors import ConfigError
    from sftpauth.config.loader import load_configuration
    from sftpauth.ssh import load_host_keys

    def ed25519_file(name: str, encryption=serialization.NoEncryption()) -> Path:
        path = tmp_path / name
        key = ed25519.Ed25519PrivateKey.generate()
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, encryption))
        return path

    good = ed25519_file("good")
    public = tmp_path / "public.pub"
    good_key = paramiko.Ed25519Key.from_private_key_file(str(good))
    public.write_text(f"{good_key.get_name()} {good_key.get_base64()} test\n")
    encrypted = ed25519_file("encrypted", serialization.BestAvailableEncryption(b"secret"))
    garbage = tmp_path / "garbage"
    garbage.write_text("not a key\n")
    second = ed25519_file("second")
    missing = tmp_path / "missing"
    keys = [good, missing, public, encrypted, garbage, second]
    config = tmp_path / "sftpauth.ini"
    config.write_text(sftp_config(tmp_path, 2222, "ssh_server_keys = " + ", ".join(map(str, keys))))
    configuration = load_configuration(str(config))
    with pytest.raises(ConfigError) as refused:
        load_host_keys(configuration.services[SERVICE_ID], configuration.path, configuration.server.data_folder)
    problems = refused.value.problems
    assert [(p.section, p.option) for p in problems] == [(f"services/{SERVICE_ID}", "ssh_server_keys")] * 5
    assert all(p.path == str(config) for p in problems)
    messages = [p.message for p in problems]
    for path, words in (
        (missing, "cannot read"),
        (public, "public key"),
        (encrypted, "passphrase"),
        (garbage, "not a private key"),
        (second, "second ssh-ed25519 key"),
    ):
        assert any(str(path) in message and words in message for message in messages), (path, messages)
    assert "secret" not in str(refused.value)


def test_damaged_generated_key_is_reported_not_replaced(tmp_path):
    """A generated host key that no longer parses stops the start instead of silently changing the fingerprint."""
    from sftpauth.config.errors import ConfigError
    from sftpauth.ssh import generated_host_keys

    folder = tmp_path / "ssh"
    first = generated_host_keys(str(folder), "sftpauth.ini")
    assert sorted(first) == [b"ssh-ed25519", b"ssh-rsa"]
    assert generated_host_keys(str(folder), "sftpauth.ini")[b"ssh-ed25519"] == first[b"ssh-ed25519"]
    (folder / "ssh_host_ed25519_key").write_text("truncated")
    with pytest.raises(ConfigError) as refused:
        generated_host_keys(str(folder), "sftpauth.ini")
    assert "ssh_host_ed25519_key is damaged" in str(refused.value)
    assert (folder / "ssh_host_ed25519_key").read_text() == "truncated"


# -- OpenSSH -------------------------------------------------------------------------


def test_openssh_sftp_put_ls_get_rename_rm(site, tmp_path):
    """OpenSSH sftp (password via sshpass) uploads, lists, downloads, renames and removes files."""
    require_tools("sshpass", "sftp")
    local = tmp_path / "openssh-upload.txt"
    local.write_bytes(b"from openssh\n" * 1000)
    name = unique("openssh")
    batch = (
        f"put {local} {name}.txt\n"
        "ls -l\n"
        f"get {name}.txt {tmp_path}/downloaded.txt\n"
        f"rename {name}.txt {name}-renamed.txt\n"
        "ls\n"
        "cd ..\n"
        "pwd\n"
        f"rm {name}-renamed.txt\n"
        "ls\n"
    )
    ended = lambda event: event.get("event") == "session-end" and event.get("username") == "alice"
    already = count_events(site.server, ended)
    result = run_openssh_sftp(site.port, "alice", PASSWORDS["alice"], batch, tmp_path)
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output + result.stderr.decode(errors="replace")
    assert wait_for_new_event(site.server, ended, already)["reason"] == "logout"  # OpenSSH says goodbye
    assert (tmp_path / "downloaded.txt").read_bytes() == local.read_bytes()
    assert re.search(rf"-rw-r--r-- .* {name}\.txt", output)
    assert f"{name}-renamed.txt" in output
    assert "Remote working directory: /\n" in output
    home = site.home("alice")
    assert not (home / f"{name}.txt").exists() and not (home / f"{name}-renamed.txt").exists()


def _openssh(program: str, port: int, *arguments: str, stdin=None):
    """OpenSSH ``ssh`` or ``scp`` as alice, with her password through sshpass."""
    port_option = "-P" if program == "scp" else "-p"
    return subprocess.run(
        [
            "sshpass", "-p", PASSWORDS["alice"],
            program, "-oBatchMode=no", "-oStrictHostKeyChecking=no", "-oUserKnownHostsFile=/dev/null",
            "-oPreferredAuthentications=password", "-oPubkeyAuthentication=no", port_option, str(port), *arguments,
        ],
        stdin=subprocess.DEVNULL if stdin is None else stdin,
        capture_output=True,
        timeout=60,
    )


def test_openssh_scp_overwrites_a_bigger_file_and_exits_0(site, tmp_path):
    """scp (over SFTP) writes a file, truncates it to what it wrote and exits with the session's exit status 0."""
    require_tools("sshpass", "scp")
    name = unique("scp") + ".txt"
    target = site.home("alice") / name
    target.write_bytes(b"old content, much longer than the new one\n" * 1000)
    local = tmp_path / "short.txt"
    local.write_bytes(b"short content\n")
    result = _openssh("scp", site.port, "-s", str(local), f"alice@127.0.0.1:{name}")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert target.read_bytes() == b"short content\n"
    result = _openssh("scp", site.port, "-s", f"alice@127.0.0.1:{name}", str(tmp_path / "back.txt"))
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert (tmp_path / "back.txt").read_bytes() == b"short content\n"


def test_openssh_ssh_sftp_subsystem_exits_0(site, tmp_path):
    """``ssh -s ... sftp`` whose input ends gets exit status 0, as from sshd (not ssh's 255 for "no status")."""
    require_tools("sshpass", "ssh")
    result = _openssh("ssh", site.port, "-s", "alice@127.0.0.1", "sftp")
    assert result.returncode == 0, result.stderr.decode(errors="replace")


def test_openssh_sftp_df_rename_over_and_big_reads(site, tmp_path):
    """OpenSSH sftp: df (statvfs), rename onto an existing file (posix-rename) and get with 256 KiB reads (-B)."""
    require_tools("sshpass", "sftp")
    home = site.home("alice")
    name = unique("openssh-ext")
    big = os.urandom(3 * 1024 * 1024 + 17)
    (home / f"{name}.bin").write_bytes(big)
    (home / f"{name}-a.txt").write_bytes(b"a")
    (home / f"{name}-b.txt").write_bytes(b"b")
    batch = (
        "df\n"
        f"rename {name}-a.txt {name}-b.txt\n"
        f"get {name}.bin {tmp_path}/big.bin\n"
    )
    result = run_openssh_sftp(site.port, "alice", PASSWORDS["alice"], batch, tmp_path, options=("-B", "262144"))
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, output
    assert re.search(r"Size\s+Used\s+Avail", output), output
    assert (home / f"{name}-b.txt").read_bytes() == b"a" and not (home / f"{name}-a.txt").exists()
    assert (tmp_path / "big.bin").read_bytes() == big


def test_openssh_sftp_wrong_password_fails(site, tmp_path):
    """OpenSSH sftp with a wrong password fails and transfers nothing."""
    require_tools("sshpass", "sftp")
    result = run_openssh_sftp(site.port, "alice", "wrong-pass", "ls\n", tmp_path)
    assert result.returncode != 0


def test_openssh_ssh_command_is_refused(site, tmp_path):
    """OpenSSH ssh can log in but a remote command is refused, so nothing runs."""
    require_tools("sshpass", "ssh")
    marker = tmp_path / "should-not-exist"
    result = subprocess.run(
        [
            "sshpass", "-p", PASSWORDS["alice"],
            "ssh", "-oBatchMode=no", "-oStrictHostKeyChecking=no", "-oUserKnownHostsFile=/dev/null",
            "-oPreferredAuthentications=password", "-oPubkeyAuthentication=no", "-T",
            "-p", str(site.port), "alice@127.0.0.1", f"touch {marker}",
        ],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert not marker.exists()
    with sftp_session(site.port, "alice") as alice:
        alice.listdir("/")


def test_server_log_has_no_unhandled_errors(site):
    """After every test above, the server log holds no traceback or unhandled error (runs last)."""
    log = site.server.log_text()
    assert "Traceback" not in log
    assert "Unhandled" not in log
    assert site.server.process.poll() is None


def test_ssh_compression_is_not_offered(site):
    """No zlib (it would start before login and inflate without limit: a decompression bomb); a zlib-only client is refused."""
    transport = paramiko.Transport(("127.0.0.1", site.port))
    transport.get_security_options().compression = ("zlib",)
    try:
        with pytest.raises(paramiko.SSHException, match="compression"):
            transport.start_client(timeout=20)
    finally:
        transport.close()
    with ssh_transport(site.port, "alice", PASSWORDS["alice"]) as working:
        assert working.remote_compression == "none"


def test_a_folder_swapped_for_a_link_while_a_client_uses_it_never_leads_outside(site, alice, tmp_path):
    """SPEC §4 under a race: another local process swaps a folder of the home for a link outside, and back."""
    home = site.home("alice") / unique("race")
    outside = tmp_path / "outside"
    jail_race.prepare(home, outside)
    folder = home.name
    downloads, uploads = [], 0
    with jail_race.swapping(home):
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                with alice.open(f"{folder}/sw/secret.txt") as file:
                    downloads.append(file.read())
            except OSError:
                pass  # the folder was missing or a link: refused
            try:
                alice.putfo(io.BytesIO(b"planted"), f"{folder}/sw/planted-{uploads}.txt", confirm=False)
                uploads += 1
            except OSError:
                pass
    assert jail_race.OUTSIDE not in downloads
    assert jail_race.INSIDE in downloads and uploads  # the swaps left room for some to work
    assert jail_race.outside_unchanged(outside)


def test_lftp_mkdir_p_and_rm_r_over_sftp_with_pipelined_requests(site, tmp_path):
    """QA, session 29: lftp pipelines ``mkdir -p``'s MKDIRs (and ``rm -r``'s RMDIRs); the server ran them side by side
    in its threads and the deeper ones failed ("no such file or folder"), every time. They now run in order."""
    lftp = shutil.which("lftp")
    if lftp is None:
        pytest.fail("lftp is not installed", pytrace=False)
    top = unique("deep")
    script = (
        'set sftp:connect-program "ssh -a -x -oStrictHostKeyChecking=no -oUserKnownHostsFile=/dev/null"; '
        "set net:max-retries 1; set net:timeout 10; set cmd:fail-exit yes; "
        f"mkdir -p {top}/b/c/d/e/f; cd {top}/b/c/d/e/f; pwd; cd /; rm -r {top}; bye"
    )
    result = subprocess.run(
        [lftp, "-u", f"alice,{PASSWORDS['alice']}", "-p", str(site.port), "-e", script, "sftp://127.0.0.1"],
        cwd=tmp_path, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert f"{top}/b/c/d/e/f" in result.stdout.decode()
    assert not (site.home("alice") / top).exists()
