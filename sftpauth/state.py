"""State shared by every service of a process, or by several nodes: used TOTP codes and bans.

A TOTP code that once let somebody in must be refused for the rest of its
validity, whichever service (FTP, SFTP, Web Manager) sees it again. The
methods only know the :class:`ReplayStore` interface: one atomic "claim this
key unless it is already claimed" with an expiry. The security policies
(``sftpauth.auth.policy``) only know the :class:`BanStore` interface: count
the consecutive failures of an address and ban it for a while.

``[server] state = memory`` keeps both in this process. ``state =
redis://HOST:PORT/DB`` keeps both in Redis, shared by every node using that
database: a claim is ``SET key 1 NX PX ttl``; a failure is one Lua script
(``INCR`` + ``PEXPIRE``, and the ban ``SET`` when the count is reached), so
nodes racing on one address count every failure and exactly one of them
starts the ban. Every key expires.

When Redis cannot answer (down, unreachable, slower than
:data:`REDIS_TIMEOUT`): TOTP logins fail closed (the claim fails, the login
is refused as ``service-unavailable``), while bans degrade to what this
node knows: the bans it saw in Redis and the failures it counts itself
until Redis answers again. Nothing blocks: an unreachable Redis is known as
such after the first failed connection attempt and answered at once; the
connection is retried in the background and a log line says when it is
lost and when it is back.
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
from typing import Any, Callable, Optional, Protocol
from urllib.parse import quote

import attrs
from twisted.internet import defer
from twisted.protocols import amp
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from sftpauth.config.models import host_port

_log = Logger()

DEFAULT_MAX_ENTRIES = 100_000


class ReplayStoreFull(Exception):
    """Every slot holds a claim that has not expired yet: refuse rather than forget one."""


class ReplayStore(Protocol):
    def claim(self, key: str, ttl: float) -> defer.Deferred:
        """Fire with True if ``key`` was free (it is now held for ``ttl`` seconds), False if already held.

        Atomic: of several concurrent claims of one key, exactly one gets
        True. May fail with :class:`ReplayStoreFull` (or a connection error
        for a remote store); callers then refuse the login.
        """


class MemoryReplayStore:
    """Claims in a dict, expired by the injected clock; at most ``max_entries`` live claims.

    Everything runs on the reactor thread, so check-and-set is atomic. When
    the store is full of live claims a new claim fails: forgetting a live
    one would let its code be replayed. Filling it takes ``max_entries``
    successful logins within one code's validity (about 90 seconds).
    """

    def __init__(self, clock: IReactorTime, max_entries: int = DEFAULT_MAX_ENTRIES):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self.max_entries = max_entries
        self._expiries: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        self._expire(self._clock.seconds())
        return len(self._expiries)

    def _expire(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expiry, key = heapq.heappop(self._heap)
            if self._expiries.get(key) == expiry:
                del self._expiries[key]

    def claim(self, key: str, ttl: float) -> defer.Deferred:
        if not ttl > 0:
            return defer.fail(ValueError(f"ttl must be positive, not {ttl!r}"))
        now = self._clock.seconds()
        self._expire(now)
        if key in self._expiries:
            return defer.succeed(False)
        if len(self._expiries) >= self.max_entries:
            _log.warn("the TOTP replay store is full ({count} live entries): refusing new claims", count=self.max_entries)
            return defer.fail(ReplayStoreFull(f"{self.max_entries} codes used within their validity"))
        expiry = now + ttl
        self._expiries[key] = expiry
        heapq.heappush(self._heap, (expiry, key))
        return defer.succeed(True)


@attrs.frozen
class SharedState:
    """What the services of one process share; built once by ``tap.build_runtime``."""

    replay: ReplayStore
    # Failure counters and bans of the security policies; None: nothing is banned.
    bans: Optional["BanStore"] = None
    description: str = "memory"  # for log lines: "memory" or the Redis URL
    # Started and stopped with the services (the Redis connection); None for memory.
    connection: Optional["RedisConnection"] = None


def build_state(state_setting: str, reactor: IReactorTime) -> SharedState:
    """The shared state named by ``[server] state`` (validated by the configuration loader)."""
    if state_setting == "memory":
        return SharedState(replay=MemoryReplayStore(reactor), bans=MemoryBanStore(reactor))
    location = parse_state_url(state_setting)
    connection = RedisConnection(location, reactor)
    return SharedState(
        replay=RedisReplayStore(connection),
        bans=RedisBanStore(connection, MemoryBanStore(reactor)),
        description=location.url,
        connection=connection,
    )


# -- bans -----------------------------------------------------------------------------------


@attrs.frozen
class FailureCount:
    """What recording one failed login of an address did."""

    count: int  # consecutive failures counted now (0: the address was already banned, nothing counted)
    banned_now: bool  # this failure started a ban: true for exactly one failure per ban, across nodes
    ban_left: float  # seconds the ban of the address still lasts (0.0: not banned)


class BanStore(Protocol):
    """Failure counters and bans, by policy (``scope``) and source address.

    A counter is forgotten ``interval`` seconds after its last failure; the
    failure that brings it to ``limit`` deletes it and bans the address for
    ``interval`` seconds. A ban is never extended by later failures.
    """

    def ban_left(self, scope: str, address: str) -> defer.Deferred:
        """Fire with the seconds the ban of ``address`` still lasts, 0.0 when it is not banned."""

    def add_failure(self, scope: str, address: str, limit: int, interval: float) -> defer.Deferred:
        """Count one failure (atomically); fire with a :class:`FailureCount`."""

    def reset(self, scope: str, address: str) -> defer.Deferred:
        """Forget the failures of ``address`` (a successful login)."""


class _ExpiringMap:
    """key -> value with an expiry each, on an injected clock; at most ``max_entries`` keys.

    When full, the key that would expire first is dropped: for failure
    counters and bans that is the least harmful one to forget.
    """

    def __init__(self, clock: IReactorTime, max_entries: int, what: str):
        self._clock = clock
        self._max = max_entries
        self._what = what
        self._entries: dict[Any, tuple[Any, float]] = {}
        self._heap: list[tuple[float, int, Any]] = []
        self._order = itertools.count()
        self.dropped = 0

    def __len__(self) -> int:
        self._expire(self._clock.seconds())
        return len(self._entries)

    def _expire(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expiry, _, key = heapq.heappop(self._heap)
            entry = self._entries.get(key)
            if entry is not None and entry[1] == expiry:
                del self._entries[key]

    def get(self, key: Any) -> Optional[tuple[Any, float]]:
        """(value, expiry) or None."""
        self._expire(self._clock.seconds())
        return self._entries.get(key)

    def set(self, key: Any, value: Any, expiry: float) -> None:
        self._expire(self._clock.seconds())
        if key not in self._entries and len(self._entries) >= self._max:
            self._drop_one()
        self._entries[key] = (value, expiry)
        heapq.heappush(self._heap, (expiry, next(self._order), key))
        if len(self._heap) > 2 * len(self._entries) + 1024:  # superseded expiries pile up
            self._heap = [(entry[1], next(self._order), k) for k, entry in self._entries.items()]
            heapq.heapify(self._heap)

    def pop(self, key: Any) -> None:
        self._entries.pop(key, None)

    def keys(self) -> Any:
        return self._entries.keys()

    def _drop_one(self) -> None:
        while self._heap:
            expiry, _, key = heapq.heappop(self._heap)
            entry = self._entries.get(key)
            if entry is not None and entry[1] == expiry:
                del self._entries[key]
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 10_000 == 0:
                    _log.warn(
                        "{what}: {max} entries reached, forgetting the ones closest to expiring ({count} so far)",
                        what=self._what,
                        max=self._max,
                        count=self.dropped,
                    )
                return


class MemoryBanStore:
    """Counters and bans of one process, expired by the injected clock; bounded in size.

    Everything runs on the reactor thread, so each operation is atomic.
    """

    def __init__(self, clock: IReactorTime, max_entries: int = DEFAULT_MAX_ENTRIES):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self._failures = _ExpiringMap(clock, max_entries, "failure counters of the security policies")
        self._bans = _ExpiringMap(clock, max_entries, "bans of the security policies")
        # Told (scope, address, seconds) when a failure counted here starts a ban: the worker processes learn it.
        self.ban_listeners: list[Callable[[str, str, float], None]] = []

    def live_bans(self) -> list[tuple[str, str, float]]:
        """(scope, address, seconds left) of every ban in force (for a worker process that just started)."""
        now = self._clock.seconds()
        found = ((key, self._bans.get(key)) for key in list(self._bans.keys()))
        return [(key[0], key[1], entry[1] - now) for key, entry in found if entry is not None and entry[1] > now]

    def seconds_left(self, scope: str, address: str) -> float:
        """The ban left, answered at once (what :class:`RedisBanStore` asks before Redis)."""
        entry = self._bans.get((scope, address))
        if entry is None:
            return 0.0
        return max(0.0, entry[1] - self._clock.seconds())

    def ban_left(self, scope: str, address: str) -> defer.Deferred:
        return defer.succeed(self.seconds_left(scope, address))

    def add_failure(self, scope: str, address: str, limit: int, interval: float) -> defer.Deferred:
        return defer.succeed(self.count_failure(scope, address, limit, interval))

    def count_failure(self, scope: str, address: str, limit: int, interval: float) -> FailureCount:
        if limit < 1 or not interval > 0:
            raise ValueError(f"limit must be at least 1 and interval positive, not {limit!r} and {interval!r}")
        left = self.seconds_left(scope, address)
        if left > 0:
            return FailureCount(0, False, left)
        key = (scope, address)
        now = self._clock.seconds()
        entry = self._failures.get(key)
        count = (entry[0] if entry is not None else 0) + 1
        if count >= limit:
            self._failures.pop(key)
            self._bans.set(key, True, now + interval)
            for listener in self.ban_listeners:
                try:
                    listener(scope, address, float(interval))
                except Exception:
                    _log.failure("telling the workers of a ban failed")
            return FailureCount(count, True, float(interval))
        self._failures.set(key, count, now + interval)
        return FailureCount(count, False, 0.0)

    def learn_ban(self, scope: str, address: str, seconds: float) -> None:
        """Remember a ban seen elsewhere (in Redis) until it ends; never shortens a known one."""
        if seconds > 0 and self.seconds_left(scope, address) < seconds:
            self._bans.set((scope, address), True, self._clock.seconds() + seconds)

    def reset(self, scope: str, address: str) -> defer.Deferred:
        self._failures.pop((scope, address))
        return defer.succeed(None)


# -- Redis ----------------------------------------------------------------------------------

REDIS_TIMEOUT = 2.0  # seconds for the first connection and for each answer
REDIS_RETRY_MAX = 5.0  # seconds at most between two connection attempts while Redis is away
_MAX_DOWN_REASONS = 8  # different reasons logged in one outage (a cause that changes: each once)
_READ_COMMANDS = frozenset({"PTTL", "GET", "PING", "EXISTS"})  # their success says nothing of writes
REDIS_POOL_SIZE = 2
KEY_PREFIX = "sftpauth:"
_REDIS_URL = re.compile(r"^redis://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(?P<port>\d{1,5}))?(?:/(?P<db>\d{1,5})?)?$")


class InvalidStateURL(ValueError):
    """``[server] state`` is neither ``memory`` nor a usable ``redis://`` URL; the message says why."""


@attrs.frozen
class RedisLocation:
    host: str
    port: int
    db: int

    @property
    def url(self) -> str:
        return f"redis://{host_port(self.host, self.port)}/{self.db}"


def parse_state_url(text: str) -> RedisLocation:
    """``redis://HOST[:PORT][/DB]`` (port 6379 and database 0 by default)."""
    match = _REDIS_URL.match(text.strip())
    if match is None:
        userinfo = re.match(r"^\s*redis://([^/@]*)@", text)
        if userinfo:  # never echo what may be a password
            shown = text.replace(userinfo.group(1), "***", 1)
            raise InvalidStateURL(f"{shown!r}: a user or password in the URL is not supported (sftpauth connects "
                                  "without Redis authentication); expected memory or redis://HOST:PORT/DB")
        if "?" in text:  # a query (?password=...) is never echoed either
            raise InvalidStateURL(f"{text.split('?', 1)[0] + '?***'!r}: options after '?' are not supported; "
                                  "expected memory or redis://HOST:PORT/DB")
        raise InvalidStateURL(f"{text!r} is not allowed; expected memory or redis://HOST:PORT/DB (e.g. redis://10.0.0.5:6379/0)")
    host = match.group("host").strip("[]")
    port = int(match.group("port") or 6379)
    db = int(match.group("db") or 0)
    if not 1 <= port <= 65535:
        raise InvalidStateURL(f"{text!r}: the port must be 1 to 65535")
    if db > 65535:
        raise InvalidStateURL(f"{text!r}: the database number is too large")
    return RedisLocation(host, port, db)


class FailureReports:
    """Log lines for failed calls to a remote state, at most one a minute per call and error kind."""

    def __init__(self, clock: IReactorTime, where: str):
        self._clock = clock
        self._where = where
        self._logged_at: dict[str, float] = {}

    def report(self, failure: Failure, what: str) -> None:
        kind = failure.type.__name__ if failure.type else "error"
        now = self._clock.seconds()
        if now - self._logged_at.get(what + kind, -math.inf) < 60:
            return
        self._logged_at[what + kind] = now
        _log.warn(
            "shared state {where}: {what} failed: {error}",
            where=self._where,
            what=what,
            error=f"{kind}: {failure.getErrorMessage()}"[:300],
        )


class RedisUnavailable(Exception):
    """Redis cannot answer now: no connection, or no answer within REDIS_TIMEOUT."""


class RedisConnection:
    """A small pool of connections to the Redis of ``[server] state``, reconnecting on its own.

    txredisapi does the protocol and the reconnecting (with a backoff of at
    most :data:`REDIS_RETRY_MAX` seconds). What is added here: a command is
    failed at once with :class:`RedisUnavailable` while no connection is up
    (txredisapi would queue it until Redis returns), the first commands wait
    at most :data:`REDIS_TIMEOUT` for the first connection, answers are
    awaited at most as long, and the log says when Redis is lost and back.

    ``refusing``: connected, but Redis answers the writes with an error
    (a read-only replica, out of memory, an ACL): the state is as unusable
    as with Redis down, and /health says so. The next write that succeeds
    makes it ``up`` again.
    """

    CONNECTING, UP, DOWN, REFUSING = "connecting", "up", "down", "refusing"

    def __init__(self, location: RedisLocation, reactor, timeout: float = REDIS_TIMEOUT, pool_size: int = REDIS_POOL_SIZE):
        self.location = location
        self._reactor = reactor
        self.timeout = timeout
        self._pool_size = pool_size
        self._factory = None
        self.status = self.CONNECTING
        self._waiting: list[defer.Deferred] = []
        self._next = itertools.count()
        self._reports = FailureReports(reactor, location.url)
        self._stopped = False
        self._down_reasons: set[str] = set()  # logged during this outage (each one once)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting (idempotent; the first command starts it too; never again after stop)."""
        if self._factory is not None or self._stopped:
            return
        import txredisapi  # imported here: it installs the global reactor on import
        from twisted.internet.endpoints import HostnameEndpoint

        owner = self

        class ObservedRedisFactory(txredisapi.RedisFactory):
            maxDelay = REDIS_RETRY_MAX

            def retryDelay(self, attempt: int) -> float:
                # txredisapi adds its jitter after the cap: up to 30 % more than documented (QA).
                return min(super().retryDelay(attempt), REDIS_RETRY_MAX)

            def stopTrying(self) -> defer.Deferred:
                # txredisapi gives up for good when Redis refuses SELECT (a wrong database
                # number), wants AUTH, or is not Redis. Such a Redis may be fixed while we
                # run: keep retrying, as for one that is down (stop() uses disconnect()).
                return defer.succeed(None)

            def connectionError(self, why: str) -> None:
                # Not txredisapi's: it fails a Deferred nobody waits on (an "Unhandled error" later).
                owner._went_down(why.removeprefix("Redis error: "))

            def addConnection(self, conn) -> None:
                super().addConnection(conn)
                if conn in self.pool:
                    owner._connected()

            def delConnection(self, conn) -> None:
                super().delConnection(conn)
                if not self.pool:
                    owner._lost("the connection was closed")

        self._factory = ObservedRedisFactory(
            self.location.url,
            self.location.db,
            self._pool_size,
            isLazy=False,  # a lazy factory has txredisapi log each refused retry; our one "down" line is enough
            charset="utf-8",
            replyTimeout=self.timeout,
            convertNumbers=False,
        )
        endpoint = _ObservedEndpoint(
            HostnameEndpoint(self._reactor, self.location.host, self.location.port, timeout=self.timeout),
            self._connect_failed,
            f"Redis {self.location.url}",
        )
        self._factory.startConnecting(endpoint)

    def stop(self) -> defer.Deferred:
        """Close the connections and stop reconnecting; fires when they are closed."""
        factory, self._factory = self._factory, None
        self._stopped = True
        self.status = self.DOWN
        self._fail_waiting("sftpauth is stopping")
        if factory is None:
            return defer.succeed(None)
        return factory.disconnect().addErrback(lambda failure: None)

    # -- up and down --------------------------------------------------------------------

    def _connected(self) -> None:
        if self.status == self.DOWN:
            _log.info("shared state {url}: Redis answers again; TOTP replay checks and bans are shared again", url=self.location.url)
        elif self.status == self.CONNECTING:
            _log.info("shared state {url}: connected to Redis", url=self.location.url)
        if self.status != self.REFUSING:  # another connection of the pool changes nothing to what Redis answers
            self.status = self.UP
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if not waiter.called:
                waiter.callback(None)

    def _lost(self, why: str) -> None:
        if self._factory is None or self.status == self.DOWN:
            return  # stopping; or down already, and a closed retry says nothing the log has not
        self._went_down(why)

    def _connect_failed(self, failure: Failure) -> None:
        if self._factory is None or (self._factory.pool and self.status == self.UP):
            return
        self._went_down(f"cannot connect: {failure.getErrorMessage()}")

    def _went_down(self, why: str) -> None:
        if self.status != self.DOWN:
            self._down_reasons = {why}
            _log.warn(
                "shared state {url}: Redis is unreachable ({why}): TOTP logins are refused and bans are counted "
                "by this node alone until it answers again (reconnecting every {retry:.0f}s at most)",
                url=self.location.url,
                why=why,
                retry=REDIS_RETRY_MAX,
            )
        elif why not in self._down_reasons and len(self._down_reasons) < _MAX_DOWN_REASONS:
            # The cause changed while down (Redis is back, but now wants a password): say the new one, once.
            self._down_reasons.add(why)
            _log.warn("shared state {url}: Redis is still unreachable, now: {why}", url=self.location.url, why=why)
        self.status = self.DOWN
        self._fail_waiting(why)

    def _fail_waiting(self, why: str) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if not waiter.called:
                waiter.errback(RedisUnavailable(f"{self.location.url}: {why}"))

    def report(self, failure: Failure, what: str) -> None:
        """Log a failed command, at most once a minute per kind of error (floods stay readable).

        Refused because Redis is known to be down: not logged, the line saying it went down
        is enough.
        """
        if failure.check(RedisUnavailable) and self.status == self.DOWN:
            return
        self._reports.report(failure, what)

    # -- commands -----------------------------------------------------------------------

    def execute(self, *command: Any) -> defer.Deferred:
        """Run one Redis command; fails with RedisUnavailable (or txredisapi's errors), never hangs."""
        self.start()
        if self.status in (self.UP, self.REFUSING):
            return self._run(command)
        if self.status == self.DOWN or self._stopped:
            return defer.fail(RedisUnavailable(f"{self.location.url}: not connected"))
        waiter = defer.Deferred()
        self._waiting.append(waiter)
        timer = self._reactor.callLater(self.timeout, self._give_up, waiter)
        waiter.addBoth(_cancel_timer, timer)
        return waiter.addCallback(lambda ignored: self._run(command))

    def _give_up(self, waiter: defer.Deferred) -> None:
        if waiter in self._waiting:
            self._waiting.remove(waiter)
        if not waiter.called:
            waiter.errback(RedisUnavailable(f"{self.location.url}: no connection within {self.timeout:g}s"))

    def _run(self, command: tuple) -> defer.Deferred:
        factory = self._factory
        live = [conn for conn in (factory.pool if factory is not None else ()) if conn.connected]
        if not live:
            return defer.fail(RedisUnavailable(f"{self.location.url}: not connected"))
        conn = live[next(self._next) % len(live)]
        try:
            deferred = conn.execute_command(*command)
        except Exception:
            return defer.fail()
        writes = str(command[0]).upper() not in _READ_COMMANDS
        return deferred.addCallbacks(self._answered, self._no_answer, callbackArgs=(writes,), errbackArgs=(writes,))

    def _answered(self, result: Any, writes: bool) -> Any:
        if writes and self.status == self.REFUSING:
            self.status = self.UP
            _log.info("shared state {url}: Redis accepts writes again; TOTP replay checks and bans are shared again",
                      url=self.location.url)
        return result

    def _no_answer(self, failure: Failure, writes: bool = True) -> Failure:
        """A command with no answer within the timeout: Redis is down for every command, not this one."""
        import txredisapi

        if failure.check(txredisapi.TimeoutError) and self._factory is not None:  # not while stopping
            # Only this connection is closed (by txredisapi): without this the next
            # command would wait the whole timeout again on the other one.
            self._went_down(f"no answer within {self.timeout:g}s")
        elif failure.check(txredisapi.ResponseError) and self.status == self.UP:
            # READONLY (a replica), OOM (maxmemory), NOPERM (an ACL): answered, but refused. A read is
            # refused only if Redis refuses everything; either way the state cannot be used.
            self.status = self.REFUSING
            _log.warn(
                "shared state {url}: Redis refuses commands ({why}): TOTP logins are refused and bans are counted "
                "by this node alone until it accepts them again",
                url=self.location.url,
                why=failure.getErrorMessage(),
            )
        return failure


def _cancel_timer(result: Any, timer) -> Any:
    if timer.active():
        timer.cancel()
    return result


class _ObservedEndpoint:
    """A client endpoint that reports failed connection attempts (txredisapi retries them silently)."""

    def __init__(self, endpoint, on_failure: Callable[[Failure], None], name: str = "Redis"):
        self._endpoint = endpoint
        self._on_failure = on_failure
        self._name = name

    def __repr__(self) -> str:  # ClientService logs its retries with it
        return f"<{self._name}>"

    def connect(self, protocol_factory) -> defer.Deferred:
        def failed(failure: Failure) -> Failure:
            if not failure.check(defer.CancelledError):
                self._on_failure(failure)
            return failure

        return self._endpoint.connect(protocol_factory).addErrback(failed)


def redis_key(kind: str, *parts: str) -> str:
    """``sftpauth:KIND:PART:...``, each part quoted so that no two key tuples give one key."""
    return KEY_PREFIX + kind + "".join(":" + quote(part, safe="") for part in parts)


class RedisReplayStore:
    """Used TOTP codes in Redis: ``SET key 1 NX PX ttl``. Fails (and the login with it) when Redis cannot answer."""

    def __init__(self, connection: RedisConnection):
        self._connection = connection

    def claim(self, key: str, ttl: float) -> defer.Deferred:
        if not ttl > 0:
            return defer.fail(ValueError(f"ttl must be positive, not {ttl!r}"))
        milliseconds = max(1, math.ceil(ttl * 1000))
        deferred = self._connection.execute("SET", redis_key("replay", key), "1", "PX", milliseconds, "NX")

        def failed(failure: Failure) -> Failure:
            self._connection.report(failure, "a TOTP replay claim")
            return failure

        return deferred.addCallbacks(lambda reply: reply == "OK", failed)


# KEYS: the failure counter, the ban. ARGV: limit, interval in ms.
# Returns {count, banned now (0/1), ban left in ms}. One script: atomic across nodes.
_COUNT_FAILURE = """
local left = redis.call('PTTL', KEYS[2])
if left > 0 then
  return {0, 0, left}
end
local count = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if count >= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
  return {count, 1, tonumber(ARGV[2])}
end
return {count, 0, 0}
"""


class RedisBanStore:
    """Counters and bans in Redis, shared by every node; this node's own view when Redis cannot answer.

    ``local`` remembers every ban seen in Redis until it ends, so a banned
    address that keeps connecting costs no Redis round trip, and it counts
    the failures while Redis is away (bans degrade to per-node bans).
    """

    def __init__(self, connection: RedisConnection, local: MemoryBanStore):
        self._connection = connection
        self.local = local

    def ban_left(self, scope: str, address: str) -> defer.Deferred:
        known = self.local.seconds_left(scope, address)
        if known > 0:
            return defer.succeed(known)

        def answered(milliseconds: Any) -> float:
            seconds = int(milliseconds) / 1000 if isinstance(milliseconds, int) and milliseconds > 0 else 0.0
            self.local.learn_ban(scope, address, seconds)
            return seconds

        def failed(failure: Failure) -> float:
            self._connection.report(failure, "a ban check")
            return 0.0  # this node knows of no ban (checked above)

        return self._connection.execute("PTTL", redis_key("ban", scope, address)).addCallbacks(answered, failed)

    def add_failure(self, scope: str, address: str, limit: int, interval: float) -> defer.Deferred:
        if limit < 1 or not interval > 0:
            return defer.fail(ValueError(f"limit must be at least 1 and interval positive, not {limit!r} and {interval!r}"))
        keys = (redis_key("failures", scope, address), redis_key("ban", scope, address))
        deferred = self._connection.execute("EVAL", _COUNT_FAILURE, 2, *keys, limit, max(1, math.ceil(interval * 1000)))

        def answered(reply: Any) -> FailureCount:
            count, banned_now, left = (int(value) for value in reply)
            result = FailureCount(count, bool(banned_now), left / 1000 if left > 0 else 0.0)
            self.local.learn_ban(scope, address, result.ban_left)
            return result

        def failed(failure: Failure) -> FailureCount:
            self._connection.report(failure, "counting a failed login")
            return self.local.count_failure(scope, address, limit, interval)

        return deferred.addCallbacks(answered, failed)

    def reset(self, scope: str, address: str) -> defer.Deferred:
        self.local.reset(scope, address)

        def failed(failure: Failure) -> None:
            self._connection.report(failure, "resetting a failure counter")

        return self._connection.execute("DEL", redis_key("failures", scope, address)).addCallbacks(lambda reply: None, failed)


# -- worker processes ([server] workers > 1): the parent's memory, over the parent channel ---

CHANNEL_TIMEOUT = 2.0  # seconds a worker waits for the parent to answer a claim or a failure count


class ChannelUnavailable(Exception):
    """The parent process cannot answer now: the channel is closed, or no answer within CHANNEL_TIMEOUT."""


class Claim(amp.Command):
    """Worker -> parent: claim a TOTP replay key (:meth:`ReplayStore.claim`)."""

    arguments = [(b"key", amp.Unicode()), (b"ttl", amp.Float())]
    response = [(b"claimed", amp.Boolean())]
    errors = {ReplayStoreFull: b"REPLAY_STORE_FULL"}


class AddFailure(amp.Command):
    """Worker -> parent: count one failed login (:meth:`BanStore.add_failure`)."""

    arguments = [(b"scope", amp.Unicode()), (b"address", amp.Unicode()), (b"limit", amp.Integer()), (b"interval", amp.Float())]
    response = [(b"count", amp.Integer()), (b"banned_now", amp.Boolean()), (b"ban_left", amp.Float())]


class ResetFailures(amp.Command):
    """Worker -> parent: a successful login forgets the failures of its address; no answer awaited."""

    arguments = [(b"scope", amp.Unicode()), (b"address", amp.Unicode())]
    requiresAnswer = False


class BanStarted(amp.Command):
    """Parent -> every worker: an address is banned for ``seconds`` (each worker then refuses it on its own)."""

    arguments = [(b"scope", amp.Unicode()), (b"address", amp.Unicode()), (b"seconds", amp.Float())]
    requiresAnswer = False


class StateServer(amp.CommandLocator):
    """The parent's side: answers the workers from the parent's own memory stores.

    Mixed into the parent's AMP protocol of each worker; ``shared_state`` is
    the parent's :class:`SharedState` (memory), which its own services (the
    Web Manager) use too, so a code used on FTP is refused by the manager.
    """

    shared_state: SharedState

    @Claim.responder
    def _claim(self, key: str, ttl: float) -> defer.Deferred:
        return self.shared_state.replay.claim(key, ttl).addCallback(lambda claimed: {"claimed": claimed})

    @AddFailure.responder
    def _add_failure(self, scope: str, address: str, limit: int, interval: float) -> defer.Deferred:
        counting = self.shared_state.bans.add_failure(scope, address, limit, interval)
        return counting.addCallback(attrs.asdict)

    @ResetFailures.responder
    def _reset(self, scope: str, address: str) -> dict:
        self.shared_state.bans.reset(scope, address)
        return {}


class StateChannel:
    """A worker's end of the parent channel, as the stores below use it: the live AMP connection or none."""

    def __init__(self, clock: IReactorTime, timeout: float = CHANNEL_TIMEOUT):
        self._clock = clock
        self.timeout = timeout
        self.protocol: Optional[amp.AMP] = None  # set while the channel is open
        self._reports = FailureReports(clock, "(the parent process)")

    def call(self, command: type, **arguments: Any) -> defer.Deferred:
        """Ask the parent; fails with ChannelUnavailable when it is gone or does not answer in time."""
        if self.protocol is None:
            return defer.fail(ChannelUnavailable("the parent process is not connected"))
        deferred = self.protocol.callRemote(command, **arguments)
        if not command.requiresAnswer:
            return defer.succeed(None)

        def timed_out(failure: Failure) -> Failure:
            failure.trap(defer.TimeoutError)
            return Failure(ChannelUnavailable(f"the parent process did not answer within {self.timeout:g}s"))

        return deferred.addTimeout(self.timeout, self._clock).addErrback(timed_out)

    def report(self, failure: Failure, what: str) -> None:
        """Log a failed call, at most once a minute per kind of error (floods stay readable)."""
        self._reports.report(failure, what)


class ChannelReplayStore:
    """Used TOTP codes kept by the parent: one round trip per claim; fails closed when the parent cannot answer."""

    def __init__(self, channel: StateChannel):
        self._channel = channel

    def claim(self, key: str, ttl: float) -> defer.Deferred:
        if not ttl > 0:
            return defer.fail(ValueError(f"ttl must be positive, not {ttl!r}"))

        def failed(failure: Failure) -> Failure:
            if not failure.check(ReplayStoreFull):
                self._channel.report(failure, "a TOTP replay claim")
            return failure

        return self._channel.call(Claim, key=key, ttl=float(ttl)).addCallbacks(lambda answer: answer["claimed"], failed)


class ChannelBanStore:
    """Counters and bans kept by the parent; bans answered from what the parent told this worker.

    Checking a ban costs no round trip: the parent tells every worker each
    ban it starts (:class:`BanStarted`, and every ban in force when a worker
    connects), kept in ``local`` until it ends. Counting a failure is one
    round trip, so failures spread over the workers add up and exactly one
    of them starts the ban. When the parent cannot answer, the failures are
    counted by this worker alone, as with Redis down.
    """

    def __init__(self, channel: StateChannel, local: MemoryBanStore):
        self._channel = channel
        self.local = local

    def ban_left(self, scope: str, address: str) -> defer.Deferred:
        return self.local.ban_left(scope, address)

    def add_failure(self, scope: str, address: str, limit: int, interval: float) -> defer.Deferred:
        if limit < 1 or not interval > 0:
            return defer.fail(ValueError(f"limit must be at least 1 and interval positive, not {limit!r} and {interval!r}"))

        def answered(reply: dict) -> FailureCount:
            result = FailureCount(reply["count"], reply["banned_now"], reply["ban_left"])
            self.local.learn_ban(scope, address, result.ban_left)
            return result

        def failed(failure: Failure) -> FailureCount:
            self._channel.report(failure, "counting a failed login")
            return self.local.count_failure(scope, address, limit, interval)

        deferred = self._channel.call(AddFailure, scope=scope, address=address, limit=limit, interval=float(interval))
        return deferred.addCallbacks(answered, failed)

    def reset(self, scope: str, address: str) -> defer.Deferred:
        self.local.reset(scope, address)
        return self._channel.call(ResetFailures, scope=scope, address=address).addErrback(lambda failure: None)


class StateClient(amp.CommandLocator):
    """The worker's side: learns the bans the parent announces. Mixed into the worker's AMP protocol."""

    channel_bans: Optional[ChannelBanStore] = None

    @BanStarted.responder
    def _ban_started(self, scope: str, address: str, seconds: float) -> dict:
        if self.channel_bans is not None:
            self.channel_bans.local.learn_ban(scope, address, seconds)
        return {}


def channel_state(channel: StateChannel, reactor: IReactorTime, workers: int) -> SharedState:
    """A worker's SharedState when ``[server] state = memory``: the parent's memory, over ``channel``."""
    return SharedState(
        replay=ChannelReplayStore(channel),
        bans=ChannelBanStore(channel, MemoryBanStore(reactor)),
        description=f"memory of the parent process, shared by its {workers} workers",
    )
