"""bind_dn_type = direct-username (and AD's error-49 sub-codes) against an in-process, recording LDAP server.

OpenLDAP cannot bind with ``john@ad.example.com`` or ``AD\\john``: only
Active Directory accepts such names. So this module plays AD with ldaptor:
a real LDAP server on 127.0.0.1:0 that records every BIND name and every
search filter, accepts one name/password pair and answers searches from an
in-memory tree. The LDAPMethod under test talks to it over TCP as it would
to a real directory.
"""

from __future__ import annotations

import io
import textwrap
from typing import Optional

import pytest
import pytest_twisted
from ldaptor.inmemory import fromLDIFFile
from ldaptor.interfaces import IConnectedLDAPEntry
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap.ldapserver import LDAPServer
from twisted.internet import defer
from twisted.internet.protocol import ServerFactory
from twisted.python.components import registerAdapter

from sftpauth.audit import AuditLog
from sftpauth.auth.chain import AuthenticationChain
from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap.dn import AD_REASONS, shown
from sftpauth.auth.trace import Trace
from sftpauth.auth.ldap.method import LDAPMethod
from sftpauth.config.loader import parse_configuration

DOMAIN = "dc=ad,dc=example,dc=com"
USERS = f"cn=Users,{DOMAIN}"
JOHN_DN = f"cn=John Smith,{USERS}"
UPN = "john@ad.example.com"
PASSWORD = "J0hn-Pa55"
MALLORY_DN = f"cn=Mallory,ou=Contractors,{DOMAIN}"  # holds the UPN john@alt.example.com
# Where AD keeps the domains' NetBIOS names (a partition of its own there; in this tree for the test)
CONFIGURATION = f"cn=Configuration,{DOMAIN}"
AD_MESSAGE = "80090308: LdapErr: DSID-0C09042A, comment: AcceptSecurityContext error, data {code}, v3839"

TREE_LDIF = f"""\
dn: {DOMAIN}
objectClass: top
objectClass: domain
dc: ad

dn: {USERS}
objectClass: top
objectClass: container
cn: Users

dn: ou=Contractors,{DOMAIN}
objectClass: top
objectClass: organizationalUnit
ou: Contractors

dn: {JOHN_DN}
objectClass: top
objectClass: person
objectClass: user
cn: John Smith
sAMAccountName: john
userPrincipalName: {UPN}
homeDirectory: users\\john
mail: {UPN}
memberOf: cn=FTP-Users,cn=Groups,{DOMAIN}

dn: {MALLORY_DN}
objectClass: top
objectClass: person
objectClass: user
cn: Mallory
sAMAccountName: mallory
userPrincipalName: john@alt.example.com

dn: {CONFIGURATION}
objectClass: top
objectClass: container
cn: Configuration

dn: cn=Partitions,{CONFIGURATION}
objectClass: top
objectClass: container
cn: Partitions

dn: cn=AD,cn=Partitions,{CONFIGURATION}
objectClass: top
objectClass: crossRef
cn: AD
nCName: {DOMAIN}
nETBIOSName: AD

"""


class RecordingDirectory(ServerFactory):
    """Plays Active Directory: records what clients send; the test decides the BIND answers."""

    def __init__(self, root):
        self.root = root
        self.binds: list[str] = []
        self.searches: list[tuple[str, str]] = []
        self.unbinds = 0
        self.connections = 0
        self.open_connections = 0
        # bind name -> password accepted for it
        self.accept: dict[str, str] = {}
        # bind name -> (result code, diagnostic message) answered whatever the password
        self.refuse: dict[str, tuple[int, str]] = {}
        # search bases answered insufficientAccessRights: the directory will not say whether they exist
        self.unreadable: set[str] = set()
        # the root DSE's configurationNamingContext (None: not shown, as a directory that is not AD)
        self.configuration_nc: Optional[str] = CONFIGURATION

    def buildProtocol(self, addr):
        self.connections += 1
        return super().buildProtocol(addr)


registerAdapter(lambda factory: factory.root, RecordingDirectory, IConnectedLDAPEntry)


class RecordingLDAPServer(LDAPServer):
    factory: RecordingDirectory

    def connectionMade(self):
        self.factory.open_connections += 1
        super().connectionMade()

    def connectionLost(self, reason=None):
        self.factory.open_connections -= 1
        super().connectionLost(reason)

    def handle_LDAPBindRequest(self, request, controls, reply):
        name = request.dn.decode("utf-8") if isinstance(request.dn, bytes) else request.dn
        password = request.auth.decode("utf-8") if isinstance(request.auth, bytes) else request.auth
        self.factory.binds.append(name)
        if name in self.factory.refuse:
            code, message = self.factory.refuse[name]
            return pureldap.LDAPBindResponse(resultCode=code, errorMessage=message)
        if name == "" or (name in self.factory.accept and self.factory.accept[name] == password):
            # As AD does, an empty password is an anonymous bind that succeeds.
            return pureldap.LDAPBindResponse(resultCode=0)
        if password == "":
            return pureldap.LDAPBindResponse(resultCode=0)
        return pureldap.LDAPBindResponse(resultCode=49, errorMessage=AD_MESSAGE.format(code="52e"))

    def getRootDSE(self, request, reply):
        attributes = [("supportedLDAPVersion", ["3"]), ("namingContexts", [DOMAIN])]
        if self.factory.configuration_nc is not None:
            attributes.append(("configurationNamingContext", [self.factory.configuration_nc]))
        reply(pureldap.LDAPSearchResultEntry(objectName="", attributes=attributes))
        return pureldap.LDAPSearchResultDone(resultCode=0)

    def handle_LDAPSearchRequest(self, request, controls, reply):
        base = request.baseObject.decode("utf-8") if isinstance(request.baseObject, bytes) else request.baseObject
        self.factory.searches.append((base, filter_text(request.filter)))
        if base in self.factory.unreadable:
            return pureldap.LDAPSearchResultDone(resultCode=50, errorMessage="insufficient access")
        return super().handle_LDAPSearchRequest(request, controls, reply)

    def handle_LDAPUnbindRequest(self, request, controls, reply):
        self.factory.unbinds += 1
        return super().handle_LDAPUnbindRequest(request, controls, reply)


RecordingDirectory.protocol = RecordingLDAPServer


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def filter_text(received) -> str:
    """RFC 4515 text of a filter as the server decoded it (values arrive as bytes)."""
    if isinstance(received, pureldap.LDAPFilter_and):
        return "(&" + "".join(filter_text(item) for item in received) + ")"
    if isinstance(received, pureldap.LDAPFilter_or):
        return "(|" + "".join(filter_text(item) for item in received) + ")"
    if isinstance(received, pureldap.LDAPFilter_not):
        return "(!" + filter_text(received.value) + ")"
    if isinstance(received, pureldap.LDAPFilter_present):
        return f"({_text(received.value)}=*)"
    if isinstance(received, pureldap.LDAPFilter_equalityMatch):
        value = pureldap.escape(_text(received.assertionValue.value))
        return f"({_text(received.attributeDesc.value)}={value})"
    return repr(received)


def load_tree():
    results = []
    fromLDIFFile(io.BytesIO(TREE_LDIF.encode("utf-8"))).addBoth(results.append)
    assert results and not hasattr(results[0], "getErrorMessage"), results
    return results[0]


@pytest_twisted.async_yield_fixture
async def directory():
    """A recording fake AD listening on 127.0.0.1:<free port>."""
    from twisted.internet import reactor

    factory = RecordingDirectory(load_tree())
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.port = port.getHost().port
    yield factory
    await port.stopListening()


def configuration_for(directory, options: str, tmp_path):
    text = textwrap.dedent(
        f"""
        [server]
        authentications = ad

        [groups/ldap-users]
        home_folder_path = {tmp_path}/homes

        [authentications/ad]
        type = ldap
        address = 127.0.0.1
        port = {directory.port}
        timeout = 5
        base_groups = ldap-users
        """
    ) + textwrap.dedent(options)
    return parse_configuration(text, str(tmp_path / "server.ini"), str(tmp_path), {})


def method_for(directory, options: str, tmp_path) -> LDAPMethod:
    from twisted.internet import reactor

    configuration = configuration_for(directory, options, tmp_path)
    return LDAPMethod(configuration.authentications["ad"], configuration, reactor)


def request(username: str, password: str = PASSWORD, manager: bool = False) -> LoginRequest:
    return LoginRequest(username, password, "sftp", "sftp", "192.0.2.1", manager=manager)


async def until_closed(directory) -> None:
    """Let the server see the client's UNBIND and close (a few reactor turns)."""
    from twisted.internet import reactor

    for _ in range(100):
        if directory.open_connections == 0:
            return
        await deferLater(reactor, 0.01)


def deferLater(reactor, seconds):
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


async def failure_of(method: LDAPMethod, login: LoginRequest) -> LoginFailed:
    with pytest.raises(LoginFailed) as caught:
        await method.authenticate(login)
    return caught.value


DIRECT_UPN = f"""
bind_dn_type = direct-username
bind_dn = {DOMAIN}
username_attribute = sAMAccountName
username_suffix = @ad.example.com
home_folder_attribute = homeDirectory, {{home}}/{{homeDirectory}}
"""


DOWN_LEVEL = f"""
bind_dn_type = direct-username
bind_dn = {DOMAIN}
username_attribute = sAMAccountName
"""


@pytest_twisted.ensureDeferred
async def test_bind_name_is_username_plus_suffix_then_search_by_samaccountname(directory, tmp_path):
    """'john' with username_suffix '@ad.example.com' binds as exactly 'john@ad.example.com', then finds the entry by sAMAccountName=john."""
    directory.accept[UPN] = directory.accept[JOHN_DN] = PASSWORD
    method = method_for(directory, DIRECT_UPN.replace("{home}", str(tmp_path / "ad")), tmp_path)
    account = await method.authenticate(request("john"))
    # The entry found holds the UPN that bound: it is that account, and no second BIND is needed.
    assert directory.binds == [UPN]
    assert directory.searches == [(DOMAIN, "(sAMAccountName=john)"), (DOMAIN, f"(userPrincipalName={UPN})")]
    assert account.dn == JOHN_DN
    assert account.username == "john"
    assert account.home_folder == str(tmp_path / "ad" / "users" / "john")  # AD's backslash became '/'
    assert account.groups == ("ldap-users",)
    await until_closed(directory)
    assert directory.unbinds == 1
    assert directory.open_connections == 0


@pytest_twisted.ensureDeferred
async def test_down_level_name_is_bound_as_typed_and_searched_by_its_user_part(directory, tmp_path):
    """'AD\\john' binds as exactly 'AD\\john' and the sAMAccountName search uses only 'john'."""
    directory.accept["AD\\john"] = directory.accept[JOHN_DN] = PASSWORD
    method = method_for(directory, DOWN_LEVEL, tmp_path)
    login = LoginRequest("AD\\john", PASSWORD, "sftp", "sftp", "192.0.2.1", trace=Trace())
    account = await method.authenticate(login)
    # AD is this domain's NetBIOS name (its crossRef): the account that bound is this domain's john.
    assert directory.binds == ["AD\\john"]
    assert directory.searches == [
        (DOMAIN, "(sAMAccountName=john)"), ("", "(objectClass=*)"),
        (f"CN=Partitions,{CONFIGURATION}", f"(&(nCName={DOMAIN})(objectClass=crossRef))"),
    ]
    assert "'AD' is the domain of the entry found (AD)" in [step.detail for step in login.trace.steps]
    directory.searches.clear()
    await method.authenticate(request("AD\\john"))
    assert directory.searches == [(DOMAIN, "(sAMAccountName=john)")]  # the NetBIOS name is read once per method
    # shown as typed, with one backslash (repr would double it)
    assert "BIND as 'AD\\john': success" in [step.detail for step in login.trace.steps]
    assert account.dn == JOHN_DN
    # The account is named by the entry's sAMAccountName, not by what was typed.
    assert account.username == "john"
    assert account.home_folder == str(tmp_path / "homes" / "john")


@pytest.mark.parametrize("typed", [UPN, "AD\\john"])
@pytest_twisted.ensureDeferred
async def test_a_name_that_already_names_its_domain_gets_no_suffix(directory, tmp_path, typed):
    """username_suffix is appended to bare names only: a UPN or DOMAIN\\user with it too could never bind."""
    directory.accept[typed] = directory.accept[JOHN_DN] = PASSWORD
    method = method_for(directory, DIRECT_UPN.replace("{home}", str(tmp_path / "ad")), tmp_path)
    try:
        await method.authenticate(request(typed))
    except LoginFailed:
        pass  # sAMAccountName=john@ad.example.com is not found: only the BIND name matters here
    # AD\john finds the entry sAMAccountName=john, confirmed by the domain's NetBIOS name: one BIND.
    assert directory.binds == [typed]


@pytest_twisted.ensureDeferred
async def test_userprincipalname_search_uses_the_full_upn(directory, tmp_path):
    """With username_attribute = userPrincipalName the search uses the full bind name, suffix included."""
    directory.accept[UPN] = PASSWORD
    method = method_for(
        directory,
        f"""
        bind_dn_type = direct-username
        bind_dn = {DOMAIN}
        username_attribute = userPrincipalName
        username_suffix = @ad.example.com
        """,
        tmp_path,
    )
    account = await method.authenticate(request("john"))
    assert directory.binds == [UPN]
    assert directory.searches == [(DOMAIN, f"(userPrincipalName={UPN})")]
    assert account.dn == JOHN_DN


@pytest_twisted.ensureDeferred
async def test_search_is_made_under_each_base_until_found(directory, tmp_path):
    """After the BIND, the bases are searched top to bottom and the first one holding the entry decides."""
    directory.accept[UPN] = directory.accept[JOHN_DN] = PASSWORD
    method = method_for(
        directory,
        f"""
        bind_dn_type = direct-username
        bind_dn =
            ou=Contractors,{DOMAIN}
            {USERS}
        username_attribute = sAMAccountName
        username_suffix = @ad.example.com
        """,
        tmp_path,
    )
    account = await method.authenticate(request("john"))
    assert directory.binds == [UPN]
    assert directory.searches[:2] == [(f"ou=Contractors,{DOMAIN}", "(sAMAccountName=john)"), (USERS, "(sAMAccountName=john)")]
    assert account.dn == JOHN_DN


@pytest_twisted.ensureDeferred
async def test_search_filter_applies_after_the_bind(directory, tmp_path):
    """A bound account whose entry does not match search_filter is refused with filter-mismatch."""
    directory.accept[UPN] = PASSWORD
    method = method_for(
        directory,
        f"""
        bind_dn_type = direct-username
        bind_dn = {DOMAIN}
        username_attribute = sAMAccountName
        username_suffix = @ad.example.com
        search_filter = (memberOf=cn=Admins,cn=Groups,{DOMAIN})
        """,
        tmp_path,
    )
    failure = await failure_of(method, request("john"))
    assert failure.reason == "filter-mismatch"
    assert directory.searches[0] == (DOMAIN, f"(&(sAMAccountName=john)(memberOf=cn=Admins,cn=Groups,{DOMAIN}))")


@pytest_twisted.ensureDeferred
async def test_bound_name_without_entry_under_the_bases_is_outside_base_dn(directory, tmp_path):
    """A name AD accepts but whose entry no search under bind_dn finds (another OU) is refused as outside-base-dn."""
    directory.accept["ghost@ad.example.com"] = PASSWORD
    method = method_for(directory, DIRECT_UPN.replace("{home}", str(tmp_path)), tmp_path)
    failure = await failure_of(method, request("ghost"))
    assert failure.reason == "outside-base-dn"
    assert "ghost@ad.example.com" in failure.explanation and DOMAIN in failure.explanation
    assert directory.searches == [(DOMAIN, "(sAMAccountName=ghost)")]


@pytest.mark.parametrize("code", sorted(AD_REASONS))
@pytest_twisted.ensureDeferred
async def test_ad_error_49_sub_codes_become_reasons(directory, tmp_path, code):
    """AD's 'data XXX' sub-code of error 49 becomes its own reason, and nothing is searched after the failed BIND."""
    directory.refuse[UPN] = (49, AD_MESSAGE.format(code=code))
    method = method_for(directory, DIRECT_UPN.replace("{home}", str(tmp_path)), tmp_path)
    failure = await failure_of(method, request("john"))
    assert (failure.reason, failure.explanation) == AD_REASONS[code]
    assert directory.binds == [UPN]
    assert directory.searches == []
    await until_closed(directory)
    assert directory.unbinds == 1


def test_typed_names_are_shown_as_typed_with_control_characters_escaped():
    """shown() keeps DOMAIN\\user's single backslash and escapes what cannot be printed."""
    assert shown("AD\\john") == "'AD\\john'"
    assert shown("john\n\x00") == "'john\\n\\x00'"


def test_ad_reasons_are_distinct_and_named():
    """Wrong password, unknown user, expired, disabled, locked and must-change are told apart."""
    reasons = {code: reason for code, (reason, _) in AD_REASONS.items()}
    assert reasons["525"] == "unknown-user"
    assert reasons["52e"] == "invalid-password"
    assert reasons["775"] == "account-locked"
    assert reasons["533"] == "account-disabled"
    assert reasons["532"] == "password-expired"
    assert reasons["701"] == "account-expired"
    assert reasons["773"] == "password-must-change"
    assert len(set(reasons.values())) == len(reasons)


@pytest_twisted.ensureDeferred
async def test_plain_invalid_credentials_without_sub_code(directory, tmp_path):
    """Error 49 without an AD sub-code is reported as invalid-credentials (the directory does not say which)."""
    directory.refuse[UPN] = (49, "Invalid credentials")
    method = method_for(directory, DIRECT_UPN.replace("{home}", str(tmp_path)), tmp_path)
    failure = await failure_of(method, request("john"))
    assert failure.reason == "invalid-credentials"


@pytest_twisted.ensureDeferred
async def test_other_bind_errors_are_ldap_errors(directory, tmp_path):
    """A BIND refused for another reason (e.g. unwilling to perform) is an ldap-error, never a success."""
    directory.refuse[UPN] = (53, "unwilling to perform")
    method = method_for(directory, DIRECT_UPN.replace("{home}", str(tmp_path)), tmp_path)
    failure = await failure_of(method, request("john"))
    assert failure.reason == "ldap-error"


@pytest.mark.parametrize("username", ["*", "john)(sAMAccountName=*", "*)(|(sAMAccountName=*"])
@pytest_twisted.ensureDeferred
async def test_filter_injection_in_direct_username_is_escaped(directory, tmp_path, username):
    """Even when the directory accepts the typed name, the search for it is one escaped equality test."""
    directory.accept[username + "@ad.example.com"] = PASSWORD
    method = method_for(directory, DIRECT_UPN.replace("{home}", str(tmp_path)), tmp_path)
    failure = await failure_of(method, request(username))
    assert failure.reason == "outside-base-dn"  # bound, but no entry matched the escaped name
    escaped = username.replace("*", r"\2a").replace("(", r"\28").replace(")", r"\29")
    assert directory.searches == [(DOMAIN, f"(sAMAccountName={escaped})")]


@pytest_twisted.ensureDeferred
async def test_empty_password_never_reaches_a_directory_that_would_accept_it(directory, tmp_path):
    """The chain refuses empty and blank passwords before any connection, although this AD-like server accepts them."""
    from twisted.internet import reactor

    configuration = configuration_for(directory, DIRECT_UPN.replace("{home}", str(tmp_path)), tmp_path)
    method = LDAPMethod(configuration.authentications["ad"], configuration, reactor)
    events: list[dict] = []
    audit = AuditLog("")
    audit.listeners.append(events.append)
    chain = AuthenticationChain(configuration, {"ad": method}, audit, defer.maybeDeferred)
    for password in ("", " ", " \t "):
        with pytest.raises(LoginFailed) as caught:
            await chain.login(request("john", password))
        assert caught.value.reason == "empty-password"
    assert [event["reason"] for event in events] == ["empty-password"] * 3
    assert directory.connections == 0
    assert directory.binds == []


@pytest_twisted.ensureDeferred
async def test_parent_walks_on_when_ad_says_user_not_found_under_a_base(directory, tmp_path):
    """With bind_dn_type = parent, AD's 525 (no such user) under the first base goes on to the next base."""
    directory.refuse[f"cn=John Smith,ou=Contractors,{DOMAIN}"] = (49, AD_MESSAGE.format(code="525"))
    directory.accept[JOHN_DN] = PASSWORD
    method = method_for(
        directory,
        f"""
        bind_dn_type = parent
        bind_dn =
            ou=Contractors,{DOMAIN}
            {USERS}
        username_attribute = cn
        """,
        tmp_path,
    )
    account = await method.authenticate(request("John Smith"))
    assert account.dn == JOHN_DN
    assert directory.binds == [f"cn=John Smith,ou=Contractors,{DOMAIN}", JOHN_DN]


PARENT_TWO_BASES = f"""
bind_dn_type = parent
bind_dn =
    ou=Contractors,{DOMAIN}
    {USERS}
username_attribute = cn
"""


@pytest_twisted.ensureDeferred
async def test_parent_names_every_dn_tried_when_no_base_holds_the_user(directory, tmp_path):
    """The audit detail says why each base failed, not only the last one."""
    contractor, user = f"cn=nobody,ou=Contractors,{DOMAIN}", f"cn=nobody,{USERS}"
    directory.refuse[contractor] = (49, AD_MESSAGE.format(code="525"))
    directory.refuse[user] = (49, "invalid credentials")  # no AD sub-code: sftpauth asks whether it exists
    failure = await failure_of(method_for(directory, PARENT_TWO_BASES, tmp_path), request("nobody"))
    assert failure.reason == "unknown-user"
    assert failure.explanation == f"Active Directory: user not found: {contractor}; no entry {user}"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("unreadable", [0, 1])
async def test_a_base_that_will_not_say_outweighs_bases_without_the_user(directory, tmp_path, unreadable):
    """The account may be in the base the directory will not show: invalid-credentials, whatever its place."""
    dns = [f"cn=nobody,ou=Contractors,{DOMAIN}", f"cn=nobody,{USERS}"]
    for dn in dns:
        directory.refuse[dn] = (49, "invalid credentials")
    directory.unreadable.add(dns[unreadable])
    failure = await failure_of(method_for(directory, PARENT_TWO_BASES, tmp_path), request("nobody"))
    assert failure.reason == "invalid-credentials"
    assert failure.explanation == f"BIND as {dns[unreadable]} failed and the directory does not say whether it exists"


@pytest_twisted.ensureDeferred
async def test_a_trusted_domains_namesake_does_not_get_the_local_account(directory, tmp_path):
    """OTHER\\john (another domain's account, its own password) binds, but is refused as the local john's entry."""
    directory.accept["OTHER\\john"] = "0ther-Pa55"
    directory.accept[JOHN_DN] = PASSWORD
    method = method_for(directory, DOWN_LEVEL, tmp_path)
    failure = await failure_of(method, request("OTHER\\john", "0ther-Pa55"))
    assert failure.reason == "account-mismatch"
    assert JOHN_DN in failure.explanation
    # No BIND as the local john with OTHER\john's password: AD would count it toward john's lockout.
    assert directory.binds == ["OTHER\\john"]


@pytest_twisted.ensureDeferred
async def test_a_upn_of_another_account_does_not_log_into_the_entry_of_its_samaccountname(directory, tmp_path):
    """'john' + suffix binds as whoever holds the UPN john@alt.example.com (mallory): refused, and without a BIND as
    the sAMAccountName=john entry with mallory's password, which AD would count toward locking john out (QA, Samba)."""
    directory.accept["john@alt.example.com"] = "M4llory-Pa55"
    directory.accept[JOHN_DN] = PASSWORD
    options = DIRECT_UPN.replace("{home}", str(tmp_path / "ad")).replace("@ad.example.com", "@alt.example.com")
    login = LoginRequest("john", "M4llory-Pa55", "sftp", "sftp", "192.0.2.1", trace=Trace())
    failure = await failure_of(method_for(directory, options, tmp_path), login)
    assert failure.reason == "account-mismatch"
    assert directory.binds == ["john@alt.example.com"]
    assert f"'john@alt.example.com' is the UPN of {MALLORY_DN}, another account" in [step.detail for step in login.trace.steps]


@pytest.mark.parametrize("typed", ["ad.example.com\\john", "ad\\john"])
@pytest_twisted.ensureDeferred
async def test_the_domain_may_be_typed_as_its_dns_name_or_in_any_case(directory, tmp_path, typed):
    """The domain's DNS name, or its NetBIOS name in another case, is this domain: no second BIND."""
    directory.accept[typed] = directory.accept[JOHN_DN] = PASSWORD
    account = await method_for(directory, DOWN_LEVEL, tmp_path).authenticate(request(typed))
    assert account.dn == JOHN_DN
    assert directory.binds == [typed]


@pytest.mark.parametrize("hidden", ["upn", "netbios"])
@pytest_twisted.ensureDeferred
async def test_where_the_directory_cannot_say_who_bound_the_entry_must_take_the_password(directory, tmp_path, hidden):
    """An implicit UPN (sAMAccountName@domain, held by no entry) or no readable NetBIOS name: a BIND as the entry's DN
    decides, as before; it succeeds for the account itself and refuses another account's password."""
    if hidden == "netbios":
        directory.configuration_nc = None
        options, typed = DOWN_LEVEL, "AD\\john"
    else:
        options, typed = DIRECT_UPN.replace("{home}", str(tmp_path / "ad")).replace("@ad.example.com", "@implicit.example.com"), "john"
    bind_name = typed if hidden == "netbios" else "john@implicit.example.com"
    directory.accept[bind_name] = directory.accept[JOHN_DN] = PASSWORD
    account = await method_for(directory, options, tmp_path).authenticate(request(typed))
    assert account.dn == JOHN_DN
    assert directory.binds == [bind_name, JOHN_DN]
    directory.binds.clear()
    directory.accept[bind_name] = "0ther-Pa55"  # now another account's name and password
    failure = await failure_of(method_for(directory, options, tmp_path), request(typed, "0ther-Pa55"))
    assert failure.reason == "account-mismatch"
    assert directory.binds == [bind_name, JOHN_DN]


