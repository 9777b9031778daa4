"""SFTPPlus matching expressions, compiled once when the configuration loads.

The grammar (``METHOD/EXPRESSION/MODIFIERS``, a bare expression is a glob):

``GLOB`` or ``g/GLOB/``
    Case-insensitive, anchored at both ends, ``*`` also crosses line breaks.
    ``*`` any text, ``?`` one character, ``[a-z]`` a character of a set or
    range, ``[!x]`` a character not in it, ``|`` separates alternatives and
    a leading ``!`` negates the whole expression (``!a|b`` is "neither a
    nor b"). A wildcard is made literal by wrapping it in brackets: ``[?]``,
    ``[*]``, ``[[]``, ``[|]``. There is no backslash escape (DNs hold
    backslashes). A glob without wildcards is an exact, case-insensitive
    value.
``m/REGEX/`` and ``m/REGEX/i``
    A Python regular expression with search semantics (it may match
    anywhere in the value; anchor it with ``^...$``), case-sensitive unless
    the ``i`` modifier is given.
``e/REGEX/`` and ``e/REGEX/i``
    The negation: true when the regular expression finds nothing.

Any other ``X/.../`` (a single letter, then ``/``) is an error rather than a
glob, so a mistyped method is never silently a literal.
"""

from __future__ import annotations

import re
from typing import Callable

import attrs

GLOB = "glob"
REGEX = "regex"
NEGATED_REGEX = "negated-regex"
_METHODS = {"g": GLOB, "m": REGEX, "e": NEGATED_REGEX}
_TYPED = re.compile(r"^([A-Za-z])/(.*)/([A-Za-z]*)$", re.DOTALL)


class InvalidExpression(ValueError):
    """The text is not a matching expression; the message says why."""


@attrs.frozen
class MatchingExpression:
    """One compiled expression; ``text`` is what the administrator wrote."""

    text: str
    kind: str
    _match: Callable[[str], bool] = attrs.field(repr=False, eq=False)

    @classmethod
    def parse(cls, text: str) -> "MatchingExpression":
        return compile_expression(text)

    def matches(self, value: str) -> bool:
        return self._match(value)

    def first_match(self, values) -> "str | None":
        """The first of ``values`` that matches, or None (a multi-valued attribute)."""
        for value in values:
            if self._match(value):
                return value
        return None

    def __str__(self) -> str:
        return self.text


def compile_expression(text: str) -> MatchingExpression:
    """Compile ``text``; raises :class:`InvalidExpression` saying what is wrong."""
    if not text or not text.strip():
        raise InvalidExpression("the matching expression is empty")
    typed = _TYPED.match(text)
    if typed is None:
        if re.match(r"^[A-Za-z]/", text) and text[0].lower() in _METHODS:
            raise InvalidExpression(
                f"{text!r} starts with '{text[:2]}' but has no closing '/'; "
                f"write {text[0]}/EXPRESSION/ (or [{text[0]}]/... for a glob starting with it)"
            )
        return MatchingExpression(text, GLOB, _compile_glob(text))
    method, body, modifiers = typed.group(1), typed.group(2), typed.group(3)
    kind = _METHODS.get(method.lower()) if method.islower() else None
    if kind is None:
        raise InvalidExpression(
            f"{text!r}: unknown matching method {method!r}; allowed: g/GLOB/, m/REGEX/, m/REGEX/i, e/REGEX/, e/REGEX/i"
        )
    if kind == GLOB:
        if modifiers:
            raise InvalidExpression(f"{text!r}: g/GLOB/ takes no modifiers (globs are always case-insensitive)")
        if not body:
            raise InvalidExpression(f"{text!r}: the glob is empty")
        return MatchingExpression(text, GLOB, _compile_glob(body))
    if modifiers not in ("", "i"):
        raise InvalidExpression(
            f"{text!r}: unknown modifier {modifiers!r}; the only modifier is 'i' (case-insensitive)"
        )
    flags = re.IGNORECASE if modifiers == "i" else 0
    try:
        pattern = re.compile(body, flags)
    except re.error as error:
        raise InvalidExpression(f"{text!r} is not a valid regular expression: {error}") from None
    if kind == REGEX:
        return MatchingExpression(text, kind, lambda value: pattern.search(value) is not None)
    return MatchingExpression(text, kind, lambda value: pattern.search(value) is None)


def glob_to_regex(glob: str) -> tuple[str, bool]:
    """The regular expression of a glob (to use with fullmatch) and whether it is negated."""
    negated = glob.startswith("!")
    if negated:
        glob = glob[1:]
    if not glob:
        raise InvalidExpression("'!' negates nothing: the glob after it is empty")
    alternatives: list[str] = []
    current: list[str] = []
    index = 0
    while index < len(glob):
        char = glob[index]
        if char == "*":
            current.append(".*")
        elif char == "?":
            current.append(".")
        elif char == "|":
            alternatives.append(_alternative(current, glob))
            current = []
        elif char == "[":
            piece, index = _character_set(glob, index)
            current.append(piece)
            continue
        else:
            current.append(re.escape(char))
        index += 1
    alternatives.append(_alternative(current, glob))
    return "(?:" + "|".join(alternatives) + ")", negated


def _alternative(parts: list[str], glob: str) -> str:
    if not parts:
        raise InvalidExpression(f"{glob!r} has an empty alternative around '|'")
    return "".join(parts)


def _character_set(glob: str, start: int) -> tuple[str, int]:
    """``[...]`` at ``start``: the regex set and the index after ``]``.

    As in fnmatch: ``!`` first negates, and a ``]`` right after ``[`` or
    ``[!`` is a member, so ``[]]`` and ``[!]]`` work.
    """
    index = start + 1
    negate = index < len(glob) and glob[index] == "!"
    if negate:
        index += 1
    members: list[str] = []
    first = True
    while True:
        if index >= len(glob):
            raise InvalidExpression(f"{glob!r}: '[' at position {start + 1} is never closed by ']'")
        char = glob[index]
        if char == "]" and not first:
            break
        first = False
        if index + 2 < len(glob) and glob[index + 1] == "-" and glob[index + 2] != "]":
            low, high = char, glob[index + 2]
            if low > high:
                raise InvalidExpression(f"{glob!r}: the range '{low}-{high}' is reversed")
            members.append(f"{re.escape(low)}-{re.escape(high)}")
            index += 3
        else:
            members.append(re.escape(char))
            index += 1
    return ("[^" if negate else "[") + "".join(members) + "]", index + 1


def _compile_glob(glob: str) -> Callable[[str], bool]:
    source, negated = glob_to_regex(glob)
    pattern = re.compile(source, re.IGNORECASE | re.DOTALL)
    if negated:
        return lambda value: pattern.fullmatch(value) is None
    return lambda value: pattern.fullmatch(value) is not None
