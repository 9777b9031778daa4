"""sftpauth.matching: the SFTPPlus matching-expression grammar (SPEC §3 "Matching expressions")."""

from __future__ import annotations

import fnmatch
import re

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from sftpauth.matching import GLOB, NEGATED_REGEX, REGEX, InvalidExpression, MatchingExpression, compile_expression

# -- every grammar form, as a table ----------------------------------------------------

MATCHES = [
    # bare glob: anchored, case-insensitive
    ("sales-apac-oceania", "sales-apac-oceania", True),
    ("sales-apac-oceania", "SALES-APAC-Oceania", True),
    ("sales-apac-oceania", "sales-apac-oceania2", False),
    ("sales-apac-oceania", "xsales-apac-oceania", False),
    ("*-apac-*", "sales-apac-oceania", True),
    ("*-apac-*", "cn=sales-APAC-oceania,ou=groups,dc=example,dc=com", True),
    ("*-apac-*", "sales-emea-uk", False),
    ("*", "", True),
    ("*", "line one\nline two", True),
    ("a*z", "a\nz", True),
    ("?", "x", True),
    ("?", "", False),
    ("?", "xy", False),
    ("b?b", "bob", True),
    ("b?b", "bb", False),
    ("[a-z]", "q", True),
    ("[a-z]", "Q", True),
    ("[a-z]", "7", False),
    ("team-[0-9]", "team-5", True),
    ("team-[0-9]", "team-x", False),
    ("[!x]", "y", True),
    ("[!x]", "x", False),
    ("[!x]", "X", False),
    ("[!0-9]*", "a1", True),
    ("[!0-9]*", "1a", False),
    ("[abc]", "B", True),
    ("[]]", "]", True),
    ("[!]]", "]", False),
    ("[!]]", "a", True),
    ("[a-]", "-", True),
    ("[-a]", "-", True),
    # literals in brackets
    ("[?]", "?", True),
    ("[?]", "a", False),
    ("what[?]", "what?", True),
    ("[*]", "*", True),
    ("[*]", "anything", False),
    ("[[]x]", "[x]", True),
    ("a[|]b", "a|b", True),
    ("a[|]b", "a", False),
    # alternatives
    ("sales|it", "SALES", True),
    ("sales|it", "it", True),
    ("sales|it", "hr", False),
    ("*-apac-*|*-emea-*", "x-emea-y", True),
    # leading ! negates the whole expression ("neither ... nor")
    ("!*-it-*", "sales-apac-oceania", True),
    ("!*-it-*", "ops-IT-team", False),
    ("!sales|it", "hr", True),
    ("!sales|it", "sales", False),
    ("!sales|it", "it", False),
    ("a!b", "a!b", True),
    # backslashes are literal (DNs hold them)
    (r"cn=a\,b*", r"cn=A\,B,dc=x", True),
    # explicit glob
    ("g/*-apac-*/", "SALES-APAC-X", True),
    ("g/cn=ftp,ou=groups,dc=example,dc=com/", "CN=FTP,OU=Groups,DC=example,DC=com", True),
    ("g/!admins/", "users", True),
    ("g/!admins/", "Admins", False),
    ("g/a/b/", "a/b", True),
    # regex: search semantics, case-sensitive
    ("m/sales-force-[1-3]/", "sales-force-2", True),
    ("m/sales-force-[1-3]/", "xx-sales-force-3-yy", True),
    ("m/sales-force-[1-3]/", "sales-force-4", False),
    ("m/sales-force-[1-3]/", "SALES-FORCE-2", False),
    ("m/^sales$/", "sales", True),
    ("m/^sales$/", "sales-2", False),
    ("m/a,b/", "xa,by", True),
    ("m/ x /", "a x b", True),
    ("m/ x /", "ax b", False),
    ("m/a/b/", "xa/by", True),
    ("m//", "anything", True),
    # regex with i: case-insensitive
    ("m/sales-force-[1-3]/i", "SALES-FORCE-2", True),
    ("m/^Admins$/i", "ADMINS", True),
    # negated regex
    ("e/admin/", "users", True),
    ("e/admin/", "sysadmins", False),
    ("e/admin/", "ADMIN", True),
    ("e/admin/i", "ADMIN", False),
    ("e/^$/", "", False),
]


@pytest.mark.parametrize("text, value, expected", MATCHES)
def test_grammar_table(text, value, expected):
    """Each grammar form matches exactly the values SFTPPlus documents."""
    assert compile_expression(text).matches(value) is expected


@pytest.mark.parametrize(
    "text, kind",
    [("*", GLOB), ("g/*/", GLOB), ("m/x/", REGEX), ("m/x/i", REGEX), ("e/x/", NEGATED_REGEX), ("e/x/i", NEGATED_REGEX)],
)
def test_kind_and_text_are_kept(text, kind):
    """A compiled expression keeps what the administrator wrote and says which method it is."""
    expression = compile_expression(text)
    assert expression.text == text
    assert str(expression) == text
    assert expression.kind == kind
    assert MatchingExpression.parse(text).kind == kind


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("!", "negates nothing"),
        ("a||b", "empty alternative"),
        ("|a", "empty alternative"),
        ("a|", "empty alternative"),
        ("[abc", "never closed"),
        ("x[", "never closed"),
        ("[!]", "never closed"),
        ("[z-a]", "reversed"),
        ("m/[/", "not a valid regular expression"),
        ("m/(a/", "not a valid regular expression"),
        ("e/*/", "not a valid regular expression"),
        ("m/a/x", "unknown modifier"),
        ("m/a/ii", "unknown modifier"),
        ("g/a/i", "takes no modifiers"),
        ("g//", "empty"),
        ("x/a/", "unknown matching method"),
        ("M/a/", "unknown matching method"),
        ("m/abc", "no closing '/'"),
        ("e/abc", "no closing '/'"),
    ],
)
def test_invalid_expressions_are_errors(text, fragment):
    """A malformed expression is refused with a sentence saying what is wrong."""
    with pytest.raises(InvalidExpression) as caught:
        compile_expression(text)
    assert fragment in str(caught.value)


def test_first_match_reports_the_matching_value():
    """Of a multi-valued attribute, the first matching value is returned (or None)."""
    expression = compile_expression("*-apac-*")
    assert expression.first_match(["syadmin", "sales-apac-oceania", "x-apac-y"]) == "sales-apac-oceania"
    assert expression.first_match(["syadmin"]) is None
    assert expression.first_match([]) is None


def test_compiled_once_and_reused():
    """The same compiled expression answers many values without recompiling."""
    expression = compile_expression("m/^u[0-9]+$/")
    assert [expression.matches(f"u{n}") for n in range(3)] == [True, True, True]
    assert expression.matches("x") is False


# -- property tests: the glob matcher against fnmatch as the reference ---------------------

# Letters whose lower() is one character and agrees with re.IGNORECASE.
_LITERALS = "abcxyzABCXYZ0189-_.=,@ \\/éÉüÜ"
_RANGES = [("a", "f"), ("m", "z"), ("A", "F"), ("M", "Z"), ("0", "4"), ("5", "9")]
_SET_MEMBERS = "abcXYZ019-?*|[!."
_MEMBER_LISTS = st.lists(st.one_of(st.sampled_from(_SET_MEMBERS), st.sampled_from(_RANGES)), min_size=1, max_size=4)
_STAR_TEXT = st.text(alphabet=_LITERALS + "\n", max_size=3)
_ANY_TEXT = st.text(alphabet=_LITERALS + "?*|[]!\n", max_size=8)
_LITERAL = st.sampled_from(_LITERALS)


@st.composite
def character_sets(draw) -> tuple[str, bool, list]:
    """A ``[...]`` set: its text, whether negated, and its members (chars or ranges)."""
    members: list = draw(_MEMBER_LISTS)
    negated = draw(st.booleans())
    leading_bracket = draw(st.booleans()) and draw(st.booleans())
    # '!' first would negate and '-' between members would make a range: keep the text unambiguous.
    if members and members[0] == "!":
        members = members[1:] + ["!"]
    parts = []
    for member in members:
        if isinstance(member, tuple):
            parts.append(f"{member[0]}-{member[1]}")
        elif member == "-":
            continue
        else:
            parts.append(member)
    text = "".join(parts)
    if "-" in members:
        text += "-"
    if leading_bracket:
        text = "]" + text
        members = ["]"] + members
    if not text or text.startswith("!"):
        text = "a" + text
        members = ["a"] + members
    return "[" + ("!" if negated else "") + text + "]", negated, members


def _set_char(members: list, negated: bool, draw) -> str:
    if negated:
        return draw(st.sampled_from("kKqQ5~é"))
    member = draw(st.sampled_from(members))
    if isinstance(member, tuple):
        return chr(draw(st.integers(ord(member[0]), ord(member[1]))))
    return member


_TOKEN_LISTS = st.lists(
    st.one_of(
        _LITERAL.map(lambda char: ("literal", char)),
        st.just(("star", "*")),
        st.just(("any", "?")),
        character_sets().map(lambda found: ("set", found)),
    ),
    min_size=1,
    max_size=6,
)


@st.composite
def globs_and_values(draw) -> tuple[list[str], bool, str]:
    """Alternatives of a glob, its negation, and a value often made from the glob itself."""
    alternatives = []
    instances = []
    for _ in range(draw(st.integers(1, 3))):
        tokens = draw(_TOKEN_LISTS)
        text, instance = [], []
        for kind, token in tokens:
            if kind == "set":
                set_text, negated, members = token
                text.append(set_text)
                instance.append(_set_char(members, negated, draw))
            elif kind == "star":
                text.append("*")
                instance.append(draw(_STAR_TEXT))
            elif kind == "any":
                text.append("?")
                instance.append(draw(_LITERAL))
            else:
                text.append(token)
                instance.append(token.swapcase() if draw(st.booleans()) else token)
        alternatives.append("".join(text))
        instances.append("".join(instance))
    negated = draw(st.booleans())
    value = draw(
        st.one_of(
            st.sampled_from(instances),
            _ANY_TEXT,
            st.sampled_from(instances).map(lambda text: text[:-1]),
            st.sampled_from(instances).map(lambda text: text + "x"),
        )
    )
    return alternatives, negated, value


# "b/..." would read as a method letter: such bare globs are written g/.../ (tested above).
_LOOKS_TYPED = re.compile(r"^[A-Za-z]/")


def reference_match(alternatives: list[str], negated: bool, value: str) -> bool:
    """fnmatch on lower-cased text, OR over the alternatives, then the negation."""
    found = any(fnmatch.fnmatchcase(value.lower(), alternative.lower()) for alternative in alternatives)
    return found != negated


@settings(max_examples=200, deadline=None, database=None)
@given(globs_and_values())
@example((["*-apac-*"], False, "sales-APAC-oceania"))
@example((["[!]]x"], False, "]x"))
@example((["a", "b"], True, "B"))
def test_glob_agrees_with_fnmatch_reference(case):
    """For any well-formed glob, the compiled matcher answers like fnmatch on lower-cased text."""
    alternatives, negated, value = case
    text = ("!" if negated else "") + "|".join(alternatives)
    assume(text.strip() and not _LOOKS_TYPED.match(text))
    assert compile_expression(text).matches(value) is reference_match(alternatives, negated, value)


@settings(max_examples=100, deadline=None, database=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="!"), min_size=1, max_size=20))
def test_bracketed_text_is_an_exact_case_insensitive_literal(text):
    """Any text with every character put in brackets matches itself (ASCII in any case) and nothing longer."""
    glob = "".join("[]]" if char == "]" else f"[{char}]" for char in text)
    expression = compile_expression(glob)
    assert expression.matches(text)
    if text.isascii():
        assert expression.matches(text.swapcase())
    assert expression.matches(text + "x") is False
    assert expression.matches(text[:-1]) is False


@settings(max_examples=100, deadline=None, database=None)
@given(globs_and_values())
def test_explicit_glob_and_negation_are_consistent(case):
    """g/X/ answers like X, and !X answers the opposite of X, for every value."""
    alternatives, _, value = case
    text = "|".join(alternatives)
    assume(text.strip() and not _LOOKS_TYPED.match(text))
    plain = compile_expression(text).matches(value)
    assert compile_expression(f"g/{text}/").matches(value) is plain
    assert compile_expression(f"!{text}").matches(value) is (not plain)


@settings(max_examples=100, deadline=None, database=None)
@given(
    st.from_regex(r"[a-z0-9]{1,4}(\[[a-z]-[a-z]\])?[a-z0-9]{0,3}", fullmatch=True),
    st.text(alphabet="abcxyzABC0129-", max_size=12),
)
def test_regex_forms_agree_with_re_search(pattern, value):
    """m// is re.search, m//i is re.search with IGNORECASE and e// is its negation."""
    assume(not re.search(r"\[([a-z])-([a-z])\]", pattern) or all(a <= b for a, b in re.findall(r"\[([a-z])-([a-z])\]", pattern)))
    found = re.search(pattern, value) is not None
    found_any_case = re.search(pattern, value, re.IGNORECASE) is not None
    assert compile_expression(f"m/{pattern}/").matches(value) is found
    assert compile_expression(f"m/{pattern}/i").matches(value) is found_any_case
    assert compile_expression(f"e/{pattern}/").matches(value) is (not found)
    assert compile_expression(f"e/{pattern}/i").matches(value) is (not found_any_case)
