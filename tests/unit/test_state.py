"""The shared state of a process: the TOTP replay store, its expiry and its bound."""

from __future__ import annotations

import textwrap
import types
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from sftpauth.config.loader import parse_configuration
from sftpauth.state import (
    REDIS_RETRY_MAX,
    MemoryReplayStore,
    RedisConnection,
    ReplayStoreFull,
    SharedState,
    build_state,
    parse_state_url,
)


def claimed(store, key, ttl, result_of):
    return result_of(store.claim(key, ttl))


@pytest.fixture
def clock():
    return task.Clock()


def test_first_claim_wins_and_later_ones_lose(clock, result_of):
    """claim() is set-if-absent: True once, then False while the key lives."""
    store = MemoryReplayStore(clock)
    assert claimed(store, "k", 90, result_of) is True
    assert [claimed(store, "k", 90, result_of) for _ in range(5)] == [False] * 5


def test_keys_are_independent(clock, result_of):
    """Claiming one key does not claim another."""
    store = MemoryReplayStore(clock)
    assert claimed(store, "a", 90, result_of) and claimed(store, "b", 90, result_of)


def test_claims_expire_with_the_clock(clock, result_of):
    """A key can be claimed again once its ttl has passed, not before."""
    store = MemoryReplayStore(clock)
    claimed(store, "k", 90, result_of)
    clock.advance(89.9)
    assert claimed(store, "k", 90, result_of) is False
    clock.advance(0.1)
    assert claimed(store, "k", 90, result_of) is True


def test_expired_claims_free_their_memory(clock, result_of):
    """Expired entries are dropped, so the store only holds live claims."""
    store = MemoryReplayStore(clock)
    for number in range(100):
        claimed(store, f"k{number}", 10 + number % 3, result_of)
    assert len(store) == 100
    clock.advance(10.5)  # the 34 claims of 10 s are gone
    assert len(store) == 66
    clock.advance(1)  # and the 33 of 11 s
    assert len(store) == 33
    clock.advance(0.5)
    assert len(store) == 0
    assert store._heap == [] and store._expiries == {}


def test_store_is_bounded_and_refuses_when_full_of_live_claims(clock, result_of):
    """At max_entries live claims a new claim fails instead of forgetting one (which would allow a replay)."""
    store = MemoryReplayStore(clock, max_entries=3)
    for key in "abc":
        claimed(store, key, 60, result_of)
    with pytest.raises(ReplayStoreFull):
        claimed(store, "d", 60, result_of)
    assert claimed(store, "a", 60, result_of) is False  # held claims still answer
    clock.advance(60)
    assert claimed(store, "d", 60, result_of) is True
    assert len(store) == 1


@pytest.mark.parametrize("ttl", [0, -1, float("nan")])
def test_ttl_must_be_positive(clock, result_of, ttl):
    """A zero, negative or NaN ttl is a programming error."""
    with pytest.raises(ValueError):
        claimed(MemoryReplayStore(clock), "k", ttl, result_of)


def test_max_entries_must_be_positive(clock):
    """A store that can hold nothing is refused."""
    with pytest.raises(ValueError):
        MemoryReplayStore(clock, max_entries=0)


def test_build_state_memory_uses_the_reactor_clock(clock, result_of):
    """[server] state = memory gives an in-memory replay store on the reactor's clock."""
    state = build_state("memory", clock)
    assert isinstance(state, SharedState) and isinstance(state.replay, MemoryReplayStore)
    claimed(state.replay, "k", 5, result_of)
    clock.advance(5)
    assert claimed(state.replay, "k", 5, result_of) is True


class _Reactor(MemoryReactorClock):
    def __init__(self):
        super().__init__()
        self.pool = ThreadPool()

    def suggestThreadPoolSize(self, size):
        pass

    def getThreadPool(self):
        return self.pool


def test_build_runtime_shares_one_state_between_ldap_methods(tmp_path):
    """tap.build_runtime builds the state once and every LDAP method gets that same state."""
    from sftpauth.tap import build_runtime

    text = textwrap.dedent(
        """
        [server]
        authentications = first, second

        [authentications/first]
        type = ldap
        address = 127.0.0.1
        bind_dn = ou=people,dc=example,dc=com
        extension_entry_point = python:sftpauth.ldap.totp.AugmentedTOTP
        extension_configuration = {"mfa_attribute": "totpSharedSecret"}
        service_account_dn = cn=sftpauth,dc=example,dc=com
        service_account_password = x

        [authentications/second]
        type = ldap
        address = 127.0.0.1
        bind_dn = ou=people,dc=example,dc=com
        """
    )
    configuration = parse_configuration(text, str(tmp_path / "a.ini"), str(tmp_path), {})
    runtime = build_runtime(configuration, _Reactor())
    methods = runtime.chain._methods
    assert methods["first"].extensions.state is runtime.state
    assert methods["second"].extensions.state is runtime.state
    runtime.audit.close()


def test_a_state_url_with_a_password_is_refused_without_showing_the_password():
    from sftpauth.state import InvalidStateURL, parse_state_url

    with pytest.raises(InvalidStateURL) as refused:
        parse_state_url("redis://:s3cretRedisPW@127.0.0.1:6380/0")
    assert "s3cretRedisPW" not in str(refused.value)
    assert "'redis://***@127.0.0.1:6380/0'" in str(refused.value) and "not supported" in str(refused.value)


class _AnsweringConnection:
    """A txredisapi connection of the pool whose answers the test sets: a value, or an error reply."""

    connected = True

    def __init__(self):
        self.answer: Any = "OK"
        self.commands: list[tuple] = []

    def execute_command(self, *command):
        self.commands.append(command)
        return defer.fail(self.answer) if isinstance(self.answer, Exception) else defer.succeed(self.answer)


def _connected_redis(clock) -> tuple[RedisConnection, _AnsweringConnection]:
    connection = RedisConnection(parse_state_url("redis://127.0.0.1:6379/0"), clock)
    answering = _AnsweringConnection()
    connection._factory = types.SimpleNamespace(pool=[answering])  # as start() would, once connected
    connection.status = connection.UP
    return connection, answering


def test_a_redis_that_refuses_writes_is_refusing_until_a_write_succeeds(clock, log_lines):
    """QA: READONLY (a replica) or OOM answers left the connection "up": /health said ok while TOTP logins failed.

    An error reply makes it ``refusing`` (logged once); a read that succeeds
    changes nothing (a replica answers reads); a write that succeeds makes it ``up`` again.
    """
    import txredisapi

    connection, answering = _connected_redis(clock)
    answering.answer = txredisapi.ResponseError("READONLY You can't write against a read only replica.")
    for _ in range(3):
        connection.execute("SET", "k", "1", "PX", 1000, "NX").addErrback(lambda failure: None)
    assert connection.status == connection.REFUSING
    answering.answer = 5000
    connection.execute("PTTL", "k")
    assert connection.status == connection.REFUSING
    answering.answer = "OK"
    connection.execute("SET", "k", "1", "PX", 1000, "NX")
    assert connection.status == connection.UP
    assert len(answering.commands) == 5  # refusing: commands still go to Redis, to see it recover
    lines = [line for line in log_lines if line.startswith("shared state")]
    assert lines == [
        "shared state redis://127.0.0.1:6379/0: Redis refuses commands (READONLY You can't write against a read only "
        "replica.): TOTP logins are refused and bans are counted by this node alone until it accepts them again",
        "shared state redis://127.0.0.1:6379/0: Redis accepts writes again; TOTP replay checks and bans are shared again",
    ]


def test_a_new_reason_while_redis_is_down_is_logged_once(clock, log_lines):
    """QA: the first reason stayed the only one logged: "connection refused" while Redis ran and wanted a password."""
    connection, _ = _connected_redis(clock)
    connection._lost("the connection was closed")
    connection._connect_failed(Failure(ConnectionRefusedError("Connection refused")))
    for _ in range(3):
        connection._went_down("could not set dbid=0: NOAUTH Authentication required.")
        connection._lost("the connection was closed")  # each refused retry closes: nothing new to say
    lines = [line for line in log_lines if line.startswith("shared state")]
    assert len(lines) == 3, lines
    assert "Redis is unreachable (the connection was closed)" in lines[0]
    assert lines[1] == "shared state redis://127.0.0.1:6379/0: Redis is still unreachable, now: cannot connect: Connection refused"
    assert lines[2].endswith("now: could not set dbid=0: NOAUTH Authentication required.")


def test_the_reconnection_delay_never_passes_the_documented_maximum():
    """QA: txredisapi adds its jitter after the cap: 5.9-6.5 s between attempts where 5 s at most is documented."""
    connection = RedisConnection(parse_state_url("redis://127.0.0.1:6379/0"), MemoryReactorClock())
    connection.start()
    delays = [connection._factory.retryDelay(attempt) for attempt in range(1, 40) for _ in range(50)]
    assert max(delays) <= REDIS_RETRY_MAX
    assert max(delays) > REDIS_RETRY_MAX * 0.9  # still backing off up to it
    connection.stop()
