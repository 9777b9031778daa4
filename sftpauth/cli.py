"""``sftpauth`` administration commands (SPEC §1)."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Optional, Sequence

from sftpauth import __version__
from sftpauth.config.errors import ConfigError
from sftpauth.config.loader import load_configuration
from sftpauth.config.models import Configuration


def _read_password(from_stdin: bool, prompt: str = "Password: ", confirm: bool = False) -> str:
    if from_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass(prompt)
    if confirm and getpass.getpass("Again: ") != password:
        raise SystemExit("sftpauth: the passwords differ")
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
    for service_id, service in configuration.services.items():
        state = "enabled" if service.enabled else "disabled"
        if service.type != "ldap-directory":
            state += f"; authentications: {', '.join(configuration.authentications_for(service))}"
        lines.append(f"  service {service_id}: {service.type} on {service.address}:{service.port} ({state})")
    for method_id, method in configuration.authentications.items():
        lines.append(f"  authentication {method_id}: {method.type}{'' if method.enabled else ' (disabled)'}")
    lines.append(f"  groups: {len(configuration.groups)}, accounts: {len(configuration.accounts)}")
    for warning in configuration.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def check_config_command(args: argparse.Namespace) -> int:
    try:
        configuration = load_configuration(args.file)
    except ConfigError as error:
        print(f"{args.file}: {len(error.problems)} error(s)", file=sys.stderr)
        print(str(error), file=sys.stderr)
        return 1
    print(summary(configuration))
    return 0


def _start_embedded_directories(configuration: Configuration, runtime) -> list:
    """Serve the file's ldap-directory sections unless a running server already does."""
    from twisted.internet.error import CannotListenError

    from sftpauth import directory
    from sftpauth.config.models import DirectoryServiceSettings
    from sftpauth.listening import endpoint_for

    ports = []
    for settings in configuration.services.values():
        if isinstance(settings, DirectoryServiceSettings) and settings.enabled:
            factory = directory.DirectoryFactory(directory.load_directory(settings, configuration.path))
            try:
                ports.append(runtime.reactor.listenTCP(settings.port, factory, interface=settings.address))
            except CannotListenError:
                pass  # the running sftpauth serves it
    return ports


def format_trace(trace) -> list[str]:
    lines = []
    for step in trace.steps:
        lines.append(f"  {step.elapsed * 1000:8.1f} ms  {step.method:<24} {step.action:<13} {step.detail}")
    return lines


def test_login_command(args: argparse.Namespace) -> int:
    from twisted.internet import defer, task

    from sftpauth.auth.credentials import LoginRequest
    from sftpauth.auth.errors import LoginFailed
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
    password = _read_password(args.password_stdin)
    outcome = {"code": 1}

    async def run(reactor) -> None:
        runtime = build_runtime(configuration, reactor)
        ports = _start_embedded_directories(configuration, runtime)
        trace = Trace()
        request = LoginRequest(
            username=args.username,
            password=password,
            service_id="test-login",
            protocol="cli",
            peer="",
            manager=args.manager,
            trace=trace,
        )
        chain = args.authentication or ", ".join(configuration.server.authentications)
        print(f"test-login {args.username!r} ({'Web Manager' if args.manager else 'file transfer'}) through: {chain}")
        try:
            account = await runtime.chain.login(request, only_method=args.authentication)
        except LoginFailed as failure:
            print("\n".join(format_trace(trace)))
            print(f"result: REJECTED ({failure.reason}): {failure.explanation}")
        else:
            print("\n".join(format_trace(trace)))
            print(f"result: ACCEPTED by {account.method_id} as {account.username!r}")
            if account.dn:
                print(f"  entry:       {account.dn}")
            if not args.manager:
                permissions = ", ".join(sorted(p.value for p in account.permissions)) or "none"
                print(f"  home folder: {account.home_folder}")
                print(f"  groups:      {', '.join(account.groups)} (primary: {account.groups[0]})")
                print(f"  permissions: {permissions}")
            if account.email:
                print(f"  e-mail:      {account.email}")
            if account.full_name:
                print(f"  full name:   {account.full_name}")
            outcome["code"] = 0
        finally:
            for port in ports:
                await port.stopListening()
            runtime.audit.close()

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
    login.add_argument("--manager", action="store_true", help="a Web Manager login (manager_search_filter)")
    login.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    login.set_defaults(run=test_login_command)

    hashing = commands.add_parser("hash-password", help="print a password hash for [accounts/..]")
    hashing.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    hashing.set_defaults(run=hash_password_command)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
