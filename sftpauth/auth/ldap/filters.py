"""LDAP filters as ldaptor objects: user input is always an assertion value.

RFC 4515 escaping is ldaptor's (``asText`` renders ``*``, ``(``, ``)``,
``\\`` and NUL as ``\\2a`` ...), so a username can never change a filter's
structure.
"""

from __future__ import annotations

from typing import Optional

from ldaptor import ldapfilter
from ldaptor.protocols import pureldap

MATCH_ALL = pureldap.LDAPFilter_present("objectClass")


class InvalidFilter(ValueError):
    pass


def parse_filter(text: str) -> Optional[pureldap.LDAPFilter]:
    """Parse a configured filter; ``None`` for an empty one."""
    written = text.strip()
    if not written:
        return None
    # The outer parentheses may be left out (uid=x); the error quotes the value as written.
    text = written if written.startswith("(") else f"({written})"
    try:
        return ldapfilter.parseFilter(text)
    except (ldapfilter.InvalidLDAPFilter, Exception) as error:
        raise InvalidFilter(f"{written!r} is not a valid LDAP filter (RFC 4515): {error}") from None


def equals(attribute: str, value: str) -> pureldap.LDAPFilter_equalityMatch:
    return pureldap.LDAPFilter_equalityMatch(
        attributeDesc=pureldap.LDAPAttributeDescription(attribute),
        assertionValue=pureldap.LDAPAssertionValue(value),
    )


def both(first: pureldap.LDAPFilter, second: Optional[pureldap.LDAPFilter]) -> pureldap.LDAPFilter:
    if second is None:
        return first
    return pureldap.LDAPFilter_and([first, second])


def as_text(filter_object: Optional[pureldap.LDAPFilter]) -> str:
    return "(objectClass=*)" if filter_object is None else filter_object.asText()
