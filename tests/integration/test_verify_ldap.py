"""``sftpauth verify-ldap FILE [ID]`` run as a command against real slapd servers, good and broken.

One configuration holds an LDAP method per situation (LDAPS and StartTLS
that work, a certificate for another name, an expired one, an untrusted
CA, LDAPS on the plain port, StartTLS refused, a bad service password, a
missing base DN, a refused port, a server that never answers, verification
disabled); the table is parsed back and each row and hint checked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DIRECTORY_LDIF
from .server import free_port
from .slapd import BlackHole, SlapdServer
from .tls_certs import TestPKI

pytestmark = pytest.mark.slapd

SFTPAUTH = str(Path(sys.executable).with_name("sftpauth"))
PEOPLE = "ou=people,dc=example,dc=com"
BAD_PASSWORD = "Not-The-Service-Pass-7"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, slapd):
    """TLS slapds (good, wrong name, expired, untrusted CA), a black hole, and a configuration naming them all."""
    folder = tmp_path_factory.mktemp("verify")
    pki = TestPKI(folder / "pki")
    servers = {}
    hole = BlackHole(accept=True)
    try:
        for kind in ("good", "wrong_name", "expired", "untrusted"):
            pair = getattr(pki, kind)
            servers[kind] = SlapdServer(tls_certificate=pair.certificate, tls_key=pair.key).start()
        servers["good"].add_ldif_file(DIRECTORY_LDIF)
        servers["wrong_name"].add_ldif_file(DIRECTORY_LDIF)
        good, refused_port = servers["good"], free_port()
        methods = {
            "ldaps": (f"127.0.0.1:{good.ldaps_port}, localhost:{good.ldaps_port}", "yes", pki.ca_bundle, ""),
            "starttls": (f"127.0.0.1:{good.port}", "starttls", pki.ca_bundle, ""),
            "wrong-name": (f"127.0.0.1:{servers['wrong_name'].ldaps_port}", "yes", pki.ca_bundle, ""),
            "expired": (f"127.0.0.1:{servers['expired'].port}", "starttls", pki.ca_bundle, ""),
            "untrusted": (f"127.0.0.1:{servers['untrusted'].ldaps_port}", "yes", pki.ca_bundle, ""),
            "ldaps-on-plain-port": (f"127.0.0.1:{slapd.port}", "yes", pki.ca_bundle, ""),
            "plain-on-ldaps-port": (f"127.0.0.1:{good.ldaps_port}", "no", "system", ""),
            "starttls-refused": (f"127.0.0.1:{slapd.port}", "starttls", pki.ca_bundle, ""),
            "bad-password": (f"127.0.0.1:{slapd.port}", "no", "system", BAD_PASSWORD),
            "missing-base": (f"127.0.0.1:{slapd.port}", "no", "system", "", "ou=nobody,dc=example,dc=com"),
            "refused": (f"127.0.0.1:{refused_port}", "no", "system", ""),
            "black-hole": (f"127.0.0.1:{hole.port}", "no", "system", ""),
            "not-verified": (
                f"127.0.0.1:{servers['wrong_name'].ldaps_port}",
                "yes",
                "disable-identity-security",
                "",
            ),
        }
        sections = []
        for method_id, (address, mode, trust, password, *bases) in methods.items():
            base_lines = "\n".join(f"    {base}" for base in [PEOPLE, *bases])
            account = ""
            if method_id in ("ldaps", "bad-password", "missing-base"):
                account = f"service_account_dn = cn=admin,dc=example,dc=com\nservice_account_password = {password or 'admin-secret'}\n"
            sections.append(
                f"[authentications/{method_id}]\ntype = ldap\naddress = {address}\nsecure_connection = {mode}\n"
                f"tls_trusted_certificates = {trust}\ntimeout = 1\nusername_attribute = uid\n{account}"
                f"bind_dn =\n{base_lines}\n"
            )
        config = folder / "sftpauth.ini"
        config.write_text("\n".join(sections), encoding="utf-8")
        yield {"config": config, "servers": servers, "hole": hole, "refused_port": refused_port, "plain": slapd}
    finally:
        hole.close()
        for server in servers.values():
            server.stop()


def verify(config: Path, *ids: str) -> subprocess.CompletedProcess:
    return subprocess.run([SFTPAUTH, "verify-ldap", str(config), *ids], capture_output=True, text=True, timeout=60)


def parse_report(output: str) -> dict[str, list[dict]]:
    """The table, by method ID: rows of server, check, result, detail and hint."""
    reports: dict[str, list[dict]] = {}
    rows = None
    columns = None
    server = ""
    for line in output.splitlines():
        if line.startswith("[authentications/"):
            rows = reports.setdefault(line[len("[authentications/") :].split("]")[0], [])
            continue
        if rows is None or not line.startswith("  "):
            continue
        if line.lstrip().startswith("SERVER"):
            columns = [line.index(name) for name in ("CHECK", "RESULT", "DETAIL")]
            continue
        if line.strip().startswith("hint: "):
            rows[-1]["hint"] = line.strip()[len("hint: ") :]
            continue
        server = line[2 : columns[0]].strip() or server
        rows.append(
            {
                "server": server,
                "check": line[columns[0] : columns[1]].strip(),
                "result": line[columns[1] : columns[2]].strip(),
                "detail": line[columns[2] :],
                "hint": "",
            }
        )
    return reports


@pytest.fixture(scope="module")
def report(setup):
    """verify-ldap on the whole file, run once."""
    result = verify(setup["config"])
    return result, parse_report(result.stdout)


def rows_of(report, method_id: str, check: str) -> list[dict]:
    return [row for row in report[1][method_id] if row["check"] == check]


def test_any_failure_exits_1_and_every_method_is_reported(report):
    """With broken servers in the file the command exits 1 and has a table for every LDAP method."""
    result, tables = report
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(tables) == 13
    assert "result: " in result.stdout and "check(s) FAILED" in result.stdout
    assert "admin-secret" not in result.stdout and BAD_PASSWORD not in result.stdout


def test_ldaps_and_starttls_that_work_show_every_step(report, setup):
    """A working server shows TCP, TLS, the certificate (subject, issuer, expiry, names), the BIND and the searches as ok."""
    good = setup["servers"]["good"]
    rows = report[1]["ldaps"]
    assert {row["server"] for row in rows} == {f"127.0.0.1:{good.ldaps_port}", f"localhost:{good.ldaps_port}"}
    assert all(row["result"] == "ok" for row in rows), rows
    certificate = rows_of(report, "ldaps", "certificate")[0]["detail"]
    assert "subject CN=localhost,O=sftpauth tests" in certificate
    assert "issuer CN=sftpauth test CA,O=sftpauth tests" in certificate
    assert "expires " in certificate and "names DNS:localhost, IP:127.0.0.1, IP:::1" in certificate
    assert "trusted, name 127.0.0.1 matches" in certificate
    assert "trusted, name localhost matches" in rows_of(report, "ldaps", "certificate")[1]["detail"]
    assert rows_of(report, "ldaps", "bind")[0]["detail"] == "service account cn=admin,dc=example,dc=com"
    assert rows_of(report, "ldaps", "search")[0]["detail"].startswith(f"under {PEOPLE}: entries with uid")
    assert [row["check"] for row in report[1]["starttls"]] == ["tcp", "starttls", "tls", "certificate", "ldap", "bind", "search"]
    assert all(row["result"] == "ok" for row in report[1]["starttls"])


@pytest.mark.parametrize(
    "method_id, check, detail, hint",
    [
        ("wrong-name", "tls", "certificate name mismatch: it is for DNS:ldap.other.example, not 127.0.0.1",
         "certificate name mismatch: write in address a name the certificate has (DNS:ldap.other.example)"),
        ("expired", "tls", "TLS certificate refused: the certificate has expired on ",
         "the server certificate has expired: renew it on the server"),
        ("untrusted", "tls", "the issuer is not trusted",
         "the issuing CA (CN=sftpauth untrusted CA,O=sftpauth tests) is not trusted by"),
        ("ldaps-on-plain-port", "tls", "the server closed the connection during the TLS handshake",
         "wrong port for LDAPS (usually 636)"),
        ("plain-on-ldaps-port", "ldap", "connection lost during search",
         "if this port expects LDAPS (usually 636), set secure_connection = yes"),
        ("starttls-refused", "starttls", "the server refused StartTLS (result code 2",
         "the server does not offer StartTLS"),
        ("bad-password", "bind", "service account cn=admin,dc=example,dc=com: invalid credentials (49)",
         "bad service password (service_account_password)"),
        ("missing-base", "search", "under ou=nobody,dc=example,dc=com: no such object (32)",
         "the base DN does not exist"),
        ("refused", "tcp", "connection refused", "nothing listens on 127.0.0.1:"),
        ("black-hole", "ldap", "no answer to search within 1s", "did not answer within 1s"),
    ],
)
def test_each_failure_has_its_reason_and_a_hint(report, method_id, check, detail, hint):
    """Every broken situation fails on the right step with a reason and a hint the administrator can act on."""
    failed = [row for row in report[1][method_id] if row["result"] == "FAIL"]
    assert len(failed) == 1, report[1][method_id]
    [row] = failed
    assert row["check"] == check
    assert detail in row["detail"]
    assert hint in row["hint"]


def test_a_refused_certificate_is_still_described(report):
    """When the handshake is refused the certificate the server sent is still shown (subject, issuer, expiry)."""
    [certificate] = rows_of(report, "expired", "certificate")
    assert certificate["result"] == "info"
    assert "subject CN=localhost" in certificate["detail"] and "expired " in certificate["detail"]
    assert rows_of(report, "expired", "starttls")[0]["result"] == "ok"


def test_the_missing_base_is_explained_with_what_the_server_holds(report):
    """A base DN that does not exist fails while the one that exists passes, and the hint names the server's naming context."""
    searches = rows_of(report, "missing-base", "search")
    assert [row["result"] for row in searches] == ["ok", "FAIL"]
    assert "the server holds dc=example,dc=com" in searches[1]["hint"]


def test_one_method_by_id_that_works_exits_0(setup):
    """verify-ldap FILE ID checks only that method and exits 0 when every check passes."""
    result = verify(setup["config"], "starttls")
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(parse_report(result.stdout)) == ["starttls"]
    assert "result: every check passed on 1 server(s) of 1 LDAP method(s)" in result.stdout


def test_disabled_verification_passes_with_loud_warnings(setup):
    """disable-identity-security: exit 0, but a start-up warning and certificate rows say it is not verified and would fail."""
    result = verify(setup["config"], "not-verified")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "INSECURE" in result.stdout.splitlines()[0]
    rows = parse_report(result.stdout)["not-verified"]
    warnings = [row for row in rows if row["result"] == "warn"]
    assert "NOT VERIFIED (tls_trusted_certificates = disable-identity-security)" in warnings[0]["detail"]
    assert "would be refused with verification: certificate name mismatch" in warnings[1]["detail"]
    assert [row["result"] for row in rows if row["check"] in ("bind", "search")] == ["ok", "ok"]


def test_an_unknown_id_is_an_error(setup):
    """An ID that is not an LDAP method exits 1 and names the defined ones."""
    result = verify(setup["config"], "nope")
    assert result.returncode == 1
    assert "no LDAP authentication method 'nope'" in result.stderr and "ldaps" in result.stderr
