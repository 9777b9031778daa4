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
        methods = ", ".join(configuration.authentications_for(service))
        lines.append(
            f"  service {service_id}: {service.type} on {service.address}:{service.port} ({state}; authentications: {methods})"
        )
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftpauth", description="sftpauth administration commands")
    parser.add_argument("--version", action="version", version=f"sftpauth {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    check.set_defaults(run=check_config_command)

    hashing = commands.add_parser("hash-password", help="print a password hash for [accounts/..]")
    hashing.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    hashing.set_defaults(run=hash_password_command)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
