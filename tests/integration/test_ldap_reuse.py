"""LDAP connection reuse against a real slapd (client.py, "Connection reuse").

A started pool keeps the connection of a finished login for the next one.
What must hold: logins share a few connections instead of opening one
each; a kept connection never runs an operation as the previous login's
user; connections closed by the server while kept (a restart) cost no
failed login and do not mark the server down; stopping the pool UNBINDs
and closes every kept connection.
"""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from twisted.internet import defer

from sftpauth.auth.ldap.client import UP

from .conftest import DIRECTORY_LDIF
from .ldap_helpers import ALICE_DN, BASE, PASSWORDS, InProcessLDAP, LDAPClientSpy, connections_left
from .slapd import SlapdServer

pytestmark = pytest.mark.slapd

HIDDEN = f"ou=hidden,{BASE}"
HANK_DN = f"uid=hank,{HIDDEN}"
# Anonymous may only authenticate against ou=hidden; any bound user may read it.
HIDDEN_ACL = f"""access to dn.subtree="{HIDDEN}"
    by users read
    by anonymous auth
    by * none"""
HIDDEN_LDIF = f"""dn: {HIDDEN}
objectClass: organizationalUnit
ou: hidden

dn: {HANK_DN}
objectClass: inetOrgPerson
uid: hank
cn: Hank
sn: Hidden
userPassword: hank-pass
"""
ANONYMOUS_SEARCH = f"""
bind_dn_type = search
bind_dn = {BASE}
username_attribute = uid
"""


@pytest.fixture(scope="module")
def hidden_slapd():
    server = SlapdServer(acl=HIDDEN_ACL).start()  # the fixture's directory plus ou=hidden
    try:
        server.add_ldif_file(DIRECTORY_LDIF)
        server.add_ldif(HIDDEN_LDIF)
        yield server
    finally:
        server.stop()


def reused(outcome) -> bool:
    return any("reusing a connection" in step for step in outcome.steps())


@pytest_twisted.ensureDeferred
async def test_a_kept_connection_never_searches_as_the_previous_user(hidden_slapd, tmp_path):
    """alice's login leaves its connection bound as alice; hank's login on it searches anonymously, so finds nobody."""
    # The directory makes a leak visible: bound as alice, hank is found; anonymously he is not.
    found = hidden_slapd.search(BASE, "(uid=hank)", attrs=("1.1",), bind_dn=ALICE_DN, password=PASSWORDS["alice"])
    assert [dn for dn, _ in found] == [HANK_DN]
    assert hidden_slapd.search(BASE, "(uid=hank)", attrs=("1.1",), bind_dn="") == []
    site = InProcessLDAP(hidden_slapd, tmp_path, ANONYMOUS_SEARCH)
    site.method.pool.start()
    try:
        first = await site.login("alice", PASSWORDS["alice"])
        assert first.ok, first
        second = await site.login("hank", "hank-pass")
        assert reused(second), second.steps()
        assert (second.reason, second.event["reason"]) == ("unknown-user", "unknown-user"), second.steps()
        # And the other way round: a kept anonymous connection serves alice again.
        third = await site.login("alice", PASSWORDS["alice"])
        assert third.ok and reused(third), third.steps()
    finally:
        site.method.pool.stop()
        site.close()


@pytest_twisted.ensureDeferred
async def test_logins_share_kept_connections_and_stop_unbinds_them(slapd, tmp_path, monkeypatch):
    """60 sequential search logins use two connections (searches as the service account, user BINDs),
    8 at a time at most 16; stopping the pool UNBINDs and closes them."""
    spy = LDAPClientSpy(monkeypatch)
    site = InProcessLDAP(
        slapd,
        tmp_path,
        f"bind_dn_type = search\nbind_dn = {BASE}\nusername_attribute = uid\n"
        f"service_account_dn = {slapd.admin_dn}\nservice_account_password = {slapd.admin_password}\n",
    )
    pool = site.method.pool
    pool.start()
    try:
        for number in range(60):
            outcome = await site.login("alice" if number % 3 else "bob", PASSWORDS["alice" if number % 3 else "bob"])
            assert outcome.ok, outcome
            if number:
                assert reused(outcome), outcome.steps()
                # The searching connection is still bound as the service account: no service BIND.
                assert any("already bound as service account" in step for step in outcome.steps()), outcome.steps()
                assert not any("BIND as service account" in step for step in outcome.steps()), outcome.steps()
        assert spy.connected == 2
        logins = [defer.ensureDeferred(site.authenticate("alice", PASSWORDS["alice"])) for _ in range(8)]
        outcomes = await defer.gatherResults(logins)
        assert all(outcome.ok for outcome in outcomes), outcomes
        assert 2 <= spy.connected <= 16
        assert 2 <= pool.idle_connections() <= 16
        assert spy.open == pool.idle_connections()
    finally:
        pool.stop()
        site.close()
    await spy.settle()
    assert spy.open == 0
    assert spy.unbinds == spy.connected
    assert await connections_left(slapd.port, os.getpid()) == []


@pytest_twisted.ensureDeferred
async def test_wrong_passwords_do_not_poison_kept_connections(slapd, tmp_path):
    """After a failed BIND the kept connection is anonymous; the next user's login on it works."""
    site = InProcessLDAP(slapd, tmp_path, f"bind_dn_type = parent\nbind_dn = ou=Engineering,ou=people,{BASE}\nusername_attribute = uid\n")
    site.method.pool.start()
    try:
        for username, password, reason in (
            ("alice", "wrong-pass", "invalid-password"),
            ("nobody", "wrong-pass", "unknown-user"),
            ("alice", PASSWORDS["alice"], ""),
            ("alice", "wrong-pass", "invalid-password"),
        ):
            outcome = await site.login(username, password)
            assert outcome.reason == reason, outcome.steps()
        assert site.method.pool.idle_connections() == 1
    finally:
        site.method.pool.stop()
        site.close()


@pytest_twisted.ensureDeferred
async def test_a_server_restart_costs_no_login_and_does_not_mark_it_down(tmp_path):
    """Connections kept across a slapd restart are dead; the next login opens a new one and the server stays up."""
    server = SlapdServer().start()
    restarted = None
    try:
        server.add_ldif_file(DIRECTORY_LDIF)
        site = InProcessLDAP(server, tmp_path, f"bind_dn_type = parent\nbind_dn = ou=Engineering,ou=people,{BASE}\nusername_attribute = uid\n")
        pool = site.method.pool
        pool.start()
        try:
            logins = [defer.ensureDeferred(site.authenticate("alice", PASSWORDS["alice"])) for _ in range(4)]
            assert all(outcome.ok for outcome in await defer.gatherResults(logins))
            assert pool.idle_connections() >= 1
            port = server.port
            server.stop()
            restarted = SlapdServer(port=port).start()
            restarted.add_ldif_file(DIRECTORY_LDIF)
            outcome = await site.login("alice", PASSWORDS["alice"])
            assert outcome.ok, outcome.steps()
            assert [state.status for state in pool.states()] == [UP]
            assert pool.idle_connections() == 1
        finally:
            pool.stop()
            site.close()
    finally:
        server.stop()
        if restarted is not None:
            restarted.stop()
