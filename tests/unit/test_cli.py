"""The ``sftpauth`` administration commands: hash-password and check-config (SPEC §1)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from sftpauth import __version__
from sftpauth.auth.passwords import is_supported_hash, verify_password
from sftpauth.cli import main
from sftpauth.config.loader import parse_configuration


SFTPAUTH = str(Path(sys.executable).with_name("sftpauth"))  # the installed command


def run_sftpauth(*arguments: str, stdin: str = "") -> subprocess.CompletedProcess:
    """``sftpauth`` in its own process (test-login runs a reactor of its own)."""
    return subprocess.run([SFTPAUTH, *arguments], input=stdin, capture_output=True, text=True, timeout=60)


def run_with_stdin(monkeypatch, text: str, argv) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    return main(argv)


def test_hash_password_prints_an_argon2id_hash(monkeypatch, capsys):
    """hash-password --password-stdin prints one argon2id hash that verifies the password."""
    status = run_with_stdin(monkeypatch, "Tr0ub4dor&3\n", ["hash-password", "--password-stdin"])
    out, err = capsys.readouterr()
    assert status == 0
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 1
    stored = lines[0]
    assert stored.startswith("$argon2id$")
    assert is_supported_hash(stored)
    assert verify_password(stored, "Tr0ub4dor&3")
    assert not verify_password(stored, "Tr0ub4dor&3\n")
    assert not verify_password(stored, "wrong")
    assert "Tr0ub4dor&3" not in out


def test_hash_password_keeps_spaces_inside_the_password(monkeypatch, capsys):
    """Only the line ending is removed: leading and trailing spaces are part of the password."""
    assert run_with_stdin(monkeypatch, "  pass phrase  \r\n", ["hash-password", "--password-stdin"]) == 0
    stored = capsys.readouterr().out.strip()
    assert verify_password(stored, "  pass phrase  ")
    assert not verify_password(stored, "pass phrase")


def test_hash_password_output_is_accepted_by_the_configuration(monkeypatch, capsys):
    """The printed hash is accepted as an [accounts/..] password."""
    run_with_stdin(monkeypatch, "horse battery\n", ["hash-password", "--password-stdin"])
    stored = capsys.readouterr().out.strip()
    configuration = parse_configuration(f"[accounts/alice]\npassword = {stored}\n", "/x.ini", "/", {})
    assert configuration.accounts["alice"].password == stored


@pytest.mark.parametrize("text", ["\n", " \n", "\t\n", "  \t \n"], ids=repr)
def test_hash_password_refuses_a_blank_password(monkeypatch, capsys, text):
    """An empty or blank password exits 1 with a message and prints no hash (no input at all: see below)."""
    status = run_with_stdin(monkeypatch, text, ["hash-password", "--password-stdin"])
    out, err = capsys.readouterr()
    assert status == 1
    assert out == ""
    assert "empty or blank password" in err


def test_version(capsys):
    """--version prints the package version and exits 0."""
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"sftpauth {__version__}"


def test_a_command_is_required(capsys):
    """Running without a command is a usage error (exit 2)."""
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2
    assert "command" in capsys.readouterr().err


GOOD = """\
[server]
description = our server

[services/ftp]
type = ftp
port = 2121

[services/sftp]
type = ssh
port = 2222
enabled = no
authentications = local

[authentications/local]
type = application

[groups/staff]
home_folder_path = /srv/ftp
"""


def test_check_config_writes_an_ipv6_service_address_in_brackets(tmp_path, capsys):
    """QA, session 26: ``on ::1:2121`` read as one address; it is ``[::1]:2121``."""
    config_path = tmp_path / "server.ini"
    config_path.write_text(GOOD.replace("port = 2121\n", "port = 2121\naddress = ::1\n", 1), encoding="utf-8")
    assert main(["check-config", str(config_path)]) == 0
    out, _ = capsys.readouterr()
    assert "service ftp: ftp on [::1]:2121 (enabled" in out


def test_check_config_summarises_a_good_file(tmp_path, capsys):
    """check-config exits 0 and prints the chain, each service and each method, with warnings."""
    config_path = tmp_path / "server.ini"
    config_path.write_text(GOOD, encoding="utf-8")
    status = main(["check-config", str(config_path)])
    out, err = capsys.readouterr()
    assert status == 0
    assert err == ""
    assert out.splitlines()[0] == f"{config_path}: valid"
    assert "authentication chain: DEFAULT-AUTHENTICATION" in out
    assert "service ftp: ftp on 127.0.0.1:2121 (enabled; authentications: DEFAULT-AUTHENTICATION)" in out
    assert "service sftp: ssh on 127.0.0.1:2222 (disabled; authentications: local)" in out
    assert "authentication local: application" in out
    assert "groups: 2 (staff, DEFAULT_GROUP), accounts: 0" in out  # DEFAULT_GROUP always exists
    assert f"warning: {config_path}:2 [server] description:" in out


BAD = """\
[server]
authentications = nowhere

[services/ftp]
type = ftp
prot = 21

[groups/g]
enabled = sometimes

[accounts/alice]
password = PlainTextSecret99
"""


def test_check_config_lists_every_error_of_a_bad_file(tmp_path, capsys):
    """check-config exits 1 and prints every error, with file and line, on stderr."""
    config_path = tmp_path / "bad.ini"
    config_path.write_text(BAD, encoding="utf-8")
    status = main(["check-config", str(config_path)])
    out, err = capsys.readouterr()
    assert status == 1
    assert out == ""
    assert err.splitlines()[0] == f"{config_path}: 5 error(s)"
    for expected in (
        f"{config_path}:2 [server] authentications: unknown authentication method 'nowhere'",
        f"{config_path}:6 [services/ftp] prot: unknown option (did you mean 'port'?)",
        f"{config_path}:4 [services/ftp] port: required option is missing",
        f"{config_path}:9 [groups/g] enabled: 'sometimes' is not yes or no",
        f"{config_path}:12 [accounts/alice] password: not a password hash",
    ):
        assert expected in err
    assert "PlainTextSecret99" not in err


def test_check_config_shows_the_warnings_of_a_file_with_errors(tmp_path, capsys):
    """Options accepted with a warning are named beside the errors, not only once the errors are fixed."""
    config_path = tmp_path / "bad.ini"
    config_path.write_text("[server]\ndescription = old SFTPPlus text\n\n[groups/g]\nenabled = sometimes\n", encoding="utf-8")
    assert main(["check-config", str(config_path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"{config_path}: 1 error(s)"
    assert f"{config_path}:5 [groups/g] enabled:" in err
    assert f"warning: {config_path}:2 [server] description:" in err


def test_check_config_of_a_missing_file(tmp_path, capsys):
    """check-config of a file that does not exist exits 1 with a message, not a traceback."""
    missing = tmp_path / "missing.ini"
    status = main(["check-config", str(missing)])
    out, err = capsys.readouterr()
    assert status == 1
    assert out == ""
    assert f"{missing}: cannot read the file" in err


def test_check_config_reads_certificates_keys_and_ldif_as_start_up_would(tmp_path, capsys):
    """Files named by options are read too: each unusable one is an error with file, line, section and option."""
    not_pem = tmp_path / "not-a-certificate.pem"
    not_pem.write_text("hello\n", encoding="utf-8")
    config_path = tmp_path / "files.ini"
    config_path.write_text(
        f"""[server]
data_folder = {tmp_path}/data

[services/ftps]
type = ftp
port = 2121
ssl_certificate = {not_pem}

[services/sftp]
type = ssh
port = 2222
ssh_server_keys = {tmp_path}/missing_key

[services/directory]
type = ldap-directory
port = 3389
ldif = {not_pem}
""",
        encoding="utf-8",
    )
    status = main(["check-config", str(config_path)])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert err.splitlines()[0] == f"{config_path}: 3 error(s)"
    assert f"{config_path}:7 [services/ftps] ssl_certificate: {not_pem} holds no PEM certificate" in err
    assert f"{config_path}:12 [services/sftp] ssh_server_keys:" in err
    assert f"{config_path}:17 [services/directory] ldif:" in err
    assert not (tmp_path / "data").exists()  # nothing generated


def test_login_manager_uses_the_web_managers_own_chain(tmp_path):
    """test-login --manager tries what the Web Manager's login page tries: DEFAULT-AUTHENTICATION, then [server]'s."""
    from sftpauth.auth.passwords import hash_password
    from tests.integration.server import free_port

    config_path = tmp_path / "server.ini"
    config_path.write_text(
        f"""\
[server]
authentications = directory

[authentications/directory]
type = ldap
address = 127.0.0.1
port = {free_port()}
bind_dn_type = parent
bind_dn = ou=people,dc=example,dc=com

[administrators/admin]
password = {hash_password("admin-secret-1")}

[services/web]
type = manager
address = 127.0.0.1
port = {free_port()}
""",
        encoding="utf-8",
    )

    def test_login(*options):
        return run_sftpauth("test-login", str(config_path), "admin", "--password-stdin", *options, stdin="admin-secret-1\n")

    manager = test_login("--manager")
    assert manager.returncode == 0, manager.stdout + manager.stderr
    assert "(Web Manager web) through: DEFAULT-AUTHENTICATION, directory" in manager.stdout
    # A file-transfer login of the same name goes through [server]'s chain only, and fails there.
    transfer = test_login()
    assert transfer.returncode == 1, transfer.stdout + transfer.stderr
    assert "(file transfer) through: directory" in transfer.stdout
    assert "admin-secret-1" not in manager.stdout + transfer.stdout


@pytest.mark.parametrize("argv", [["hash-password"], ["hash-password", "--password-stdin"]])
def test_no_password_at_all_on_standard_input_is_an_error_not_an_empty_password(monkeypatch, capsys, argv):
    """Run without a terminal and with nothing piped in, a command says so (exit 1) instead of using an empty password."""
    with pytest.raises(SystemExit) as stopped:
        run_with_stdin(monkeypatch, "", argv)
    assert str(stopped.value.code).startswith("sftpauth: no password on standard input")  # printed, exit status 1
    assert capsys.readouterr().out == ""


def _demo_copy(folder: Path) -> int:
    """etc/demo in ``folder``: its directory on a free port (returned), its folders under ``folder``."""
    from tests.integration.server import free_port

    demo = Path(__file__).resolve().parents[2] / "etc" / "demo"
    port = free_port()
    text = (demo / "sftpauth.ini").read_text(encoding="utf-8")
    (folder / "sftpauth.ini").write_text(text.replace("10389", str(port)).replace("/tmp/sftpauth-demo", str(folder)),
                                         encoding="utf-8")
    entries = (demo / "directory.ldif").read_text(encoding="utf-8")
    (folder / "directory.ldif").write_text(entries.replace("/tmp/sftpauth-demo", str(folder)), encoding="utf-8")
    return port


def test_login_on_the_demo_serves_its_embedded_directory_and_says_so(tmp_path):
    """With no running sftpauth, test-login serves the file's ldap-directory itself, says so, and explains carol."""
    port = _demo_copy(tmp_path)
    result = run_sftpauth("test-login", str(tmp_path / "sftpauth.ini"), "carol", "--password-stdin", stdin="carol-demo\n")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"(no running sftpauth serves [services/demo-directory] on 127.0.0.1:{port}: " in result.stdout
    assert "filter-mismatch" in result.stdout
    # how her entry was found: the step before the refusal
    assert "search (uid=carol) under ou=Sales,ou=people,dc=demo,dc=example, without the filter: 1 entry" in result.stdout
    assert "carol-demo" not in result.stdout


def test_test_login_creates_no_home_folder(tmp_path):
    """QA: test-login made the home folder (create_home_folder = yes), owned by whoever ran it. It says a login would."""
    _demo_copy(tmp_path)
    result = run_sftpauth("test-login", str(tmp_path / "sftpauth.ini"), "alice", "--password-stdin", stdin="alice-demo\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "does not exist yet: a login creates it" in result.stdout
    assert not (tmp_path / "home").exists()


def test_check_config_and_test_login_report_an_audit_log_that_cannot_be_opened(tmp_path, capsys):
    """An audit log under a file is an error of check-config (as of start-up), and test-login says so plainly."""
    config_path = tmp_path / "server.ini"
    (tmp_path / "a-file").write_text("not a folder", encoding="utf-8")
    missing = tmp_path / "a-file" / "logs" / "audit.jsonl"
    config_path.write_text(GOOD.replace("description = our server", f"audit_log = {missing}"), encoding="utf-8")
    assert main(["check-config", str(config_path)]) == 1
    err = capsys.readouterr().err
    assert f"{config_path}:2 [server] audit_log: cannot open the audit log {missing}: {tmp_path / 'a-file'} is not a folder" in err

    # A missing folder is created by start-up, so it is no error.
    config_path.write_text(GOOD.replace("description = our server", f"audit_log = {tmp_path}/new/audit.jsonl"), encoding="utf-8")
    assert main(["check-config", str(config_path)]) == 0
    assert not (tmp_path / "new").exists()  # check-config creates nothing
    capsys.readouterr()
    config_path.write_text(GOOD.replace("description = our server", f"audit_log = {missing}"), encoding="utf-8")

    result = run_sftpauth("test-login", str(config_path), "alice", "--password-stdin", stdin="secret\n")
    assert result.returncode == 1
    # What start-up says (build_runtime), in the same words as check-config: not "[Errno 17] File exists".
    assert f"{config_path}:2 [server] audit_log: cannot open the audit log {missing}: {tmp_path / 'a-file'} is not a folder" in result.stderr
    assert "Errno" not in result.stderr and "Traceback" not in result.stdout + result.stderr


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """``sftpauth check-config FILE | head -1``: no BrokenPipeError traceback on stderr."""
    config_path = tmp_path / "server.ini"
    config_path.write_text(GOOD, encoding="utf-8")
    # "true" has exited long before sftpauth (a Python start-up later) writes: the pipe is closed.
    command = f"'{SFTPAUTH}' check-config '{config_path}' | true"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert "BrokenPipe" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_check_config_summary_says_which_services_speak_ftps_and_which_methods_have_an_extension():
    """The summary names explicit and implicit FTPS and the TOTP extension (the type alone did not)."""
    from sftpauth.cli import summary
    from sftpauth.config.loader import parse_configuration

    configuration = parse_configuration(
        """
[services/ftps]
type = ftp
port = 2121
ssl_certificate = /etc/ssl/server.pem

[services/ftpsi]
type = ftpsi
port = 9990
ssl_certificate = /etc/ssl/server.pem

[services/plain]
type = ftp
port = 2122

[authentications/directory]
type = ldap
address = 127.0.0.1
bind_dn = dc=example,dc=com
extension_entry_point = python:sftpauth.ldap.totp.AugmentedTOTP
extension_configuration = {"mfa_attribute": "totpSharedSecret"}
""",
        "/etc/sftpauth/server.ini",
        "/etc/sftpauth",
        {},
    )
    text = summary(configuration)
    assert "service ftps: ftp (explicit FTPS) on 127.0.0.1:2121" in text
    assert "service ftpsi: ftpsi (implicit FTPS) on 127.0.0.1:9990" in text
    assert "service plain: ftp on 127.0.0.1:2122" in text
    assert "authentication directory: ldap (extension python:sftpauth.ldap.totp.AugmentedTOTP)" in text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


DEMO = str(Path(__file__).resolve().parents[2] / "etc" / "demo" / "sftpauth.ini")


@pytest.mark.parametrize("argv", [["hash-password"], ["test-login", DEMO, "alice"]], ids=lambda argv: argv[0])
@pytest.mark.parametrize("key, status, message", [(EOFError, 1, "no password given"), (KeyboardInterrupt, 130, "interrupted")])
def test_ctrl_d_or_ctrl_c_at_the_password_prompt_ends_with_one_line(monkeypatch, capsys, argv, key, status, message):
    """Ctrl-D (EOFError) or Ctrl-C (KeyboardInterrupt) at getpass's prompt: one line, no traceback."""

    def pressed(prompt=""):
        raise key()

    monkeypatch.setattr("sys.stdin", _Terminal())
    monkeypatch.setattr("getpass.getpass", pressed)
    try:
        code = main(argv)
    except SystemExit as exit:  # a message as exit code: Python prints it and exits with status 1
        assert isinstance(exit.code, str)
        code, err = 1, exit.code
    else:
        err = capsys.readouterr().err
    assert code == status
    assert err.strip() == f"sftpauth: {message}"


def test_check_config_reads_the_files_of_sections_without_errors_while_reporting_the_errors(tmp_path, capsys):
    """One pass: an option error elsewhere does not hide a certificate or LDIF that cannot be used."""
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    (tmp_path / "bad.ldif").write_text("not ldif\n")
    config = tmp_path / "sftpauth.ini"
    config.write_text(
        f"[server]\ndata_folder = {tmp_path}/data\n"
        "[services/d]\ntype = ldap-directory\nport = 0\naddress = 10.1.2.3\nldif = bad.ldif\n"
        "[services/ftp]\ntype = ftp\nport = 0\nssl_certificate = bad.pem\n"
    )
    assert main(["check-config", str(config)]) == 1
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0] == f"{config}: 3 error(s)"
    assert lines[1].startswith(f"{config}:6 [services/d] address: 10.1.2.3 is not a loopback address")
    assert lines[2].startswith(f"{config}:7 [services/d] ldif: ") and "is not valid LDIF" in lines[2]
    assert lines[3].startswith(f"{config}:11 [services/ftp] ssl_certificate: ") and "no PEM certificate" in lines[3]


@pytest.mark.parametrize("text", ["", "[services/ftp]\ntype = ftp\nport = 0\nenabled = no\n"], ids=["empty", "all-disabled"])
def test_check_config_warns_about_a_file_that_serves_nobody(tmp_path, capsys, text):
    """An empty or all-disabled file is valid, but says it listens for nobody (twistd logs the same at start)."""
    config = tmp_path / "sftpauth.ini"
    config.write_text(text)
    assert main(["check-config", str(config)]) == 0
    assert f"warning: {config}: no FTP, FTPS, SFTP or Web Manager service is enabled" in capsys.readouterr().out
    config.write_text("[services/ftp]\ntype = ftp\nport = 0\n")
    assert main(["check-config", str(config)]) == 0
    assert "warning" not in capsys.readouterr().out


def test_check_config_warns_of_certificates_not_valid_yet_or_expiring_within_two_weeks(tmp_path, capsys):
    """Clients refuse such certificates (now or soon): a warning on the option's line, with what to do."""
    import datetime

    from tests.integration.tls_certs import TestPKI

    pki = TestPKI(tmp_path / "pki")
    day = datetime.timedelta(days=1)
    later = pki.dated("later", pki.now + 2 * day, pki.now + 90 * day)
    soon = pki.dated("soon", pki.now - day, pki.now + 6 * day)
    for name, pair in (("later.pem", later), ("soon.pem", soon), ("good.pem", pki.good)):
        (tmp_path / name).write_bytes(pair.certificate.read_bytes() + pair.key.read_bytes())
    config = tmp_path / "sftpauth.ini"
    config.write_text(
        f"[server]\ndata_folder = {tmp_path}/data\n"
        "[services/ftps]\ntype = ftp\nport = 2121\nssl_certificate = later.pem\n"
        "[services/manager]\ntype = manager\nport = 8443\nssl_certificate = soon.pem\n"
        "[services/fine]\ntype = ftpsi\nport = 990\nssl_certificate = good.pem\n"
    )
    assert main(["check-config", str(config)]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {config}:6 [services/ftps] ssl_certificate: the certificate in {tmp_path}/later.pem is not valid "
        f"before {(pki.now + 2 * day):%Y-%m-%d %H:%M} UTC: clients refuse it until then (check its dates, and this machine's clock); "
        "replace the file and send SIGHUP to sftpauth",
        f"warning: {config}:10 [services/manager] ssl_certificate: the certificate in {tmp_path}/soon.pem expires on "
        f"{(pki.now + 6 * day):%Y-%m-%d %H:%M} UTC, in 5 days; replace the file and restart sftpauth (the Web Manager "
        "reads its certificate at start-up)",
    ]



def test_check_config_of_the_demo_and_of_host_keys_and_ldif_that_load(tmp_path, capsys):
    """Files that load (the demo's LDIF, a configured SSH host key) add nothing to check-config's output."""
    demo = Path(__file__).resolve().parents[2] / "etc" / "demo" / "sftpauth.ini"
    assert main(["check-config", str(demo)]) == 0
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "host_key")], check=True)
    config = tmp_path / "sftpauth.ini"
    config.write_text(
        f"[server]\ndata_folder = {tmp_path}/data\n"
        "[services/sftp]\ntype = ssh\nport = 2222\nssh_server_keys = host_key\n"
    )
    assert main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "service sftp: ssh on 127.0.0.1:2222" in out and "warning:" not in out


def test_test_login_lines_escape_what_the_directory_holds():
    """A cn, mail or homeDirectory with a line break or a terminal escape cannot add a line or recolour the terminal."""
    from types import SimpleNamespace

    from sftpauth.cli import format_trace, result_lines

    account = SimpleNamespace(
        method_id="LDAP", username="eve", dn="uid=eve\x1b[2J,dc=example,dc=com", permissions=(), roles=(),
        home_folder="/srv/e\x1b[31mred", groups=("users",), email="eve@x\nresult: FAKE",
        full_name="Eve\x1b[2J\nresult: ACCEPTED by FAKE",
    )
    lines = result_lines(account, None, manager=False)
    assert all(char.isprintable() for line in lines for char in line)
    assert "  entry:       uid=eve\\x1b[2J,dc=example,dc=com" in lines
    assert "  home folder: /srv/e\\x1b[31mred" in lines
    assert "  e-mail:      eve@x\\nresult: FAKE" in lines
    assert "  full name:   Eve\\x1b[2J\\nresult: ACCEPTED by FAKE" in lines
    step = SimpleNamespace(elapsed=0.001, method="LDAP", action="home-folder", detail="/srv/e\x1b[31mred\n" + "x" * 2000)
    [line] = format_trace(SimpleNamespace(steps=[step]))
    assert line.endswith("home-folder   /srv/e\\x1b[31mred\\n" + "x" * 2000)
