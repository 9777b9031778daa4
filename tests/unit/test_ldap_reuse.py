"""Connection reuse in LDAPServerPool and LDAPConnection (client.py), on a clock and a recording client.

The real-server counterpart is tests/integration/test_ldap_reuse.py.
"""

from __future__ import annotations

import pytest
from ldaptor.protocols import pureldap
from twisted.internet import defer, task

from sftpauth.auth.ldap.client import (
    DOWN,
    IDLE_SECONDS,
    INVALID_CREDENTIALS,
    SUCCESS,
    UP,
    LDAPConnection,
    LDAPServerPool,
    LDAPUnavailable,
    ServerAddress,
)
from sftpauth.auth.ldap.tls import TLSPolicy

FIRST = ServerAddress("127.0.0.1", 389)
SECOND = ServerAddress("127.0.0.2", 389)
SERVICE = "cn=service,dc=example,dc=com"
ALICE = "uid=alice,dc=example,dc=com"


class Transport:
    def __init__(self, client):
        self.client = client

    def loseConnection(self):
        self.client.connected = False
        self.client.log.append("close")

    abortConnection = loseConnection


class RecordingClient:
    """Stands in for ldaptor's LDAPClient: records requests and answers at once (or never)."""

    def __init__(self):
        self.connected = True
        self.log: list = []
        self.transport = Transport(self)
        self.passwords = {SERVICE: "service-pass", ALICE: "alice-pass"}
        self.silent = False

    def send(self, request):
        if isinstance(request, pureldap.LDAPBindRequest):
            dn = request.dn.decode() if isinstance(request.dn, bytes) else request.dn
            self.log.append(("bind", dn))
            if self.silent:
                return defer.Deferred()
            ok = dn == "" or self.passwords.get(dn) == request.auth.decode()
            return defer.succeed(pureldap.LDAPBindResponse(resultCode=SUCCESS if ok else INVALID_CREDENTIALS))
        raise AssertionError(request)

    def send_multiResponse(self, request, handler):
        self.log.append(("search", request.baseObject))
        handler(pureldap.LDAPSearchResultDone(resultCode=SUCCESS))
        return defer.succeed(None)

    def unbind(self):
        self.log.append("unbind")


class Connector:
    def __init__(self, clock):
        self.clock = clock
        self.timeout = 5
        self.tls = TLSPolicy("no", "system")
        self.opened: list[LDAPConnection] = []
        self.refuse = False

    async def open(self, address, on_unavailable=None, progress=None):
        if self.refuse:
            raise LDAPUnavailable(f"{address}: connection refused", "refused", "connection refused")
        connection = LDAPConnection(RecordingClient(), address, self.clock, self.timeout, on_unavailable)
        self.opened.append(connection)
        return connection


def make_pool(keep=4, started=True, addresses=(FIRST, SECOND)):
    clock = task.Clock()
    connector = Connector(clock)
    pool = LDAPServerPool(addresses, clock, 5, retry_interval=30, name="ldap", connector=connector, keep=keep, shared_identity=SERVICE)
    if started:
        pool.start()
    return pool, connector, clock


def run(coroutine):
    results = []
    defer.ensureDeferred(coroutine).addBoth(results.append)
    assert results, "did not finish"
    if isinstance(results[0], defer.Failure):
        results[0].raiseException()
    return results[0]


def test_a_released_connection_serves_the_next_login():
    pool, connector, _ = make_pool()
    first = run(pool.connect())
    pool.release(first)
    assert run(pool.connect()) is first
    assert len(connector.opened) == 1
    assert first.uses == 1


def test_a_pool_that_is_not_started_closes_each_connection():
    """test-login and the in-process harness: one connection per login, UNBINDed."""
    pool, connector, _ = make_pool(started=False)
    first = run(pool.connect())
    pool.release(first)
    assert first.client.log == ["unbind", "close"]
    assert run(pool.connect()) is not first


def test_keep_zero_closes_each_connection():
    pool, connector, _ = make_pool(keep=0)
    first = run(pool.connect())
    pool.release(first)
    assert first.client.log == ["unbind", "close"]
    assert pool.idle_connections() == 0


def test_at_most_keep_connections_stay_idle_per_server():
    pool, connector, _ = make_pool(keep=2)
    connections = [run(pool.connect()) for _ in range(5)]
    for connection in connections:
        pool.release(connection)
    assert pool.idle_connections() == 2
    assert [connection.client.connected for connection in connections] == [True, True, False, False, False]


def test_a_lent_connection_bound_as_a_user_is_reset_before_it_searches():
    pool, connector, _ = make_pool()
    connection = run(pool.connect())
    assert run(connection.bind(ALICE, "alice-pass")).ok
    pool.release(connection)
    again = run(pool.connect())
    run(again.search("dc=example,dc=com", pureldap.LDAP_SCOPE_wholeSubtree, pureldap.LDAPFilter_present("uid"), ()))
    assert again.client.log[-2:] == [("bind", ""), ("search", "dc=example,dc=com")]
    assert again.bound_as is None


def test_a_login_that_binds_first_needs_no_reset():
    pool, connector, _ = make_pool()
    connection = run(pool.connect())
    run(connection.bind(ALICE, "alice-pass"))
    pool.release(connection)
    again = run(pool.connect())
    run(again.bind(ALICE, "alice-pass"))
    run(again.search(ALICE, pureldap.LDAP_SCOPE_baseObject, pureldap.LDAPFilter_present("objectClass"), ()))
    assert again.client.log == [("bind", ALICE), ("bind", ALICE), ("search", ALICE)]


@pytest.mark.parametrize("identity, password", [(SERVICE, "service-pass"), (ALICE, "wrong")])
def test_service_account_or_anonymous_connections_need_no_reset(identity, password):
    """Bound as the method's service account, or anonymous after a refused BIND: searched as is."""
    pool, connector, _ = make_pool()
    connection = run(pool.connect())
    run(connection.bind(identity, password))
    pool.release(connection)
    again = run(pool.connect())
    run(again.search("dc=example,dc=com", pureldap.LDAP_SCOPE_wholeSubtree, pureldap.LDAPFilter_present("uid"), ()))
    assert again.client.log[-1] == ("search", "dc=example,dc=com")
    assert ("bind", "") not in again.client.log


def test_a_connection_that_timed_out_is_never_kept():
    pool, connector, clock = make_pool()
    connection = run(pool.connect())
    connection.client.silent = True
    pending = defer.ensureDeferred(connection.bind(ALICE, "alice-pass"))
    clock.advance(5)
    failure = []
    pending.addErrback(failure.append)
    assert failure and failure[0].check(LDAPUnavailable)
    pool.release(connection)
    assert pool.idle_connections() == 0
    assert pool.states()[0].status == DOWN


def test_a_connection_with_an_answer_pending_is_never_kept():
    pool, connector, _ = make_pool()
    connection = run(pool.connect())
    connection.client.silent = True
    defer.ensureDeferred(connection.bind(ALICE, "alice-pass"))
    pool.release(connection)
    assert pool.idle_connections() == 0
    assert not connection.client.connected


def test_idle_connections_are_closed_after_idle_seconds():
    pool, connector, clock = make_pool()
    connection = run(pool.connect())
    pool.release(connection)
    clock.advance(IDLE_SECONDS - 1)
    assert pool.idle_connections() == 1
    clock.advance(IDLE_SECONDS / 2 + 1)
    assert pool.idle_connections() == 0
    assert connection.client.log == ["unbind", "close"]
    assert clock.getDelayedCalls() == []


def test_a_kept_connection_lost_meanwhile_is_replaced():
    pool, connector, _ = make_pool()
    connection = run(pool.connect())
    pool.release(connection)
    connection.client.connected = False  # the server closed it while it was idle
    assert run(pool.connect()) is not connection
    assert len(connector.opened) == 2


def test_a_kept_connection_lost_on_use_drops_the_others_but_does_not_mark_the_server_down():
    """A restarted server closed every kept connection: the login is retried on a new one (method.py)."""
    pool, connector, _ = make_pool()
    connections = [run(pool.connect()) for _ in range(3)]
    for connection in connections:
        pool.release(connection)
    lent = run(pool.connect())
    lent.client.send = lambda request: defer.fail(ConnectionError("reset by peer"))
    with pytest.raises(LDAPUnavailable) as raised:
        run(lent.bind(ALICE, "alice-pass"))
    assert raised.value.kind == "lost"
    assert pool.states()[0].status == UP
    assert pool.idle_connections() == 0


def test_a_server_marked_down_loses_its_kept_connections():
    pool, connector, clock = make_pool()
    kept = run(pool.connect())
    other = run(pool.connect())
    pool.release(kept)
    other.client.silent = True
    pending = defer.ensureDeferred(other.bind(ALICE, "alice-pass"))
    pending.addErrback(lambda failure: None)
    clock.advance(5)  # the timeout marks FIRST down
    assert pool.states()[0].status == DOWN
    assert not kept.client.connected
    assert pool.idle_connections() == 0


def test_stop_unbinds_and_closes_kept_connections():
    pool, connector, clock = make_pool()
    connections = [run(pool.connect()) for _ in range(3)]
    for connection in connections:
        pool.release(connection)
    pool.stop()
    assert [connection.client.log for connection in connections] == [["unbind", "close"]] * 3
    assert clock.getDelayedCalls() == []
    pool.release(run(pool.connect()))  # after stop nothing is kept
    assert pool.idle_connections() == 0


def test_searches_take_the_connection_bound_as_the_service_account_and_binds_take_another():
    """Two lanes: a kept connection bound as the service account serves searches; user BINDs get the others."""
    pool, connector, _ = make_pool()
    service, user = run(pool.connect()), run(pool.connect())
    run(service.bind(SERVICE, "service-pass"))
    run(user.bind(ALICE, "alice-pass"))
    pool.release(service)
    pool.release(user)  # the newest
    assert run(pool.connect(for_searches=True)) is service
    pool.release(service)
    assert run(pool.connect()) is user
    # With only the other kind kept, either takes it rather than opening a connection.
    assert run(pool.connect()) is service
    assert len(connector.opened) == 2


def test_only_a_started_pool_with_room_keeps_connections():
    """What the method asks before it splits a search login over two connections."""
    assert make_pool()[0].keeps_connections
    assert not make_pool(started=False)[0].keeps_connections
    assert not make_pool(keep=0)[0].keeps_connections


def test_answers_are_decoded_in_any_split_without_encoding_them_again(monkeypatch):
    """Two answers in one read, one answer over several reads; an answer is never re-encoded to be tested."""
    from ldaptor.protocols import pureber

    from sftpauth.auth.ldap.client import _LDAPProtocol

    handled = []
    client = _LDAPProtocol()
    client.handle = handled.append
    bind = pureldap.LDAPMessage(pureldap.LDAPBindResponse(resultCode=0), id=1).toWire()
    done = pureldap.LDAPMessage(pureldap.LDAPSearchResultDone(resultCode=0), id=2).toWire()
    monkeypatch.setattr(pureber.BERBase, "__len__", lambda self: pytest.fail("an answer was encoded again"))
    client.dataReceived(bind + done[:3])
    assert [message.id for message in handled] == [1]
    for byte in done[3:]:
        client.dataReceived(bytes([byte]))
    assert [message.id for message in handled] == [1, 2]
    client.dataReceived(bind)  # nothing of the earlier answers is left to spoil the next one
    assert [message.id for message in handled] == [1, 2, 1]
