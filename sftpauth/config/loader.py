"""Read an sftpauth INI file into a validated :class:`Configuration`.

configobj parses the structure; this module adds what SFTPPlus files need
and configobj lacks: values on indented continuation lines, a line number
for every option, and one error per problem naming file, line, section and
option. Every problem is collected before raising, so an administrator
fixes a file in one pass.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections import Counter
from typing import Any, Iterable, Mapping, Optional

import attrs
from configobj import ConfigObj, ConfigObjError
from validate import ValidateError, VdtMissingValue

from sftpauth.config import models
from sftpauth.config.checks import SWITCHED_OFF, UNSUPPORTED, make_validator, yesno
from sftpauth.config.errors import ConfigError, ConfigProblem

SPEC_PATH = os.path.join(os.path.dirname(__file__), "configspec.ini")
SECTION_KINDS = ("services", "authentications", "groups", "accounts", "roles", "administrators", "security-policies")
_OPTION_LINE = re.compile(r"^(?P<name>[^=\[\s][^=]*?)\s*=(?P<value>.*)$")
_QUOTED_THEN_SEMICOLON = re.compile(r"""^(?P<quoted>"[^"]*"|'[^']*')\s+;.*$""")
_INLINE_COMMENT = re.compile(r"\s+[#;].*$")  # " # text" or " ; text" (SPEC: comments start with # or ;)
_READ_HERE = "__sftpauth_value_read_by_preprocess__"
_SECTION_LINE_FORM = "a section line is [kind/ID], with single brackets, alone on its line (or with a # or ; comment)"
_IGNORED = "__sftpauth_unusable_section__"  # a repeated, nested or malformed section: reported, not checked


@attrs.define
class _SourceMap:
    """Where each section and option starts, and multi-line values."""

    sections: dict[str, int] = attrs.Factory(dict)
    options: dict[tuple[Optional[str], str], int] = attrs.Factory(dict)
    # values read here, not by configobj: multi-line ones, and one-line ones unless quoted
    values: dict[tuple[str, str], str] = attrs.Factory(dict)
    # the line of each item of a multi-line value (first line included when it holds one)
    item_lines: dict[tuple[str, str], list[int]] = attrs.Factory(dict)
    # (line, section, option, message) found before configobj runs
    problems: list[tuple[int, Optional[str], Optional[str], str]] = attrs.Factory(list)
    # the [section] and option each line belongs to (for configobj's own errors, which name neither)
    places: dict[int, tuple[Optional[str], Optional[str]]] = attrs.Factory(dict)


_SECTION_LINE = re.compile(r"^(?P<open>\[+)\s*(?P<name>[^\[\]]*?)\s*(?P<close>\]+)\s*(?:[#;].*)?$")


def _preprocess(text: str) -> tuple[list[str], _SourceMap]:
    """Read option values, folding SFTPPlus continuation lines into one value, keeping line numbers.

    An indented, non-comment line after an option is part of that option's
    value: each such line is one item (a base DN, a mapping rule...). Values
    are read here rather than by configobj, which ends a value at any '#';
    only quoted ones are left to it. The lines handed to configobj keep
    their count so its errors line up.
    Repeated sections and options are reported here, with the line of their
    first use, and hidden from configobj so they do not mask other errors.
    """
    source = _SourceMap()
    output: list[str] = []
    section: Optional[str] = None
    option: Optional[str] = None  # its name as configobj keys it (quotes removed)
    option_text = ""  # its name as written
    first_value = ""
    continuation: list[str] = []
    option_index = 0
    option_line = 0
    continuation_lines: list[int] = []
    ignored = 0

    def finish_option() -> None:
        if option is None or section is None:
            return
        if continuation:
            value = "\n".join(([first_value] if first_value else []) + continuation)
            source.item_lines[(section, option)] = ([option_line] if first_value else []) + continuation_lines
        elif _quoted(first_value):
            return  # configobj removes the quotes ('#' inside is kept)
        else:
            # One-line values are read here too: configobj ends a value at any '#', so a
            # password "pa#ss" would silently be "pa". Only " #" or " ;" starts a comment (docs).
            value = first_value
        source.values[(section, option)] = value
        output[option_index] = f"{option_text} = {_READ_HERE}"

    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped[0] in "#;":
            output.append("")
            continue
        if raw[0] in " \t" and option is not None:
            source.places[number] = (section, option)
            item = _INLINE_COMMENT.sub("", stripped).strip()
            indented = _indented_option(item)
            if indented is not None and section is not None:
                # Read as a line of the value above, it would be silently lost (a search_filter
                # under bind_dn let every account in): refuse it instead.
                source.problems.append(
                    (number, section, indented, f"this option is indented, so it would be read as a line of "
                     f"{option}'s value; options must start at the beginning of the line")
                )
                output.append("")
                continue
            if item:
                continuation.append(item)
                continuation_lines.append(number)
            output.append("")
            continue
        finish_option()
        option, continuation, first_value = None, [], ""
        continuation_lines = []
        header = _SECTION_LINE.match(stripped)
        if stripped.startswith("["):
            name = header.group("name") if header else ""
            if "/" in name:  # [authentications/ LDAP] is LDAP's section: spaces around the ID are not part of it
                kind, _, section_id = name.partition("/")
                name = f"{kind.strip()}/{section_id.strip()}"
            unusable = None
            if header is None or len(header.group("open")) != len(header.group("close")):
                unusable = _SECTION_LINE_FORM
            elif len(header.group("open")) > 1:
                unusable = f"nested section [[{name}]] is not allowed: a section line is [kind/ID], with single brackets"
            elif name in source.sections:
                unusable = f"duplicate section, first given on line {source.sections[name]}"
            if unusable:
                # Reported here; its options go to a section nobody checks, not to the one above. A line
                # that is no section line names none; a nested section is named by the one it is in.
                where = None if header is None else (name if header.group("open") == "[" else section)
                source.problems.append((number, where, None, unusable))
                source.places[number] = (where, None)
                ignored += 1
                section = f"{_IGNORED}{ignored}"
                output.append(f"[{section}]")
                continue
            source.places[number] = (name, None)
            section = name
            source.sections.setdefault(name, number)
            raw = f"[{name}]"  # configobj knows no "; comment" there
        else:
            match = _OPTION_LINE.match(stripped)
            name = _unquoted(match.group("name").strip()) if match else None
            source.places[number] = (section, name)
            if match:
                key = (section, name)
                if key in source.options and section is not None and not section.startswith(_IGNORED):
                    source.problems.append(
                        (number, section, name, f"duplicate option, first given on line {source.options[key]}")
                    )
                    output.append("")
                    continue
                option, option_text = name, match.group("name").strip()
                value = match.group("value").strip()
                first_value = value if _quoted(value) else _INLINE_COMMENT.sub("", value).strip()
                commented = _QUOTED_THEN_SEMICOLON.match(value)
                if commented:  # configobj knows no "; comment" after a quoted value either
                    raw = f"{option_text} = {commented.group('quoted')}"
                option_index = len(output)
                option_line = number
                source.options.setdefault(key, number)
        output.append(raw)
    finish_option()
    return output, source


def _unquoted(name: str) -> str:
    """An option name as configobj keys it: ``"banner"`` is ``banner``."""
    if len(name) >= 2 and name[0] == name[-1] and _quoted(name):
        return name[1:-1]
    return name


def _quoted(value: str) -> bool:
    """A value in quotes: left to configobj, which removes them."""
    return value[:1] in ("'", '"')


def _indented_option(item: str) -> Optional[str]:
    """The option an indented line names (``search_filter = ...``), or None for a value line.

    Only names of the configspec count, and only with spaces around ``=`` or
    an ``_`` in the name, so a base DN line (``ou=IT,dc=example``) is a value.
    """
    match = _OPTION_LINE.match(item)
    if match is None:
        return None
    name = match.group("name")
    spaced = item[len(name)].isspace()  # "name = value", not "name=value"
    if name in _OPTION_NAMES and ("_" in name or spaced):
        return name
    return None


class _Problems:
    def __init__(self, path: str, source: _SourceMap):
        self.path = path
        self.source = source
        self.errors: list[ConfigProblem] = []
        self.warnings: list[ConfigProblem] = []

    def _make(
        self, section: Optional[str], option: Optional[str], message: str, item: Optional[int] = None
    ) -> ConfigProblem:
        line = None
        if option is not None:
            line = self.source.options.get((section, option))
            kind = (section or "").partition("/")[0]
            for alias, name in _ALIASES.get(kind, {}).items():
                if line is None and name == option and (section, alias) in self.source.options:
                    option, line = alias, self.source.options[(section, alias)]  # as written in the file
            item_lines = self.source.item_lines.get((section, option), [])
            if item is not None and 0 <= item < len(item_lines):
                line = item_lines[item]
        if line is None and section is not None:
            line = self.source.sections.get(section)
        return ConfigProblem(self.path, line, section, option, message)

    def error(self, section: Optional[str], option: Optional[str], message: str, item: Optional[int] = None) -> None:
        """``item``: which line of a one-per-line value is wrong (its own line is reported)."""
        self.errors.append(self._make(section, option, message, item))

    def has_error(self, section: str, option: Optional[str] = None) -> bool:
        """Whether an error was already found in ``section`` (at ``option``): later checks then say nothing more."""
        return any(p.section == section and (option is None or p.option == option) for p in self.errors)

    def require(self, section: str, option: str, message: str) -> None:
        """A value that is missing: said once, and not where the value written was already refused."""
        if not self.has_error(section, option):
            self.error(section, option, message)

    def warn(self, section: Optional[str], option: Optional[str], message: str) -> None:
        self.warnings.append(self._make(section, option, message))


def _load_spec() -> Mapping[str, Mapping[str, str]]:
    spec = ConfigObj(SPEC_PATH, list_values=False, interpolation=False, _inspec=True)
    return {name: dict(section) for name, section in spec.items()}


_SPEC = _load_spec()
_OPTION_NAMES = frozenset(name for section in _SPEC.values() for name in section)


# configobj's words for what it cannot read, as what to do about it.
_PARSE_ERRORS = {
    "Parse error in value": "the quotes of the value do not match: a value that starts with a quote must end "
    "with the same quote (quote the whole value, or none of it)",
    "Parse error in multiline value": 'the triple-quoted value never ends: close it with the same three quotes',
    "Section too nested": "a section line is [kind/ID], with single brackets",
    "Cannot compute the section depth": "a section line is [kind/ID], with single brackets",
}


def load_configuration(path: str, environ: Optional[Mapping[str, str]] = None) -> models.Configuration:
    """Load and validate ``path``; raise :class:`ConfigError` listing every problem."""
    display_path = os.fspath(path)
    try:
        with open(path, "rb") as config_file:
            data = config_file.read()
    except OSError as error:
        raise ConfigError([ConfigProblem(display_path, None, None, None, f"cannot read the file: {error.strerror}")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(_not_utf8(display_path, data)) from None
    return parse_configuration(
        text, display_path, os.path.dirname(os.path.abspath(path)), os.environ if environ is None else environ
    )


def _not_utf8(path: str, data: bytes) -> list[ConfigProblem]:
    """A problem for each line that is not UTF-8, on its line, [section] and option."""
    _, source = _preprocess(data.decode("utf-8", "replace"))
    problems = []
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as error:
            section, option = source.places.get(number, (None, None))
            byte = line[error.start]
            problems.append(ConfigProblem(path, number, section, option, f"byte 0x{byte:02x} is not UTF-8: the file "
                                          "must be UTF-8 text (save it as UTF-8, or convert it with iconv)"))
    return problems


def parse_configuration(
    text: str, path: str, base_folder: str, environ: Mapping[str, str]
) -> models.Configuration:
    if text.startswith("\ufeff"):
        text = text[1:]  # the byte-order mark Windows editors put before UTF-8 text
    lines, source = _preprocess(text)
    problems = _Problems(path, source)
    for line, section_name, option_name, message in source.problems:
        problems.errors.append(ConfigProblem(path, line, section_name, option_name, message))
    try:
        raw = ConfigObj(lines, list_values=False, interpolation=False, raise_errors=False, encoding="utf-8")
    except ConfigObjError as error:
        # configobj skips the lines it cannot read and goes on: the rest is checked too.
        raw = getattr(error, "config", None)
        for item in getattr(error, "errors", []) or [error]:
            message = getattr(item, "msg", str(item))
            if message.startswith("Invalid line"):
                # configobj quotes the line, which may hold a secret: never echo it.
                message = "this line is neither a [section] nor 'option = value'"
            message = re.sub(r"\s*at line \d+\.?$", "", message)
            message = _PARSE_ERRORS.get(message, message)
            line = getattr(item, "line_number", None)
            section_name, option_name = source.places.get(line, (None, None))
            problems.errors.append(ConfigProblem(path, line, section_name, option_name, message))
        if raw is None:
            raise ConfigError(problems.errors)

    validator = make_validator(base_folder, environ)
    sections: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in SECTION_KINDS}
    server_values: Optional[dict[str, Any]] = None

    for name in raw.scalars:
        problems.error(None, name, "this option is outside any [section]")
    for name, section in raw.items():
        if not hasattr(section, "scalars") or name.startswith(_IGNORED):
            continue
        values = {
            key: source.values.get((name, key), value) if value == _READ_HERE else value
            for key, value in section.items()
            if key in section.scalars
        }
        if name == "server":
            server_values = _check_section(problems, validator, name, "server", values)
            continue
        kind, _, section_id = name.partition("/")
        if kind not in SECTION_KINDS:
            allowed = ", ".join(["[server]"] + [f"[{k}/ID]" for k in SECTION_KINDS])
            problems.error(name, None, f"unknown section; allowed: {allowed}")
            continue
        if not section_id or "/" in section_id or "|" in section_id:
            problems.error(name, None, "the section ID must be non-empty text without '/' or '|'")
            continue
        checked = _check_section(problems, validator, name, kind, values)
        if checked is not None:
            sections[kind][section_id] = checked

    if server_values is None:
        server_values = _check_section(problems, validator, "server", "server", {}) or {}
    configuration = _build(problems, validator, server_values, sections)
    lines = {(section, None): line for section, line in source.sections.items()}
    lines.update(source.options)
    configuration = attrs.evolve(configuration, path=path, warnings=tuple(problems.warnings), lines=lines)
    if problems.errors:
        raise ConfigError(problems.errors, problems.warnings, configuration=configuration)
    return configuration


def _check_section(
    problems: _Problems, validator, section: str, kind: str, values: dict[str, str]
) -> Optional[dict[str, Any]]:
    """Check every option of one section against its spec; None if unusable."""
    spec = dict(_SPEC[kind])
    if kind in ("services", "authentications"):
        type_value, type_name = values.get("type"), None
        if type_value is None:
            problems.error(section, None, f"option 'type' is required; allowed: {_choices(spec['type'])}")
        else:
            try:
                type_name = validator.check(spec["type"], type_value)
            except ValidateError as error:
                instead = _SFTPPLUS_METHODS.get(type_value.strip().lower()) if kind == "authentications" else None
                if instead:  # its options are that method's: no error of their own
                    problems.error(section, "type", f"{type_value.strip()!r} is an SFTPPlus method that sftpauth does "
                                   f"not have; {instead}")
                    return None
                problems.error(section, "type", str(error))
        if type_name is None:
            # Without a type its options cannot be checked; those of no type at all are typos still.
            any_type = _options_of_any_type(kind)
            for option in values:
                if _ALIASES.get(kind, {}).get(option, option) not in any_type:
                    problems.error(section, option, _unknown_option_message(option, any_type))
            return None
        spec_kind = models.SERVICE_SPEC_KIND[type_name] if kind == "services" else type_name
        spec.update(_SPEC.get(f"{kind}:{spec_kind}", {}))
    result: dict[str, Any] = {}
    values_with_errors: set[str] = set()
    aliases = _ALIASES.get(kind, {})
    disabled = _switched_off(values)
    for option, value in values.items():
        name = aliases.get(option, option)  # the option it stands for; errors name the one written
        if name not in spec:
            problems.error(section, option, _unknown_option_message(option, spec))
            continue
        if name != option and name in values:
            problems.error(section, option, f"{option} and {name} are the same option: give {name} only")
            continue
        try:
            checked = validator.check(spec[name], value)
        except ValidateError as error:
            if disabled and spec[name].startswith("secret"):
                # A disabled method's secret need not be deployed on this machine (etc/sftpauth.ini has one).
                problems.warn(section, option, f"{error}; not needed while the section has enabled = no")
                values_with_errors.add(name)  # its default (empty) is used
                continue
            for each in getattr(error, "line_errors", None) or [error]:  # several bad items: each on its line
                problems.error(section, option, str(each), getattr(each, "index", None))
            # Go on with the good part of the value (a mapping's good lines), else the default, so later
            # checks still report their problems.
            values_with_errors.add(name)
            if getattr(error, "partial", None) is not None:
                result[name] = error.partial
            continue
        if checked is UNSUPPORTED:
            problems.warn(section, option, "known SFTPPlus option, not implemented by sftpauth: ignored")
            continue
        if checked is SWITCHED_OFF:
            continue
        result[name] = checked
    values = {aliases.get(option, option): value for option, value in values.items()}
    for option, check in spec.items():
        if (option in values and option not in values_with_errors) or option in result or check.startswith(("unsupported", "refused")):
            continue
        try:
            default = validator.check(check, None, missing=True)
        except VdtMissingValue:
            if option not in values_with_errors:
                problems.error(section, option, "required option is missing")
            if option in _STAND_INS:
                result[option] = _STAND_INS[option]  # the section is still built, so its references are checked
            continue
        if default is not UNSUPPORTED:
            result[option] = default
    return result


# Values for a required option that is missing or wrong (already an error): never used to serve,
# only so the section's other options still get their cross-checks in the same pass.
_STAND_INS: Mapping[str, Any] = {"port": 0, "ldif": "", "address": ()}


def _switched_off(values: Mapping[str, str]) -> bool:
    """``enabled = no`` (in any spelling ``yesno`` takes): the section is there but not used."""
    try:
        return yesno(values["enabled"]) is False
    except (KeyError, ValidateError):
        return False  # absent (enabled by default), or an error reported on its own line


# Other names SFTPPlus gives an option, by section kind: SFTPPlus's [administrators/..] name
# their roles with "role" (one or more IDs).
_ALIASES: Mapping[str, Mapping[str, str]] = {"administrators": {"role": "roles"}}


# SFTPPlus authentication methods that sftpauth does as a security policy, and how.
_SFTPPLUS_METHODS: Mapping[str, str] = {
    "ip-time-ban": "bans are a security policy's: source_ip_ban_after_count and source_ip_ban_interval in "
                   "[security-policies/DEFAULT-SECURITY-POLICY] (or a named policy), for every service using it",
    "deny-username": "refused usernames are a security policy's: deny_usernames in "
                     "[security-policies/DEFAULT-SECURITY-POLICY] (or a named policy)",
}


def _choices(check: str) -> str:
    return ", ".join(re.findall(r'"([^"]+)"', check))


def _options_of_any_type(kind: str) -> dict[str, str]:
    """The options a ``services`` or ``authentications`` section may have, whatever its type."""
    options = dict(_SPEC[kind])
    for name, spec in _SPEC.items():
        if name.startswith(f"{kind}:"):
            options.update(spec)
    return options


def _unknown_option_message(option: str, spec: Mapping[str, str]) -> str:
    close = difflib.get_close_matches(option, list(spec), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    allowed = sorted(name for name, check in spec.items() if not check.startswith("refused"))
    return f"unknown option{hint}; allowed: {', '.join(allowed)}"


def _build(
    problems: _Problems, validator, server_values: dict[str, Any], sections: dict[str, dict[str, dict[str, Any]]]
) -> models.Configuration:
    server = _construct(problems, "server", models.ServerSettings, server_values)

    authentications: dict[str, models.AuthenticationSettings] = {}
    raw_methods = dict(sections["authentications"])
    if models.DEFAULT_AUTHENTICATION not in raw_methods:
        raw_methods[models.DEFAULT_AUTHENTICATION] = {"type": "application", "name": "", "enabled": True}
    for method_id, values in raw_methods.items():
        model = models.AUTHENTICATION_MODELS[values["type"]]
        built = _construct(problems, f"authentications/{method_id}", model, values, id=method_id)
        if built is not None:
            authentications[method_id] = built

    groups: dict[str, models.GroupSettings] = {}
    raw_groups = dict(sections["groups"])
    if models.DEFAULT_GROUP not in raw_groups:
        raw_groups[models.DEFAULT_GROUP] = _check_section(problems, validator, "groups/DEFAULT_GROUP", "groups", {})
    for group_id, values in raw_groups.items():
        built = _construct(problems, f"groups/{group_id}", models.GroupSettings, values, id=group_id)
        if built is not None:
            groups[group_id] = built
            if not built.permissions:  # "permissions =" reads as no permission, not as the default
                problems.warn(f"groups/{group_id}", "permissions", "no permission is granted: accounts with this "
                              "primary group can log in but not list, read or write anything")
            _warn_of_other_placeholders(problems, f"groups/{group_id}", built.home_folder_path)

    services: dict[str, models.ServiceSettings] = {}
    for service_id, values in sections["services"].items():
        model = models.SERVICE_MODELS[values["type"]]
        built = _construct(problems, f"services/{service_id}", model, values, id=service_id)
        if built is not None:
            services[service_id] = built

    accounts: dict[str, models.AccountSettings] = {}
    for account_id, values in sections["accounts"].items():
        built = _construct(problems, f"accounts/{account_id}", models.AccountSettings, values, id=account_id)
        if built is not None:
            accounts[account_id] = built
            _warn_of_other_placeholders(problems, f"accounts/{account_id}", built.home_folder_path)

    roles: dict[str, models.RoleSettings] = {}
    raw_roles = dict(sections["roles"])
    if models.DEFAULT_ROLE not in raw_roles:
        raw_roles[models.DEFAULT_ROLE] = _check_section(problems, validator, f"roles/{models.DEFAULT_ROLE}", "roles", {})
    for role_id, values in raw_roles.items():
        built = _construct(problems, f"roles/{role_id}", models.RoleSettings, values, id=role_id)
        if built is not None:
            roles[role_id] = built
    for method_id, method in authentications.items():
        if isinstance(method, models.LDAPAuthenticationSettings) and method.roles_mapping is not None:
            # roles_mapping = A, B, C: role IDs or a rule, told apart once the roles are known
            authentications[method_id] = attrs.evolve(method, roles_mapping=method.roles_mapping.with_role_lists(roles))

    administrators: dict[str, models.AdministratorSettings] = {}
    for administrator_id, values in sections["administrators"].items():
        built = _construct(
            problems, f"administrators/{administrator_id}", models.AdministratorSettings, values, id=administrator_id
        )
        if built is not None:
            administrators[administrator_id] = built

    policies: dict[str, models.SecurityPolicySettings] = {}
    raw_policies = dict(sections["security-policies"])
    if models.DEFAULT_SECURITY_POLICY not in raw_policies:
        raw_policies[models.DEFAULT_SECURITY_POLICY] = _check_section(
            problems, validator, f"security-policies/{models.DEFAULT_SECURITY_POLICY}", "security-policies", {}
        )
    for policy_id, values in raw_policies.items():
        built = _construct(problems, f"security-policies/{policy_id}", models.SecurityPolicySettings, values, id=policy_id)
        if built is not None:
            policies[policy_id] = built

    configuration = models.Configuration(
        path="",
        server=server,
        services=services,
        authentications=authentications,
        groups=groups,
        accounts=accounts,
        roles=roles,
        administrators=administrators,
        security_policies=policies,
    )
    if server is not None:
        _cross_check(problems, configuration)
    return configuration


def _construct(problems: _Problems, section: str, model: type, values: dict[str, Any], **extra: Any):
    fields = {field.name for field in attrs.fields(model)}
    try:
        return model(**{key: value for key, value in values.items() if key in fields}, **extra)
    except TypeError as error:  # a required option already reported as missing
        if not problems.errors:
            problems.error(section, None, str(error))
        return None


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _cross_check(problems: _Problems, configuration: models.Configuration) -> None:
    """References between sections: every ID named must exist."""
    methods = configuration.authentications
    for method_id in configuration.server.authentications:
        # A method whose section has an error of its own (type = ldapp) is not "unknown".
        if method_id not in methods and not problems.has_error(f"authentications/{method_id}"):
            problems.error("server", "authentications", _unknown_id("authentication method", method_id, methods))
    if not configuration.server.authentications:
        problems.require("server", "authentications", "at least one authentication method is required")

    for method_id, method in methods.items():
        if isinstance(method, models.LDAPAuthenticationSettings):
            _check_ldap_method(problems, configuration, f"authentications/{method_id}", method)

    bound: dict[tuple[str, int], str] = {}
    for service_id, service in configuration.services.items():
        section = f"services/{service_id}"
        for method_id in service.authentications:
            if method_id not in methods and not problems.has_error(f"authentications/{method_id}"):
                problems.error(section, "authentications", _unknown_id("authentication method", method_id, methods))
        _warn_if_every_method_is_disabled(problems, configuration, section, service)
        if service.security_policy not in configuration.security_policies:
            problems.error(
                section,
                "security_policy",
                _unknown_id("security policy", service.security_policy, configuration.security_policies),
            )
        if service.proxy_protocol_sources and not service.proxy_protocol:
            problems.warn(section, "proxy_protocol_sources", "ignored: proxy_protocol = no")
        if isinstance(service, models.SSHServiceSettings) and service.enabled and not service.sftp:
            problems.warn(section, "sftp", "no: clients can log in but not transfer files")
        if isinstance(service, models.FTPServiceSettings) and service.enabled:
            _check_ftps_options(problems, section, service)
            _check_passive_address(problems, section, service)
        if service.type == "ldap-directory" and not _is_loopback(service.address):
            problems.error(
                section,
                "address",
                f"{service.address} is not a loopback address: the embedded demo directory answers anonymous "
                "searches with every userPassword, so it listens on 127.0.0.1, ::1 or localhost only",
            )
        if service.enabled and service.port:
            for (address, port), other in bound.items():
                if port == service.port and _addresses_clash(address, service.address):
                    problems.error(section, "port", f"{models.host_port(service.address, service.port)} is already used by [services/{other}]")
            bound[(service.address, service.port)] = service_id

    _check_manager(problems, configuration)

    usernames: dict[str, str] = {}
    for account_id, account in configuration.accounts.items():
        section = f"accounts/{account_id}"
        for group_id in account.group:
            if group_id not in configuration.groups:
                problems.error(section, "group", _unknown_id("group", group_id, configuration.groups))
        if not account.group:
            problems.require(section, "group", "at least one group is required (the first is the primary group)")
        key = models.local_account_key(account.username)
        if key in usernames:
            problems.error(section, "name", f"username {account.username!r} is also used by [accounts/{usernames[key]}]")
        usernames.setdefault(key, account_id)
        if problems.has_error(section, "password"):
            pass  # already said (env:NAME set but empty...)
        elif not account.password:
            problems.warn(section, "password", "no password is set: this account cannot log in")
        elif not _looks_like_hash(account.password):
            problems.error(section, "password", _NOT_A_HASH)
        _check_account_home(problems, configuration, section, account)


def _check_account_home(problems: _Problems, configuration: models.Configuration, section: str,
                        account: models.AccountSettings) -> None:
    """Warn about an account that can never log in for want of a home folder, as its logins would be refused."""
    primary = configuration.groups.get(account.group[0]) if account.group else None
    if account.home_folder_path:
        template = account.home_folder_path
    elif primary is None:
        return  # the unknown group is the error already said
    elif not primary.home_folder_path:
        problems.warn(section, "group", f"[groups/{primary.id}] has no home_folder_path, and this account has none "
                                        "of its own: this account cannot log in")
        return
    else:
        template = models.USER_MARKER  # the group's path: ${USER} is in it, or appended
    problem = models.user_folder_problem(account.username)
    if problem and models.USER_MARKER in template:
        problems.warn(section, "name", f"the name {account.username!r} {problem}, so it cannot stand for "
                                       f"{models.USER_MARKER} in the home folder: this account cannot log in")


def _check_manager(problems: _Problems, configuration: models.Configuration) -> None:
    """[administrators/..] and the Web Manager options that name other sections."""
    usernames: dict[str, str] = {}
    for administrator_id, administrator in configuration.administrators.items():
        section = f"administrators/{administrator_id}"
        for role_id in administrator.roles:
            if role_id not in configuration.roles:
                problems.error(section, "roles", _unknown_id("role", role_id, configuration.roles))
        if not administrator.roles:
            problems.require(section, "roles", "at least one role is required, e.g. DEFAULT-ROLE")
        if administrator.username in usernames:
            other = usernames[administrator.username]
            problems.error(section, "name", f"username {administrator.username!r} is also used by [administrators/{other}]")
        usernames.setdefault(administrator.username, administrator_id)
        if problems.has_error(section, "password"):
            pass  # already said
        elif not administrator.password:
            problems.warn(section, "password", "no password is set: this administrator cannot log in")
        elif not _looks_like_hash(administrator.password):
            problems.error(section, "password", _NOT_A_HASH)
    for service_id, service in configuration.services.items():
        if not isinstance(service, models.ManagerServiceSettings):
            continue
        section = f"services/{service_id}"
        if service.header_authentication_role not in configuration.roles:
            problems.error(
                section,
                "header_authentication_role",
                _unknown_id("role", service.header_authentication_role, configuration.roles),
            )
        elif service.header_authentication and not configuration.roles[service.header_authentication_role].enabled:
            problems.error(
                section,
                "header_authentication_role",
                f"[roles/{service.header_authentication_role}] is disabled, so every pre-authenticated session "
                "would hold a disabled role; name an enabled role",
            )
        elif service.header_authentication and configuration.roles[service.header_authentication_role].source_ip_filter:
            problems.error(
                section,
                "header_authentication_role",
                f"[roles/{service.header_authentication_role}] has a source_ip_filter, which a pre-authenticated "
                "session cannot honour: the Web Manager sees the proxy's address, not the administrator's; name a "
                "role without one and filter at the proxy",
            )
        if service.header_authentication and not service.trusted_proxies:
            problems.require(
                section,
                "trusted_proxies",
                "required when header_authentication = yes: the addresses of the reverse proxies that set preauth-* headers",
            )
        if not service.header_authentication and service.trusted_proxies:
            problems.warn(section, "trusted_proxies", "ignored: header_authentication = no")
        if service.header_authentication and service.proxy_protocol:
            # With a PROXY header the peer is the address the header claims, so
            # trusted_proxies would be checked against what any client can write.
            problems.error(
                section,
                "header_authentication",
                "cannot be used with proxy_protocol = yes: the peer checked against trusted_proxies would be the "
                "address the PROXY header claims, which a client reaching the port can choose",
            )
        if not service.metrics_require_login:
            problems.warn(
                section,
                "metrics_require_login",
                "/metrics is readable by anyone who reaches this port: limit access to it (address, firewall)",
            )
        methods = configuration.authentications_for(service)
        if configuration.administrators and models.DEFAULT_AUTHENTICATION not in methods:
            problems.warn(
                section,
                "authentications",
                f"{models.DEFAULT_AUTHENTICATION} is not listed: the [administrators/..] cannot log into this Web Manager",
            )


def _warn_if_every_method_is_disabled(problems: _Problems, configuration: models.Configuration, section: str,
                                      service: models.ServiceSettings) -> None:
    """An enabled service whose methods are all ``enabled = no`` refuses every login: say so."""
    if not service.enabled or service.type == "ldap-directory":
        return
    listed = configuration.authentications_for(service)
    methods = [configuration.authentications[method_id] for method_id in listed if method_id in configuration.authentications]
    if not methods or len(methods) < len(listed) or any(method.enabled for method in methods):
        return  # an unknown ID is its own error
    where = section if service.authentications else "server"
    problems.warn(where, "authentications", f"every method [{section}] uses is disabled ({', '.join(listed)}): "
                                            "each of its logins is refused")


_FTPS_OPTIONS = (
    "ftps_explicit_enabled",
    "ftps_force_secured_command_channel",
    "ftps_force_secured_data_channel",
    "ftps_require_session_reuse",
)


def _check_passive_address(problems: _Problems, section: str, service: models.FTPServiceSettings) -> None:
    """A ``passive_address`` PASV cannot announce, or that the passive ports are not listened on, is an error.

    Data connections come straight from the client, also behind a proxy, and
    are listened for on the control connection's address (``docs``:
    "Passive FTP behind a proxy").
    """
    try:
        announced = ipaddress.ip_address(service.passive_address)
        listened = ipaddress.ip_address(service.address)
    except ValueError:
        return  # not set, or a host name: its address is known only when PASV looks it up
    if announced.version == 6 and announced.ipv4_mapped is None:
        problems.error(section, "passive_address", f"{announced} is IPv6: PASV can announce only an IPv4 address "
                       "(EPSV, which IPv6 clients use, announces a port alone)")
    elif listened.version == 6 and not listened.is_unspecified and listened.ipv4_mapped is None:
        problems.error(section, "passive_address", f"{announced} is IPv4, and this service listens on {listened} only, "
                       "where its passive ports are listened for too: clients could not reach them. Give the service "
                       "an IPv4 address, or ::")


def _check_ftps_options(problems: _Problems, section: str, service: models.FTPServiceSettings) -> None:
    """FTPS asked for where the service speaks plain FTP: the administrator believes passwords are encrypted."""
    if service.implicit_tls:
        return  # without a certificate, an error of its own (ftp.load_tls)
    if service.ssl_certificate and not service.ftps_explicit_enabled:
        problems.warn(section, "ftps_explicit_enabled", "no: ssl_certificate is not used, this service speaks plain "
                      "FTP and passwords cross the network in clear")
    elif not service.ssl_certificate:
        for option in _FTPS_OPTIONS:
            if getattr(service, option) and (section, option) in problems.source.options:
                problems.warn(section, option, "ignored: without ssl_certificate this service speaks plain FTP and "
                              "passwords cross the network in clear (set ssl_certificate for FTPS)")


def _check_ldap_method(
    problems: _Problems, configuration: models.Configuration, section: str, method: models.LDAPAuthenticationSettings
) -> None:
    if method.bind_dn_type != "absolute" and not method.bind_dn:
        problems.require(section, "bind_dn", f"at least one base DN is required for bind_dn_type = {method.bind_dn_type}")
    if method.username_suffix and method.bind_dn_type != "direct-username":
        problems.warn(section, "username_suffix", f"ignored: it is added to the bind name for bind_dn_type = "
                      f"direct-username only, and this method has bind_dn_type = {method.bind_dn_type}")
    for group_id in method.base_groups:
        if group_id not in configuration.groups:
            problems.error(section, "base_groups", _unknown_id("group", group_id, configuration.groups))
    # A disabled method's secret may be missing here (a warning says so); env:NAME not set is its own error.
    if method.service_account_dn and not method.service_account_password and method.enabled:
        problems.require(section, "service_account_password", "required when service_account_dn is set")
    seen: dict[tuple[str, int], str] = {}  # (address form, port) -> the server as first written
    for host, port in method.address:
        port = port or method.port
        server = models.host_port(host, port)
        keys = [(form, port) for form in _address_forms(host, names=False)]
        twin = next((seen[key] for key in keys if key in seen), None)
        if twin is not None:
            # failover would try the same server twice, and /health count it twice
            problems.error(section, "address", f"{server} is listed twice (as {twin} too)")
        else:
            seen.update(dict.fromkeys(keys, server))
    _check_groups_and_roles(problems, configuration, section, method)
    _check_extension(problems, section, method)
    _check_ldap_tls(problems, section, method)


_VARIABLE = re.compile(r"\$\{[^}/]*\}|\$[A-Za-z_][A-Za-z0-9_]*")  # ${NAME} or $NAME


def _warn_of_other_placeholders(problems: _Problems, section: str, path: str) -> None:
    """A home folder path is not expanded by a shell: only ``${USER}`` is replaced; say so of anything like it."""
    for found in dict.fromkeys(_VARIABLE.findall(path)):
        if found == models.USER_MARKER:
            continue
        hint = f" (did you mean {models.USER_MARKER}?)" if found.strip("${}").upper() == "USER" else ""
        problems.warn(section, "home_folder_path", f"{found} is not replaced{hint}: the only placeholder is "
                      f"{models.USER_MARKER}, the login name; {found} is a folder name as written")


def _check_groups_and_roles(
    problems: _Problems, configuration: models.Configuration, section: str, method: models.LDAPAuthenticationSettings
) -> None:
    """Mapped IDs must exist; a group search needs both its base and its filter."""
    for option, mapping, known, what in (
        ("group_mapping", method.group_mapping, configuration.groups, "group"),
        ("roles_mapping", method.roles_mapping, configuration.roles, "role"),
    ):
        if mapping is None:
            continue
        listed_on = Counter(mapping.fallback_indexes)  # a line with several IDs, "A, B", may be a broken rule
        for target, index in mapping.targets_with_indexes():
            if target not in known:
                hint = f" (a rule is 'ATTRIBUTE, EXPRESSION, {what.upper()}-ID')" if listed_on[index] > 1 else ""
                problems.error(section, option, _unknown_id(what, target, known) + hint, index)
    if method.group_search_filter is not None and not method.group_search_base:
        problems.require(section, "group_search_base", "required when group_search_filter is set: the base DN of the groups")
    if method.nested_groups and not method.group_search_base:
        problems.require(
            section, "group_search_base", "required when nested_groups = yes: parent groups are searched under it"
        )
    if method.group_search_base and method.group_search_filter is None and not method.nested_groups:
        problems.require(
            section, "group_search_filter", "required when group_search_base is set, e.g. (member={dn}) or (memberUid={username})"
        )


def _check_extension(problems: _Problems, section: str, method: models.LDAPAuthenticationSettings) -> None:
    """Build the LDAP extension once, so check-config reports what its constructor refuses."""
    from sftpauth.auth.ldap.extensions import load_extension

    options = ("extension_entry_point", "extension_configuration")
    if any(problem.section == section and problem.option in options for problem in problems.errors):
        return  # already reported; a second error would only repeat it
    if method.extension_entry_point is None:
        if method.extension_configuration:
            problems.error(section, "extension_configuration", "set, but extension_entry_point is empty")
        return
    try:
        extension = load_extension(method.extension_entry_point, method.extension_configuration)
    except ValueError as error:
        given = (section, "extension_configuration") in problems.source.options
        problems.error(section, "extension_configuration" if given else "extension_entry_point", str(error))
        return
    names = ", ".join(extension.getExtraAttributes())
    if names and not method.service_account_dn:
        reader = "anonymously" if method.bind_dn_type == "search" else "by each user"
        problems.warn(
            section,
            "extension_entry_point",
            f"no service_account_dn: {names} is read {reader}, so users must be able to read their own "
            "secret; set a service account and hide the attribute from its owner (see the TOTP documentation)",
        )


def _address_forms(address: str, names: bool = True) -> set[str]:
    """What a listening or server address stands for: one IP in its short form (an IPv4-mapped one as IPv4),
    localhost's two loopback addresses (unless not ``names``), or a host name in lower case.

    LDAP servers are compared without the localhost rule: a TLS certificate
    may name ``localhost`` and not ``127.0.0.1``, so the two are two ways
    to reach the server that a configuration may rightly list both.
    """
    if names and address.lower() == "localhost":
        return {"127.0.0.1", "::1"}
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return {address.lower().rstrip(".")}
    mapped = getattr(ip, "ipv4_mapped", None)
    return {str(mapped or ip)}


def _addresses_clash(first: str, second: str) -> bool:
    """Two listeners on one port clash if an address is equal (in any spelling) or a wildcard of its family."""
    if _address_forms(first) & _address_forms(second):
        return True
    wildcards = {"0.0.0.0": 4, "::": 6, "": 4}
    for wildcard, other in ((first, second), (second, first)):
        if wildcard in wildcards:
            if wildcard == "::":
                return True
            return ":" not in other
    return False


_NOT_A_HASH = ("not a password hash sftpauth reads (argon2id, bcrypt, or SHA-crypt $5$/$6$ as SFTPPlus writes); "
               "make one with 'sftpauth hash-password'")


def _looks_like_hash(value: str) -> bool:
    from sftpauth.auth.passwords import is_supported_hash

    return is_supported_hash(value)


def _unknown_id(what: str, wanted: str, known: Iterable[str]) -> str:
    return f"unknown {what} {wanted!r}; defined: {', '.join(sorted(known)) or 'none'}"


def _check_ldap_tls(problems: _Problems, section: str, method: models.LDAPAuthenticationSettings) -> None:
    """Warnings for TLS settings that work but are probably not what was meant."""
    from sftpauth.auth.ldap.tls import DISABLED, SYSTEM

    trust = method.tls_trusted_certificates
    if method.secure_connection == "no":
        if trust != SYSTEM:
            problems.warn(section, "tls_trusted_certificates", "ignored: secure_connection = no (plain LDAP)")
        return
    if trust == DISABLED:
        problems.warn(
            section,
            "tls_trusted_certificates",
            "INSECURE: the LDAP servers' certificates are NOT verified (disable-identity-security): anyone "
            "on the network path can impersonate the directory and read every password; use a PEM bundle instead",
        )
    if method.secure_connection == "yes":
        plain = [host for host, port in method.address if (port or method.port) == 389]
        if plain:
            problems.warn(
                section,
                "secure_connection",
                f"LDAPS usually listens on port 636, not 389 ({', '.join(plain)}); "
                "port 389 is plain LDAP: use secure_connection = starttls there",
            )
