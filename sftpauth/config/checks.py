"""Value checks named in configspec.ini: raw text in, typed value out.

Each check raises ``validate.VdtValueError`` with a sentence that says what
is allowed, so the loader can put it behind file, line, section and option.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional

from validate import ValidateError, Validator

from sftpauth.permissions import Permission, parse_permissions

_YES = {"yes", "true", "on", "1", "y", "enabled"}
_NO = {"no", "false", "off", "0", "n", "disabled"}
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?$")


class VdtValueError(ValidateError):
    """A bad value; the message is shown as is, after file, line and option."""


class Unsupported:
    """Marker value for an SFTPPlus option sftpauth accepts but ignores."""


UNSUPPORTED = Unsupported()
# The same option set to a value that turns its feature off: what sftpauth does anyway, so no warning.
SWITCHED_OFF = Unsupported()


def split_list(value: str) -> tuple[str, ...]:
    """Split a comma list or one-per-line list, dropping empty items."""
    return tuple(item for _, item in _items_by_line(value))


def split_lines(value: str) -> tuple[str, ...]:
    """Split a value given one item per (continuation) line."""
    return tuple(line.strip() for line in value.splitlines() if line.strip())


def _items_by_line(value: str) -> list[tuple[int, str]]:
    """:func:`split_list`'s items, each with the index of its line among the value's lines (for errors)."""
    return [
        (index, part.strip())
        for index, line in enumerate(split_lines(value))
        for part in line.split(",")
        if part.strip()
    ]


def _check_each(items: Iterable[tuple[int, str]], check: Callable[[str], Any]) -> list:
    """``check`` of every ``(line index, item)``; every bad item is reported, each on its own line."""
    results, errors = [], []
    for index, item in items:
        try:
            results.append(check(item))
        except ValidateError as error:
            errors.append(VdtLineError(str(error), index))
    if errors:
        raise errors[0] if len(errors) == 1 else VdtLineErrors(errors)
    return results


def _unquote(value: str) -> str:
    """What is inside the quotes of a quoted value; the value as written otherwise."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        inside = value[1:-1]
        if value[0] in inside:
            # "Acme", "Corp" was read as: Acme", "Corp. No escaping exists to say which is meant.
            other = "'" if value[0] == '"' else '"'
            raise VdtValueError(
                f"the value holds its own quote character {value[0]}: quote the whole value once, "
                f"with the other quote ({other}) if it must hold {value[0]}, or give it without quotes"
            )
        return inside
    return value


def yesno(value: str) -> bool:
    word = _unquote(value).lower()
    if word in _YES:
        return True
    if word in _NO:
        return False
    raise VdtValueError(f"{value!r} is not yes or no")


def cpu_affinity(value: str) -> str:
    """``worker_cpu_affinity``: ``auto``, or ``no`` in any spelling ``yesno`` takes (off, false, 0)."""
    word = _unquote(value).lower()
    if word == "auto":
        return "auto"
    if word in _NO:
        return "no"
    raise VdtValueError(f"{_unquote(value)!r} is not allowed; expected auto (each worker on its own CPU) or no")


def text(value: str) -> str:
    return _unquote(value)


def choice(value: str, *allowed: str) -> str:
    """One of ``allowed``, in any case (``Yes``, ``LDAP``), given back as the configspec spells it.

    Where ``yes`` or ``no`` is allowed, so is every spelling :func:`yesno`
    takes (``True``, ``off``...), as for every yes/no option.
    """
    word = _unquote(value)
    key = word.lower()
    if key in _YES and "yes" in allowed:
        key = "yes"
    elif key in _NO and "no" in allowed:
        key = "no"
    for option in allowed:
        if key == option.lower():
            return option
    if len(allowed) == 1:
        raise VdtValueError(f"{word!r} is not supported; the only value is {allowed[0]}")
    raise VdtValueError(f"{word!r} is not allowed; expected one of: {', '.join(allowed)}")


def number(value: str, min: Optional[str] = None, max: Optional[str] = None) -> int:
    word = _unquote(str(value))
    # ASCII digits only: int() would also take "4_7031", "+30" and other scripts' digits.
    if not re.fullmatch(r"-?[0-9]+", word):
        raise VdtValueError(f"{word!r} is not a whole number" + _range_text(min, max))
    result = int(word, 10)
    if (min is not None and result < int(min)) or (max is not None and result > int(max)):
        raise VdtValueError(f"{result} is out of range" + _range_text(min, max))
    return result


def _range_text(min: Optional[str], max: Optional[str]) -> str:
    if min is not None and max is not None:
        return f"; allowed: {min} to {max}"
    if min is not None:
        return f"; allowed: {min} or more"
    return ""


def port(value: str) -> int:
    return number(value, "0", "65535")


def server_port(value: str) -> int:
    """The port of a server sftpauth connects to: 0 (a listening service's "any free port") means nothing there."""
    return number(value, "1", "65535")


MAX_WORKERS = 256


def allowed_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (its CPU affinity, so a container's cpuset counts); () if unknown."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return ()


def available_cores() -> int:
    """How many cores this process may run on."""
    return len(allowed_cpus()) or os.cpu_count() or 1


def worker_count(value: str) -> int:
    """``[server] workers``: 1 to MAX_WORKERS reactor processes, or ``auto``: one per available core."""
    word = _unquote(str(value))
    if word.lower() == "auto":
        return max(1, min(MAX_WORKERS, available_cores()))
    try:
        return number(word, "1", str(MAX_WORKERS))
    except VdtValueError as error:
        raise VdtValueError(f"{error}, or auto (one per core)") from None


def port_range(value: str) -> Optional[tuple[int, int]]:
    word = _unquote(value)
    if not word:
        return None
    match = re.fullmatch(r"\s*([0-9]+)\s*-\s*([0-9]+)\s*", word)
    if not match:
        raise VdtValueError(f"{word!r} is not a port range; expected FIRST-LAST, e.g. 60000-60100")
    first, last = int(match.group(1)), int(match.group(2))
    if first == last == 0:
        return None  # SFTPPlus's "0 - 0": any free port the system gives, as when empty
    if not (1 <= first <= last <= 65535):
        raise VdtValueError(
            f"{word!r} is not a port range; expected 1 <= FIRST <= LAST <= 65535 (or 0 - 0 for any free port)"
        )
    return (first, last)


def host(value: str) -> str:
    word = _unquote(value)
    if not word:
        return word
    candidate = word[1:-1] if word.startswith("[") and word.endswith("]") else word
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        pass
    if not _HOSTNAME.match(candidate) or re.fullmatch(r"[\d.]+", candidate):
        # All digits and dots is meant as an IPv4 address (999.1.1.1, 10.0.0): no DNS name looks like that.
        raise VdtValueError(f"{word!r} is not an IP address or host name")
    return candidate


def listen_address(value: str) -> str:
    """A service's ``address``: never empty, which some servers read as every interface and others as the default."""
    if not _unquote(value):
        raise VdtValueError(
            "empty; write the address to listen on: 0.0.0.0 for every IPv4 address, :: for every address, "
            "or leave the option out for 127.0.0.1"
        )
    return host(value)


def identifier(value: str) -> str:
    word = _unquote(value)
    if not word or "/" in word or "|" in word:
        raise VdtValueError(f"{word!r} is not an ID; an ID is any non-empty text without '/' or '|'")
    return word


def id_list(value: str) -> tuple[str, ...]:
    return tuple(_check_each(_items_by_line(_unquote(value)), identifier))


def text_list(value: str) -> tuple[str, ...]:
    return split_list(_unquote(value))


def lines(value: str) -> tuple[str, ...]:
    return split_lines(value)


def permissions(value: str) -> frozenset[Permission]:
    try:
        return parse_permissions(split_list(_unquote(value)))
    except ValueError as error:
        raise VdtValueError(str(error)) from None


ATTRIBUTE_NAME = r"(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)"  # an LDAP attribute name or OID (also groups.py)
ATTRIBUTE = re.compile(rf"^{ATTRIBUTE_NAME}$")  # the whole text is one (groups.py, dn.py)


def attribute(value: str) -> str:
    word = _unquote(value)
    if word and not ATTRIBUTE.match(word):
        raise VdtValueError(f"{word!r} is not an LDAP attribute name (letters, digits and '-')")
    return word


def required_attribute(value: str) -> str:
    """An attribute the method cannot work without: empty would refuse every login, so it is an error."""
    word = attribute(value)
    if not word:
        raise VdtValueError("is empty; name an LDAP attribute, or leave the option out for its default")
    return word


def address_list(value: str) -> tuple[tuple[str, Optional[int]], ...]:
    """``host[:port]`` items; IPv6 as ``[::1]:389`` or bare ``::1``."""

    def server(item: str) -> tuple[str, Optional[int]]:
        match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", item)
        if match:
            host_text, port_text = match.group(1), match.group(2)
        elif item.count(":") == 1:
            host_text, port_text = item.split(":")
        else:
            host_text, port_text = item, None
            _refuse_ambiguous_port(item)
        if not host_text.strip():
            raise VdtValueError(f"{item!r} names no server; write HOST:PORT, e.g. ldap.example.com:389")
        port_number = server_port(port_text) if port_text is not None else None
        return host(host_text), port_number  # a server listed twice: the loader's check (with port)

    result = _check_each(_items_by_line(_unquote(value)), server)
    if not result:
        raise VdtValueError("at least one LDAP server address is required")
    return tuple(result)


def _refuse_ambiguous_port(item: str) -> None:
    """``::1:389`` is an IPv6 address, but was most likely meant as ``::1`` and port 389: ask for brackets.

    Refused when the text is an IPv6 address whose last group is 2-5 digits
    and whose text without that group is an address too (``fe80::1:10``
    would be refused: written ``[fe80::1:10]`` it is accepted).
    """
    head, _, last = item.rpartition(":")
    if not (last.isdigit() and 2 <= len(last) <= 5 and head and ":" in head):
        return
    try:
        ipaddress.IPv6Address(item)
        ipaddress.IPv6Address(head)
    except ValueError:
        return
    raise VdtValueError(
        f"{item!r} is ambiguous; write [{head}]:{last} for port {last} of {head}, or [{item}] for that address"
    )


def dn(value: str):
    from sftpauth.auth.ldap.dn import parse_dn

    word = _unquote(value)
    if not word:
        return ""
    try:
        return parse_dn(word).getText()
    except ValueError as error:
        raise VdtValueError(str(error)) from None


def dn_list(value: str):
    """Base DNs, one per line (a DN holds commas, so never a comma list)."""
    from sftpauth.auth.ldap.dn import parse_dn

    def one(line: str):
        try:
            return parse_dn(_unquote(line))
        except ValueError as error:
            raise VdtValueError(str(error)) from None

    return tuple(_check_each(enumerate(split_lines(value)), one))


def ldap_filter(value: str):
    from sftpauth.auth.ldap.filters import InvalidFilter, parse_filter

    try:
        return parse_filter(_unquote(value))
    except InvalidFilter as error:
        raise VdtValueError(str(error)) from None


def home_folder_rule(value: str):
    from sftpauth.auth.ldap.home import HomeFolderRule

    try:
        return HomeFolderRule.parse(_unquote(value))
    except ValueError as error:
        raise VdtValueError(str(error)) from None


class VdtLineError(VdtValueError):
    """A bad item of a one-per-line value; ``index`` (from 0) lets the loader name its own line."""

    def __init__(self, message: str, index: Optional[int]):
        super().__init__(message)
        self.index = index


class VdtLineErrors(VdtValueError):
    """Several bad items of one value: the loader reports each (``line_errors``) on its own line."""

    def __init__(self, line_errors: list[VdtLineError]):
        super().__init__(str(line_errors[0]))
        self.line_errors = line_errors


def _mapping(value: str, kind: str):
    from sftpauth.auth.ldap.groups import GroupMapping, MappingError

    try:
        mapping = GroupMapping.parse(value, kind)
    except MappingError as error:
        found = [VdtLineError(str(each), each.index) for each in error.all]
        refused = found[0] if len(found) == 1 else VdtLineErrors(found)
        # The loader goes on with the good lines, so the IDs they name are checked in the same pass.
        refused.partial = None if error.partial is None or error.partial.empty else error.partial
        raise refused from None
    return None if mapping.empty else mapping


def group_mapping(value: str):
    """``group_mapping``: a GroupMapping of matching-expression rules (None when empty)."""
    return _mapping(value, "group")


def roles_mapping(value: str):
    """``roles_mapping``: the same grammar, giving role IDs."""
    return _mapping(value, "role")


def group_search_filter(value: str):
    """A filter template with ``{username}`` / ``{dn}`` placeholders (None when empty)."""
    from sftpauth.auth.ldap.groups import FilterTemplate, InvalidTemplate

    try:
        return FilterTemplate.parse(_unquote(value))
    except InvalidTemplate as error:
        raise VdtValueError(str(error)) from None


def dn_set(value: str) -> tuple[str, ...]:
    """DNs one per line, normalised (lower-case, canonical) for comparison."""
    from sftpauth.auth.ldap.groups import normalise_dn

    def one(line: str) -> str:
        try:
            return normalise_dn(_unquote(line))
        except ValueError as error:
            raise VdtValueError(str(error)) from None

    return tuple(dict.fromkeys(_check_each(enumerate(split_lines(value)), one)))


_ROLE_PERMISSIONS = ("all", "configuration", "read", "write")


def role_permissions(value: str) -> frozenset[str]:
    """``[roles/ID] permissions``: empty or ``all`` is full control; ``configuration, read`` is read-only."""

    def word_of(item: str) -> str:
        if item.lower() not in _ROLE_PERMISSIONS:
            raise VdtValueError(f"{item.lower()!r} is not a role permission; allowed: {', '.join(_ROLE_PERMISSIONS)}")
        return item.lower()

    words = _check_each(_items_by_line(_unquote(value)), word_of)
    if not words or "all" in words:
        return frozenset({"all"})
    return frozenset(words)


def entry_point(value: str):
    """``extension_entry_point``: ``python:module.Class``, imported now (None when empty)."""
    from sftpauth.auth.ldap.extensions import resolve_entry_point

    try:
        return resolve_entry_point(_unquote(value))
    except ValueError as error:
        raise VdtValueError(str(error)) from None


def json_object(value: str) -> dict:
    """``extension_configuration``: a JSON object ({} when empty)."""
    from sftpauth.auth.ldap.extensions import parse_extension_configuration

    try:
        return parse_extension_configuration(_unquote(value))
    except ValueError as error:
        raise VdtValueError(str(error)) from None


def make_validator(base_folder: str, environ: Mapping[str, str]) -> Validator:
    """A Validator whose path and secret checks know where the file lives."""

    def path(value: str) -> str:
        word = _unquote(value)
        if not word:
            return word
        if "\0" in word:
            raise VdtValueError("a path cannot contain NUL bytes")
        word = os.path.expanduser(word)
        # Home folder templates such as /srv/ftp/${USER} keep their marker.
        return os.path.normpath(os.path.join(base_folder, word))

    def folder(value: str) -> str:
        """A path that must be a folder if it exists (it is made at start otherwise)."""
        result = path(value)
        if result and os.path.exists(result) and not os.path.isdir(result):
            raise VdtValueError(f"{result!r} is a file, not a folder")
        return result

    def inheritable_path(value: str) -> str:
        """An account's ``home_folder_path``: ``Inherit`` (SFTPPlus) means the primary group's, as empty does."""
        if _unquote(value).lower() == "inherit":
            return ""
        return path(value)

    def path_list(value: str) -> tuple[str, ...]:
        return tuple(path(item) for item in split_list(value))

    def secret(value: str) -> str:
        word = _unquote(value)
        if word.startswith("env:"):
            name = word[4:]
            if name not in environ:
                raise VdtValueError(f"environment variable {name!r} is not set")
            if not environ[name]:
                raise VdtValueError(f"environment variable {name!r} is set but empty")
            return environ[name]
        if word.startswith("file:"):
            file_path = os.path.join(base_folder, os.path.expanduser(word[5:]))
            try:
                with open(file_path, encoding="utf-8") as secret_file:
                    content = secret_file.read().rstrip("\r\n")
                if not content:
                    raise VdtValueError(f"secret file {file_path!r} is empty")
                return content
            except OSError as error:
                raise VdtValueError(f"cannot read secret file {file_path!r}: {error.strerror}") from None
            except UnicodeDecodeError as error:
                raise VdtValueError(
                    f"secret file {file_path!r} is not UTF-8 text (byte {error.start + 1}); save it as UTF-8"
                ) from None
        return word

    def unsupported(value: str, *off: str) -> Unsupported:
        """``unsupported("no", "disabled")``: those values (any case, or empty when "" is listed) say what sftpauth does."""
        if off and _unquote(value or "").strip().lower() in off:
            return SWITCHED_OFF
        return UNSUPPORTED

    def refused(value: str, instead: str) -> None:
        raise VdtValueError(f"an SFTPPlus option that sftpauth does not take; {instead}")

    functions: dict[str, Callable] = {
        "yesno": yesno,
        "text": text,
        "choice": choice,
        "number": number,
        "port": port,
        "server_port": server_port,
        "port_range": port_range,
        "host": host,
        "listen_address": listen_address,
        "id": identifier,
        "id_list": id_list,
        "text_list": text_list,
        "lines": lines,
        "permissions": permissions,
        "path": path,
        "path_list": path_list,
        "inheritable_path": inheritable_path,
        "folder": folder,
        "secret": secret,
        "unsupported": unsupported,
        "refused": refused,
        "attribute": attribute,
        "required_attribute": required_attribute,
        "address_list": address_list,
        "dn": dn,
        "dn_list": dn_list,
        "ldap_filter": ldap_filter,
        "home_folder_rule": home_folder_rule,
        "entry_point": entry_point,
        "json_object": json_object,
        "group_mapping": group_mapping,
        "roles_mapping": roles_mapping,
        "group_search_filter": group_search_filter,
        "dn_set": dn_set,
        "role_permissions": role_permissions,
        "network_list": network_list,
        "tls_trust": lambda value: tls_trust(value, path),
        "shared_state": shared_state,
        "worker_count": worker_count,
        "cpu_affinity": cpu_affinity,
        "expression_list": expression_list,
    }
    for name in ONE_LINE_CHECKS:
        functions[name] = _one_line(functions[name])
    return Validator(functions)


# Checks of options that take one value: an indented line under them would be joined to the value with a
# line break (a banner sent as two lines broke FTP; a password hash with a line after it never matched).
ONE_LINE_CHECKS = (
    "yesno", "text", "choice", "number", "port", "server_port", "port_range", "host", "listen_address", "id", "path", "inheritable_path",
    "folder", "secret", "attribute", "required_attribute", "dn", "home_folder_rule", "entry_point", "tls_trust", "shared_state", "worker_count", "cpu_affinity",
)


def _one_line(check: Callable) -> Callable:
    def checked(value, *args, **kwargs):
        if isinstance(value, str) and "\n" in value:
            raise VdtValueError(
                "takes one value on one line, but an indented line below it continues the value; "
                "remove the indentation (or the line)"
            )
        return check(value, *args, **kwargs)

    return checked


def tls_trust(value: str, resolve_path: Callable[[str], str]) -> str:
    """``tls_trusted_certificates``: ``system``, ``disable-identity-security`` or a readable PEM bundle."""
    from sftpauth.auth.ldap.tls import DISABLED, SYSTEM, load_certificate_bundle

    word = _unquote(value)
    if word in ("", SYSTEM):
        return SYSTEM
    if word == DISABLED:
        return DISABLED
    bundle = resolve_path(word)
    try:
        load_certificate_bundle(bundle)
    except ValueError as error:
        raise VdtValueError(
            f"{error}; expected {SYSTEM}, {DISABLED} or the path of a PEM file of trusted CA certificates"
        ) from None
    return bundle


_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def network_list(value: str) -> tuple:
    """``trusted_proxies``: IP addresses or CIDRs (``10.0.0.0/8``, ``::1``), as ip_network objects.

    An IPv4-mapped network (``::ffff:10.0.0.0/104``) is taken as the IPv4 one
    (``10.0.0.0/8``): clients of a service on ``::`` are compared by their
    plain IPv4 address (``policy.plain_address``), which it would never match.
    """

    def network(item: str):
        try:
            found = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise VdtValueError(f"{item!r} is not an IP address or network; expected e.g. 10.0.0.5 or 10.0.0.0/24") from None
        if found.version == 6 and found.subnet_of(_IPV4_MAPPED):
            return ipaddress.IPv4Network((int(found.network_address) & 0xFFFFFFFF, found.prefixlen - 96))
        return found

    return tuple(_check_each(_items_by_line(_unquote(value)), network))


def shared_state(value: str) -> str:
    """``[server] state``: ``memory`` or ``redis://HOST[:PORT][/DB]``, returned in canonical form."""
    from sftpauth.state import InvalidStateURL, parse_state_url

    word = _unquote(value)
    if word.lower() == "memory":  # words of a choice are taken in any case
        return "memory"
    try:
        return parse_state_url(word).url
    except InvalidStateURL as error:
        raise VdtValueError(str(error)) from None


def expression_list(value: str) -> tuple:
    """Matching expressions (``deny_usernames``): one per line, or a comma list on one line.

    An expression holding a comma (``m/a{1,3}/``) must be given one per line.
    """
    from sftpauth.matching import InvalidExpression, compile_expression

    text = value if "\n" in value.strip() else _unquote(value)
    items = enumerate(split_lines(text)) if "\n" in text.strip() else ((0, item) for item in split_list(text))

    def one(item: str):
        try:
            return compile_expression(_unquote(item))
        except InvalidExpression as error:
            raise VdtValueError(str(error)) from None

    result = _check_each(items, one)
    return tuple(result)
