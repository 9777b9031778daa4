"""Helpers for the SFTP integration tests: configuration, clients, audit checks."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import paramiko
import pytest

from sftpauth.auth.passwords import hash_password

from .server import SftpauthServer, free_port

REPOSITORY = Path(__file__).resolve().parents[2]
SERVICE_ID = "sftp-test"
PASSWORDS = {"alice": "alice-pass", "dave": "dave-pass", "rita": "rita-pass"}


def integration_required() -> bool:
    return os.environ.get("SFTPAUTH_REQUIRE_INTEGRATION") == "1"


def require_tools(*names: str) -> None:
    """Skip when a client program is missing, or fail under SFTPAUTH_REQUIRE_INTEGRATION=1."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    message = f"{', '.join(missing)} not installed (apt-get install openssh-client sshpass)"
    if integration_required():
        pytest.fail(f"SFTPAUTH_REQUIRE_INTEGRATION=1 but {message}", pytrace=False)
    pytest.skip(message)


def sftp_config(folder: Path, port: int, service_options: str = "") -> str:
    """A configuration with alice (full control), dave (disabled) and rita (read-only)."""
    return f"""\
[server]
audit_log = {folder}/audit.jsonl

[security-policies/DEFAULT-SECURITY-POLICY]
source_ip_ban_after_count = 1000

[services/{SERVICE_ID}]
type = ssh
address = 127.0.0.1
port = {port}
{service_options}

[groups/DEFAULT_GROUP]
home_folder_path = {folder}/homes
create_home_folder = yes

[groups/readers]
home_folder_path = {folder}/homes
create_home_folder = yes
permissions = allow-read, allow-list

[accounts/alice]
password = {hash_password(PASSWORDS["alice"])}

[accounts/dave]
enabled = no
password = {hash_password(PASSWORDS["dave"])}

[accounts/rita]
group = readers
password = {hash_password(PASSWORDS["rita"])}
"""


@contextlib.contextmanager
def plugin_on_python_path() -> Iterator[None]:
    """Let the twistd subprocess find twisted/plugins/sftpauth_plugin.py of this checkout.

    The editable install does not put the checkout on sys.path, so twistd
    (started in a temporary folder) would not know the ``sftpauth`` command.
    """
    with pytest.MonkeyPatch.context() as patch:
        current = os.environ.get("PYTHONPATH", "")
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPOSITORY), current])))
        yield


def start_server(folder: Path, service_options: str = "") -> tuple[SftpauthServer, int]:
    port = free_port()
    server = SftpauthServer(folder, sftp_config(folder, port, service_options), ports=(port,))
    server.start()
    return server, port


@contextlib.contextmanager
def ssh_transport(port: int, username, password, **options) -> Iterator[paramiko.Transport]:
    """An authenticated paramiko transport (no keys, no agent: password only)."""
    transport = paramiko.Transport(("127.0.0.1", port), **options)
    try:
        transport.connect(username=username, password=password)
        yield transport
    finally:
        transport.close()


@contextlib.contextmanager
def sftp_session(port: int, username: str) -> Iterator[paramiko.SFTPClient]:
    with ssh_transport(port, username, PASSWORDS[username]) as transport:
        client = paramiko.SFTPClient.from_transport(transport)
        client.get_channel().settimeout(60)  # a request the server never answers fails the test
        try:
            yield client
        finally:
            client.close()


def server_host_key(port: int, disabled_algorithms: Optional[dict] = None) -> paramiko.PKey:
    transport = paramiko.Transport(("127.0.0.1", port), disabled_algorithms=disabled_algorithms)
    try:
        transport.start_client(timeout=10)
        return transport.get_remote_server_key()
    finally:
        transport.close()


def openssh_fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def count_events(server: SftpauthServer, predicate: Callable[[dict], bool]) -> int:
    return sum(1 for event in server.audit_events() if predicate(event))


def wait_for_new_event(
    server: SftpauthServer, predicate: Callable[[dict], bool], already: int, timeout: float = 10.0
) -> dict:
    """The first matching audit event after the ``already`` ones seen before."""
    deadline = time.monotonic() + timeout
    while True:
        matching = [event for event in server.audit_events() if predicate(event)]
        if len(matching) > already:
            return matching[already]
        if time.monotonic() > deadline:
            raise AssertionError(f"no new audit event matched; events: {server.audit_events()[-10:]}")
        time.sleep(0.05)


def login_event(username, reason: Optional[str] = None) -> Callable[[dict], bool]:
    def matches(event: dict) -> bool:
        return (
            event.get("event") == "authentication"
            and event.get("username") == username
            and (reason is None or event.get("reason") == reason)
        )

    return matches


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def run_openssh_sftp(
    port: int, username: str, password: str, batch: str, folder: Path, timeout: float = 60, options: tuple[str, ...] = ()
):
    """Run OpenSSH ``sftp -b`` through sshpass (``options``: more ``-o`` settings); returns the CompletedProcess."""
    batch_file = folder / "batch.txt"
    batch_file.write_bytes(batch.encode("utf-8", "surrogateescape"))  # names that are not UTF-8 as bytes
    return subprocess.run(
        [
            "sshpass", "-p", password,
            "sftp", "-oBatchMode=no", "-oStrictHostKeyChecking=no", "-oUserKnownHostsFile=/dev/null",
            "-oPreferredAuthentications=password", "-oPubkeyAuthentication=no", *options,
            "-P", str(port), "-b", str(batch_file), f"{username}@127.0.0.1",
        ],
        cwd=folder,
        capture_output=True,
        timeout=timeout,
    )
