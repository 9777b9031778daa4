"""Active Directory's ways with search results, in memory: continuation references, referrals, ranged values.

The same behaviours are proven against a real Samba AD DC in
tests/integration/test_active_directory.py; these tests pin the edge cases
a small DC does not produce (more than one range piece, a piece that never
comes, a referral answer).
"""

from __future__ import annotations

import pytest
import pytest_twisted
from ldaptor.protocols import pureldap
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap import client as ldap
from sftpauth.auth.ldap.client import Entry, LDAPConnection, LDAPResult, ServerAddress
from sftpauth.auth.ldap.dn import REFERRAL, complete_ranged_values, find_entry, trace_referrals
from sftpauth.auth.ldap.filters import MATCH_ALL
from log_capture import captured_logs

DN = "CN=Bob Brown,OU=FTP Users,DC=ad,DC=example,DC=com"
CONFIGURATION = "ldap://ad.example.com/CN=Configuration,DC=ad,DC=example,DC=com"
DNS_ZONES = "ldap://ForestDnsZones.ad.example.com/DC=ForestDnsZones,DC=ad,DC=example,DC=com"


class ScriptedClient:
    """An ldaptor client stand-in that answers each search with the messages it was given."""

    connected = True
    transport = None

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests = []

    def send_multiResponse(self, request, handler):
        self.requests.append(request)
        for message in self.answers.pop(0):
            handler(message)
        return defer.Deferred()


def reference(*uris: str) -> pureldap.LDAPSearchResultReference:
    return pureldap.LDAPSearchResultReference(uris=[pureldap.LDAPString(uri) for uri in uris])


def done(code: int = 0, message: str = "") -> pureldap.LDAPSearchResultDone:
    return pureldap.LDAPSearchResultDone(resultCode=code, errorMessage=message)


@pytest_twisted.ensureDeferred
async def test_continuation_references_are_collected_not_chased_and_logged_once(monkeypatch):
    """References come back in result.referrals, nothing else is sent, and the log says so once per server."""
    monkeypatch.setattr(ldap, "_REFERRALS_LOGGED", set())
    entry = pureldap.LDAPSearchResultEntry(objectName=DN, attributes=[("sAMAccountName", ["bob"])])
    client = ScriptedClient([entry, reference(CONFIGURATION), reference(DNS_ZONES), done()], [reference(CONFIGURATION), done()])
    connection = LDAPConnection(client, ServerAddress("dc1.ad.example.com", 389), MemoryReactorClock(), 5)
    with captured_logs() as logged:
        result, entries = await connection.search("DC=ad,DC=example,DC=com", 2, MATCH_ALL, ["sAMAccountName"])
        again, _ = await connection.search("DC=ad,DC=example,DC=com", 2, MATCH_ALL, ["sAMAccountName"])
    assert [found.dn for found in entries] == [DN]
    assert result.ok and result.referrals == (CONFIGURATION, DNS_ZONES)
    assert again.referrals == (CONFIGURATION,)
    assert len(client.requests) == 2  # no search went anywhere else
    said = [event for event in logged if "referrals" in event.get("log_format", "")]
    assert len(said) == 1
    assert said[0]["server"] == "dc1.ad.example.com:389" and CONFIGURATION in said[0]["uris"]


class Lookup:
    def __init__(self, bases=("OU=FTP Users,DC=ad,DC=example,DC=com",)):
        from sftpauth.auth.ldap.dn import parse_dn

        self.settings = type("Settings", (), {"bind_dn": [parse_dn(base) for base in bases]})()
        self.filter = None
        self.attributes = ("sAMAccountName",)
        self.steps = []

    def trace(self, action: str, detail: str) -> None:
        self.steps.append((action, detail))


def test_referrals_and_a_referral_answer_are_explained_with_the_global_catalog_advice():
    """Continuation references and a result code 10 both say 'not followed' and point at the global catalog ports."""
    lookup = Lookup()
    trace_referrals(lookup, "search", LDAPResult(0, "", referrals=(CONFIGURATION, DNS_ZONES, "ldap://a", "ldap://b")))
    trace_referrals(lookup, "search", LDAPResult(REFERRAL, "other domain"))
    trace_referrals(lookup, "search", LDAPResult(0, ""))
    assert len(lookup.steps) == 2
    assert "4 referral(s)" in lookup.steps[0][1] and "and 1 more" in lookup.steps[0][1]
    assert "referral: other domain" in lookup.steps[1][1]
    assert all("not followed" in detail and "3268" in detail for _, detail in lookup.steps)


class RangedConnection:
    """Answers base searches for NAME;range=LOW-* from a list of pieces, as AD does past MaxValRange."""

    def __init__(self, pieces: dict[str, tuple[str, tuple[str, ...]]]):
        self.pieces = pieces  # requested attribute -> (answered attribute, values)
        self.requests: list[str] = []

    async def search(self, base, scope, filter_object, attributes, size_limit=0):
        (wanted,) = attributes
        self.requests.append(wanted)
        if wanted not in self.pieces:
            return LDAPResult(ldap.SUCCESS, ""), [Entry(base, {})]
        answered, values = self.pieces[wanted]
        if answered is None:
            return LDAPResult(ldap.NO_SUCH_OBJECT, "gone"), []
        return LDAPResult(ldap.SUCCESS, ""), [Entry(base, {answered: values})]


@pytest_twisted.ensureDeferred
async def test_ranged_values_are_read_piece_by_piece_to_the_end():
    """memberOf;range=0-1 is followed by memberOf;range=2-*, answered 2-3, then 4-*, answered 4-* (the last piece)."""
    connection = RangedConnection(
        {
            "memberof;range=2-*": ("memberof;range=2-3", ("CN=c", "CN=d")),
            "memberof;range=4-*": ("memberof;range=4-*", ("CN=e",)),
        }
    )
    entry = Entry(DN, {"memberof;range=0-1": ("CN=a", "CN=b"), "samaccountname": ("bob",)})
    lookup = Lookup()
    complete = await complete_ranged_values(connection, entry, lookup)
    assert complete.get("memberOf") == ("CN=a", "CN=b", "CN=c", "CN=d", "CN=e")
    assert complete.get("sAMAccountName") == ("bob",)
    assert "memberof;range=0-1" not in complete.attributes
    assert connection.requests == ["memberof;range=2-*", "memberof;range=4-*"]
    assert lookup.steps == [("entry", "memberof: 5 values, read in 3 ranged pieces")]


@pytest_twisted.ensureDeferred
async def test_an_entry_without_ranges_is_returned_as_it_is():
    """No NAME;range= attribute: no request at all."""
    connection = RangedConnection({})
    entry = Entry(DN, {"memberof": ("CN=a",)})
    assert await complete_ranged_values(connection, entry) is entry
    assert connection.requests == []


@pytest_twisted.ensureDeferred
async def test_a_missing_range_piece_refuses_the_login_rather_than_guessing_groups():
    """When the next piece cannot be read, the login is refused (ldap-error), never given a partial memberOf."""
    connection = RangedConnection({"member;range=1500-*": (None, ())})
    entry = Entry(DN, {"member;range=0-1499": tuple(f"CN=u{number}" for number in range(1500))})
    with pytest.raises(LoginFailed) as caught:
        await complete_ranged_values(connection, entry)
    assert caught.value.reason == "ldap-error"
    assert "member;range=1500-*" in caught.value.explanation


@pytest_twisted.ensureDeferred
async def test_a_referral_answer_for_a_base_is_not_found_there():
    """A base held by another domain answers result code 10: the user is not found there, with the advice in the trace."""

    class ReferringConnection:
        async def search(self, base, scope, filter_object, attributes, size_limit=0):
            return LDAPResult(REFERRAL, "0000202B: RefErr: DSID-0310082F, data 0, 1 access points"), []

    lookup = Lookup(bases=("DC=emea,DC=ad,DC=example,DC=com",))
    with pytest.raises(LoginFailed) as caught:
        await find_entry(ReferringConnection(), lookup, "sAMAccountName", "bob")
    assert caught.value.reason == "unknown-user"
    assert any("not followed" in detail and "3268" in detail for _, detail in lookup.steps)


class AnonymousRefused:
    """AD to an anonymous client: the root DSE is readable, every other search needs a BIND."""

    async def search(self, base, scope, filter_object, attributes, size_limit=0):
        if base == "":
            return LDAPResult(ldap.SUCCESS, ""), [Entry("", {"namingcontexts": ("DC=ad,DC=example,DC=com",)})]
        return LDAPResult(1, "00002020: Operation unavailable without authentication"), []


@pytest.mark.parametrize("bind_dn_type, status", [("direct-username", "info"), ("parent", "info"), ("search", "FAIL")])
@pytest_twisted.ensureDeferred
async def test_verify_ldap_on_a_directory_that_refuses_anonymous_searches(tmp_path, bind_dn_type, status):
    """Refused anonymous searches fail verify-ldap only for bind_dn_type = search, whose logins do search anonymously."""
    from sftpauth.auth.ldap.verify import _directory_checks
    from sftpauth.config.loader import parse_configuration

    text = f"""
[server]
authentications = ad

[authentications/ad]
type = ldap
address = dc1.ad.example.com
bind_dn_type = {bind_dn_type}
bind_dn = OU=FTP Users,DC=ad,DC=example,DC=com
username_attribute = sAMAccountName
"""
    configuration = parse_configuration(text, str(tmp_path / "sftpauth.ini"), str(tmp_path), {})
    checks = await _directory_checks(configuration.authentications["ad"], AnonymousRefused(), ServerAddress("dc1", 389))
    (search,) = [check for check in checks if check.step == "search"]
    assert search.status == status
    assert "operations error (1)" in search.detail
