"""``sftpauth`` administration commands (SPEC §1)."""

from __future__ import annotations

import argparse
import getpass
import io
import os
import sys
from typing import Callable, Optional, Sequence

import attrs

from sftpauth import __version__
from sftpauth.config.errors import ConfigError, ConfigProblem, in_file_order
from sftpauth.config.loader import load_configuration
from sftpauth.config.models import Configuration, host_port
from sftpauth.filesystem import printable


def _read_password(from_stdin: bool, prompt: str = "Password: ", confirm: bool = False) -> str:
    if from_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:  # end of input, not even an empty line: nothing was given
            raise SystemExit("sftpauth: no password on standard input (pipe it in, or run the command in a terminal)")
        return line.rstrip("\r\n")
    try:
        password = getpass.getpass(prompt)
        if confirm and getpass.getpass("Again: ") != password:
            raise SystemExit("sftpauth: the passwords differ")
    except EOFError:  # Ctrl-D at the prompt
        raise SystemExit("\nsftpauth: no password given") from None
    return password


def hash_password_command(args: argparse.Namespace) -> int:
    from sftpauth.auth.passwords import hash_password

    password = _read_password(args.password_stdin, confirm=True)
    if not password.strip(" \t"):
        print("sftpauth: an empty or blank password cannot be used", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def summary(configuration: Configuration) -> str:
    lines = [f"{configuration.path}: valid"]
    lines.append(f"  authentication chain: {', '.join(configuration.server.authentications)}")
    if configuration.server.workers > 1:
        from sftpauth.workers.pool import worker_cpus

        cpus = worker_cpus(configuration.server.worker_cpu_affinity)
        where = f", each kept on one of CPUs {','.join(map(str, cpus))}" if cpus else ""
        lines.append(f"  workers: {configuration.server.workers} processes share the FTP/FTPS/SFTP sockets{where}")
    elif ("server", "workers") in configuration.lines:  # said in the file (auto may mean one): say what it gives
        from sftpauth.config.checks import available_cores

        lines.append(f"  workers: 1, a single process serves everything (CPUs available: {available_cores()})")
    for service_id, service in configuration.services.items():
        state = "enabled" if service.enabled else "disabled"
        if service.type != "ldap-directory":
            state += f"; authentications: {', '.join(configuration.authentications_for(service))}"
        lines.append(f"  service {service_id}: {_service_kind(service)} on {host_port(service.address, service.port)} ({state})")
    for method_id, method in configuration.authentications.items():
        extension = getattr(method, "extension_entry_point", None)
        shown_type = f"{method.type} (extension {extension})" if extension else method.type
        lines.append(f"  authentication {method_id}: {shown_type}{'' if method.enabled else ' (disabled)'}")
    lines.append(
        f"  groups: {len(configuration.groups)} ({', '.join(configuration.groups)}), accounts: {len(configuration.accounts)}, "
        f"administrators: {len(configuration.administrators)}"
    )
    for warning in configuration.warnings:
        lines.append(f"warning: {warning}")
    nobody = configuration.serves_nobody()
    if nobody:
        lines.append(f"warning: {nobody}")
    return "\n".join(lines)


def _service_kind(service) -> str:
    """The type, and for FTP whether it speaks FTPS (which the type alone does not say)."""
    if service.type == "ftp" and getattr(service, "ssl_certificate", ""):
        return "ftp (explicit FTPS)" if service.ftps_explicit_enabled else "ftp (no AUTH TLS: ftps_explicit_enabled = no)"
    if service.type == "ftpsi":
        return "ftpsi (implicit FTPS)"
    return service.type


def check_config_command(args: argparse.Namespace) -> int:
    try:
        configuration = load_checked_configuration(args.file)
    except ConfigError as error:
        print(f"{args.file}: {len(error.problems)} error(s)", file=sys.stderr)
        print(str(error), file=sys.stderr)  # the errors, then the warnings of the same file
        return 1
    print(summary(configuration))
    return 0


def load_checked_configuration(path: str) -> Configuration:
    """The configuration, and the files it names read as start-up reads them: check-config and twistd both
    use it, so both report the same problems, every one in one ConfigError (with the warnings)."""
    try:
        configuration = load_configuration(path)
    except ConfigError as error:
        if error.configuration is None:
            raise
        raise _with_file_problems(error) from None  # what could be built has its files read too: one pass
    try:
        warnings = check_files(configuration)
    except ConfigError as error:
        raise ConfigError(error.problems, configuration.warnings + error.warnings, configuration=configuration) from None
    return attrs.evolve(configuration, warnings=in_file_order(configuration.warnings + warnings))


def _with_file_problems(error: ConfigError) -> ConfigError:
    """``error`` and the problems of the files its buildable sections name (not of options already wrong)."""
    try:
        warnings = check_files(error.configuration)
    except ConfigError as files:
        wrong = {(problem.section, problem.option) for problem in error.problems}
        more = [problem for problem in files.problems if (problem.section, problem.option) not in wrong]
        return ConfigError(error.problems + tuple(more), error.warnings + files.warnings)
    return ConfigError(error.problems, error.warnings + warnings)


def check_files(configuration: Configuration) -> tuple[ConfigProblem, ...]:
    """Read the files the services would read at start-up; their warnings, or one ConfigError with every
    problem (and the warnings).

    Certificates (FTPS, a Web Manager's own), configured SSH host keys and
    embedded-directory LDIF files, with the loaders the services use, so
    check-config finds what start-up would. Nothing is generated: services
    that would generate a key or certificate are not checked here. A
    certificate not valid yet or expiring within two weeks is a warning.
    """
    from sftpauth import directory, ftp, ssh
    from sftpauth.config import models
    from sftpauth.manager import tls as manager_tls
    from sftpauth.tls import SIGHUP_ADVICE

    path = configuration.path
    checks = []
    for settings in configuration.services.values():
        if not settings.enabled:
            continue
        if isinstance(settings, models.FTPServiceSettings):
            checks.append(lambda settings=settings: _date_warnings(
                path, settings, getattr(ftp.load_tls(settings, path), "certificate", None), SIGHUP_ADVICE
            ))
        elif isinstance(settings, models.SSHServiceSettings) and settings.ssh_server_keys:
            checks.append(_without_warnings(lambda settings=settings: ssh.load_host_keys(
                settings, path, configuration.server.data_folder
            )))
        elif isinstance(settings, models.ManagerServiceSettings) and settings.ssl_certificate:
            checks.append(lambda settings=settings: _date_warnings(
                path, settings, manager_tls.load_certificate(settings, path, configuration.server.data_folder).loaded,
                manager_tls.RESTART_ADVICE,
            ))
        elif isinstance(settings, models.DirectoryServiceSettings):
            checks.append(_without_warnings(lambda settings=settings: directory.load_directory(settings, path)))
    checks.append(_without_warnings(lambda: _check_audit_log(configuration)))
    problems, warnings = [], []
    for check in checks:
        try:
            warnings.extend(check())
        except ConfigError as error:
            problems.extend(error.problems)
    if problems:
        raise ConfigError(configuration.locate(problems), configuration.locate(warnings))
    return tuple(configuration.locate(warnings))


def _without_warnings(load: Callable[[], object]) -> Callable[[], tuple[ConfigProblem, ...]]:
    """A check of :func:`check_files` from a loader whose result (keys, a directory) is not needed there."""

    def check() -> tuple[ConfigProblem, ...]:
        load()
        return ()

    return check


def _date_warnings(path: str, settings, certificate, advice: str) -> list[ConfigProblem]:
    """The date problem of a service's certificate (a ServerCertificate, None for plain FTP), as a warning."""
    problem = certificate.date_problem() if certificate is not None else ""
    if not problem:
        return []
    return [ConfigProblem(path, None, f"services/{settings.id}", "ssl_certificate", f"{problem}; {advice}")]


def _check_audit_log(configuration: Configuration) -> None:
    """The audit log can be opened for appending, as start-up will."""
    from sftpauth.audit import cannot_open, path_problem

    path = configuration.server.audit_log
    if path and path_problem(path):
        raise ConfigError([ConfigProblem(configuration.path, None, "server", "audit_log", cannot_open(path))])


def _start_embedded_directories(configuration: Configuration, runtime) -> list:
    """Serve the file's ldap-directory sections unless a running server already does."""
    from twisted.internet.error import CannotListenError

    from sftpauth import directory
    from sftpauth.config.models import DirectoryServiceSettings

    ports = []
    for settings in configuration.services.values():
        if isinstance(settings, DirectoryServiceSettings) and settings.enabled:
            factory = directory.DirectoryFactory(directory.load_directory(settings, configuration.path))
            try:
                ports.append(runtime.reactor.listenTCP(settings.port, factory, interface=settings.address))
            except CannotListenError:
                continue  # the running sftpauth serves it
            print(f"(no running sftpauth serves [services/{settings.id}] on {host_port(settings.address, settings.port)}: "
                  "this command serves that embedded directory itself while it runs)")
    return ports


def format_trace(trace) -> list[str]:
    """The trace's steps for a terminal: a value from the directory cannot add a line or send an escape."""
    lines = []
    for step in trace.steps:
        lines.append(f"  {step.elapsed * 1000:8.1f} ms  {step.method:<24} {step.action:<13} {printable(step.detail, None)}")
    return lines


def result_lines(account, failure, manager: bool) -> list[str]:
    """The outcome of a test login: what was decided and what the account gets (CLI and Web Manager)."""
    from sftpauth.auth.ldap.dn import shown

    if account is None:
        return [f"result: REJECTED ({failure.reason}): {failure.explanation}"]
    lines = [f"result: ACCEPTED by {account.method_id} as {shown(account.username)}"]
    if account.dn:
        lines.append(f"  entry:       {printable(account.dn, None)}")
    if not manager:
        permissions = ", ".join(sorted(p.value for p in account.permissions)) or "none"
        lines.append(f"  home folder: {printable(account.home_folder, None)}")
        lines.append(f"  groups:      {', '.join(account.groups)} (primary: {account.groups[0]})")
        lines.append(f"  permissions: {permissions}")
    else:
        lines.append(f"  roles:       {', '.join(account.roles) or 'none'}")
    if account.email:
        lines.append(f"  e-mail:      {printable(account.email, None)}")
    if account.full_name:
        lines.append(f"  full name:   {printable(account.full_name, None)}")
    return lines


def server_state_lines(runtime, method_ids) -> list[str]:
    """One line per LDAP server of the methods used: up, down (and why) or not contacted."""
    if isinstance(method_ids, str):
        method_ids = (method_ids,)
    now = runtime.reactor.seconds()
    lines = []
    for method_id in method_ids:
        pool = runtime.ldap_pools.get(method_id)
        if pool is None:
            continue
        lines.append(f"LDAP servers of {method_id}:")
        for state in pool.states():
            lines.append(f"  {str(state.address):<28} {state.describe(now)}")
    return lines


def _manager_service(configuration):
    """The first enabled Web Manager service, or None."""
    for settings in configuration.services.values():
        if settings.type == "manager" and settings.enabled:
            return settings
    return None


def test_login_command(args: argparse.Namespace) -> int:
    from twisted.internet import defer, task

    from sftpauth.auth.credentials import LoginRequest
    from sftpauth.auth.errors import LoginFailed
    from sftpauth.auth.ldap.dn import shown
    from sftpauth.auth.trace import Trace
    from sftpauth.tap import build_runtime

    try:
        configuration = load_configuration(args.file)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 1
    if args.authentication and args.authentication not in configuration.authentications:
        known = ", ".join(configuration.authentications)
        print(f"sftpauth: no authentication method {args.authentication!r}; defined: {known}", file=sys.stderr)
        return 1
    # A Web Manager login goes through the Web Manager's own chain (its own
    # authentications, or DEFAULT-AUTHENTICATION then [server]'s): the first
    # enabled manager service's, as its login page would.
    manager = _manager_service(configuration) if args.manager else None
    if manager is not None:
        service_id, method_ids = manager.id, configuration.authentications_for(manager)
    else:
        service_id, method_ids = "test-login", configuration.server.authentications
    if args.authentication:
        method_ids = (args.authentication,)
    password = _read_password(args.password_stdin)
    outcome = {"code": 1}

    async def run(reactor) -> None:
        try:
            runtime = build_runtime(configuration, reactor)
        except ConfigError as error:  # e.g. an audit log that cannot be opened
            print(str(ConfigError(configuration.locate(error.problems))), file=sys.stderr)
            return
        ports = _start_embedded_directories(configuration, runtime)
        trace = Trace()
        request = LoginRequest(
            username=args.username,
            password=password,
            service_id=service_id,
            protocol="cli",
            peer="",
            manager=args.manager,
            trace=trace,
            test=True,
        )
        kind = "file transfer"
        if args.manager:
            kind = f"Web Manager {manager.id}" if manager is not None else "Web Manager (no manager service: [server] chain)"
        print(f"test-login {shown(args.username)} ({kind}) through: {', '.join(method_ids)}")
        try:
            account = await runtime.chain.login(request, only_method=args.authentication)
        except LoginFailed as failure:
            print("\n".join(format_trace(trace)))
            print("\n".join(result_lines(None, failure, args.manager)))
        else:
            print("\n".join(format_trace(trace)))
            print("\n".join(result_lines(account, None, args.manager)))
            outcome["code"] = 0
        finally:
            for line in server_state_lines(runtime, method_ids):
                print(line)
            for port in ports:
                await port.stopListening()
            runtime.audit.close()

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit:
        pass
    return outcome["code"]


def _attribute_name(text: str) -> str:
    """``--attribute``: an LDAP attribute name, checked as mfa_attribute is, or the LDIF line would be unusable."""
    from sftpauth.config import checks

    try:
        name = checks.attribute(text)
    except checks.ValidateError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not name:
        raise argparse.ArgumentTypeError("an LDAP attribute name is needed")
    return name


def totp_new_command(args: argparse.Namespace) -> int:
    from sftpauth.auth.ldap.totp import ldif_line, new_totp_uri, terminal_qr_code

    username = args.username.strip()
    if not username:
        print("sftpauth: the username is empty", file=sys.stderr)
        return 1
    uri = new_totp_uri(username, args.issuer, args.digits)
    print(f"New TOTP secret for {username!r} (issuer {args.issuer!r}, {args.digits} digits, SHA1, 30 s).")
    print("It is a key: hand it to the user only, store it only in the LDAP attribute.")
    print()
    print("otpauth URI:")
    print(uri)
    print()
    print("QR code for an authenticator app:")
    print(terminal_qr_code(uri), end="")
    print()
    print("LDIF line for the LDAP attribute (e.g. with ldapmodify, replace:):")
    print(ldif_line(args.attribute, uri))
    if args.digits != 6:
        print()
        print(
            f"The LDAP method reads the {args.digits} digits from the URI before the BIND when it has a "
            f'service_account_dn (or bind_dn_type = search); otherwise set "digits": {args.digits} '
            "in extension_configuration."
        )
    return 0


def verify_ldap_command(args: argparse.Namespace) -> int:
    from twisted.internet import defer, task

    from types import SimpleNamespace

    from sftpauth.auth.ldap.verify import format_report, verify_method
    from sftpauth.config.models import LDAPAuthenticationSettings

    try:
        configuration = load_configuration(args.file)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 1
    methods = {
        method_id: settings
        for method_id, settings in configuration.authentications.items()
        if isinstance(settings, LDAPAuthenticationSettings)
    }
    if args.id is not None:
        if args.id not in methods:
            print(f"sftpauth: no LDAP authentication method {args.id!r}; defined: {', '.join(methods) or 'none'}", file=sys.stderr)
            return 1
        methods = {args.id: methods[args.id]}
    if not methods:
        print(f"sftpauth: {args.file} has no [authentications/ID] with type = ldap", file=sys.stderr)
        return 1
    for warning in configuration.warnings:
        print(f"warning: {warning}")
    outcome = {"code": 1}

    async def run(reactor) -> None:
        # Only the embedded directory is needed (no audit log, no chain).
        ports = _start_embedded_directories(configuration, SimpleNamespace(reactor=reactor))
        try:
            reports = [await verify_method(settings, reactor) for settings in methods.values()]
        finally:
            for port in ports:
                await port.stopListening()
        print(format_report(configuration.path, reports))
        outcome["code"] = 1 if any(report.failures for report in reports) else 0

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit:
        pass
    return outcome["code"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftpauth", description="sftpauth administration commands")
    parser.add_argument("--version", action="version", version=f"sftpauth {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    check.set_defaults(run=check_config_command)

    login = commands.add_parser("test-login", help="run the authentication chain once and explain each step")
    login.add_argument("file")
    login.add_argument("username")
    login.add_argument("--authentication", metavar="ID", help="only this authentication method")
    login.add_argument("--manager", action="store_true", help="a Web Manager login, through the first manager service's chain (manager_search_filter, administrators)")
    login.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    login.set_defaults(run=test_login_command)

    verify = commands.add_parser(
        "verify-ldap", help="check every server of the LDAP methods: TCP, TLS, certificate, service BIND, base DNs"
    )
    verify.add_argument("file")
    verify.add_argument("id", nargs="?", metavar="ID", help="only this [authentications/ID]")
    verify.set_defaults(run=verify_ldap_command)

    hashing = commands.add_parser("hash-password", help="print a password hash for [accounts/..] and [administrators/..]")
    hashing.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    hashing.set_defaults(run=hash_password_command)

    totp = commands.add_parser("totp", help="TOTP secrets for the AugmentedTOTP LDAP extension")
    totp_commands = totp.add_subparsers(dest="totp_command", required=True)
    totp_new = totp_commands.add_parser(
        "new", help="print a new secret: otpauth URI, terminal QR code and LDIF line"
    )
    totp_new.add_argument("username", help="the account name shown by the authenticator app")
    totp_new.add_argument("--issuer", default="sftpauth", metavar="NAME", help="shown by the app (default: sftpauth)")
    totp_new.add_argument(
        "--attribute", default="totpSharedSecret", metavar="NAME", type=_attribute_name,
        help="LDAP attribute of the LDIF line (mfa_attribute)",
    )
    totp_new.add_argument("--digits", type=int, choices=(6, 7, 8), default=6, help="code length (default: 6)")
    totp_new.set_defaults(run=totp_new_command)
    return parser


class _PipeSafeOutput(io.TextIOBase):
    """Standard output that goes quiet when its reader is gone (``| head``), as other Unix tools do.

    Without it a BrokenPipeError traceback came out of the reactor. SIGPIPE
    stays ignored: a closed LDAP connection must stay an error, not kill us.
    """

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            _discard_output(self._stream)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            _discard_output(self._stream)


def _discard_output(stream) -> None:
    """Send what is left for ``stream`` to /dev/null (its pipe has no reader any more)."""
    try:
        descriptor = os.open(os.devnull, os.O_WRONLY)
        os.dup2(descriptor, stream.fileno())
        os.close(descriptor)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    stdout = sys.stdout
    sys.stdout = _PipeSafeOutput(stdout)
    try:
        return args.run(args)
    except KeyboardInterrupt:  # Ctrl-C at a prompt or during a check: no traceback
        print("\nsftpauth: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout = stdout
        try:
            stdout.flush()
        except BrokenPipeError:
            _discard_output(stdout)


if __name__ == "__main__":
    sys.exit(main())
