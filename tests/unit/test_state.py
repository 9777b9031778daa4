"""The shared state of a process: the TOTP replay store, its expiry and its bound."""

from __future__ import annotations

import textwrap

import pytest
from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock
from twisted.python.threadpool import ThreadPool

from sftpauth.config.loader import parse_configuration
from sftpauth.state import MemoryReplayStore, ReplayStoreFull, SharedState, build_state


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
