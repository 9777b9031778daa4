"""Security policies: source filters, bans after failed logins, denied usernames.

One :class:`SecurityPolicy` per ``[security-policies/ID]`` (the implicit
``DEFAULT-SECURITY-POLICY`` included); every service names the one it uses
(``security_policy``) and services sharing a policy share its bans. The
policy acts at two places:

* when a connection is accepted (``sftpauth.listening``):
  :meth:`SecurityPolicy.check_connection` refuses an address outside
  ``source_ip_filter`` or banned, before the service's protocol sees it;
* around every login (``sftpauth.auth.chain``):
  :meth:`SecurityPolicy.check_before_login` refuses a filtered or banned
  address and a denied username before any authentication method runs (no
  LDAP traffic), and :meth:`SecurityPolicy.record` counts the outcome.

``source_ip_ban_after_count`` consecutive failures of one address ban it
for ``source_ip_ban_interval`` seconds; a success from the address resets
its count, and a count is forgotten ``source_ip_ban_interval`` seconds after
its last failure. ``0`` never bans. Failures that are the server's fault
(:data:`NOT_COUNTED`) never count. The counters and bans live in the shared
state (:mod:`sftpauth.state`): this process, or Redis for several nodes.

A flood of logins from one address cannot slow the others down: at most
:data:`MAX_LOGINS_IN_PROGRESS` logins of one address run at once in a
process (:class:`LoginSlots`), the next ones wait their turn, and past
:data:`MAX_LOGINS_WAITING` waiting ones an attempt is refused at once. The
refusals a flood earns (``banned``, ``too-many-logins``) are answered
:data:`FLOOD_REFUSAL_DELAY` late, so a client keeping its connections open
after its ban cannot make the server answer (and audit) a thousand
attempts a second.

Audit events: ``ban`` when a ban starts (on the node whose failure started
it), ``ban-ended`` when it ends (same node), ``connection`` for refused
connections (at most one per service, address and reason every
:data:`REFUSAL_AUDIT_INTERVAL` seconds, with the number of repeats), and the
chain's ``authentication`` events with reasons ``banned``,
``source-filtered``, ``denied-username``, ``denied-administrator`` and
``too-many-logins``.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
from typing import Any, Callable, Mapping, Optional

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from sftpauth.audit import AuditLog
from sftpauth.auth.credentials import LoginRequest, directory_form
from sftpauth.auth.errors import LoginFailed
from sftpauth.config.models import DEFAULT_SECURITY_POLICY, Configuration, SecurityPolicySettings, address_in
from sftpauth.state import BanStore, FailureCount

_log = Logger()

# Failures that say nothing about the client: they never count towards a ban.
# too-many-logins: a login refused before it ran says nothing about its credentials (a batch host
# opening a hundred sessions at once must not ban itself).
NOT_COUNTED = frozenset(
    {"banned", "source-filtered", "service-unavailable", "internal-error", "home-folder-missing", "too-many-logins"}
)
REFUSAL_AUDIT_INTERVAL = 60.0  # seconds between two audited refusals of one address on one service
# Fairness: logins of one source address that run at once in this process, and that may wait for
# their turn; a flood from one address then holds at most this many threads (password hashing,
# LDAP binds) and other addresses do not queue behind it. A waiting login costs a Deferred beside
# the connection it already holds, so the queue is long: a batch host or a NAT gateway opening a
# few hundred sessions at once is served in turn, not refused.
MAX_LOGINS_IN_PROGRESS = 2
MAX_LOGINS_WAITING = 1000
_MAX_REFUSALS_TRACKED = 10_000
MAX_MATCHED_USERNAME = 256  # longer usernames are refused by the chain's input check anyway
MAX_BAN_END_TIMERS = 100_000  # pending ban-ended events per policy; past it, ends are not audited
# A refusal caused by the flood itself is answered this many seconds late: a client that keeps its
# connections open and goes on sending logins after its ban gets one answer a second per connection.
FLOOD_REFUSAL_DELAY = 1.0
SLOWED_DOWN = frozenset({"banned", "too-many-logins"})
# A failed FTP or SSH login is answered this long after the attempt started (vsftpd's delay_failed_login,
# conch's passwordDelay): a guesser gets one try a second per connection.
FAILED_LOGIN_DELAY = 1.0


def answer_failure(clock: IReactorTime, started: float, failure: Failure) -> defer.Deferred:
    """``failure``, :data:`FAILED_LOGIN_DELAY` seconds after the attempt ``started`` (at once when it took longer).

    Counted from the attempt's start, not from its failure, so every failure
    is answered at the same moment: an unknown username (no password hashed)
    cannot be told from a wrong password by the time of the answer, and a
    refusal the chain already held back (:data:`SLOWED_DOWN`) is not held
    back twice.
    """
    remaining = started + FAILED_LOGIN_DELAY - clock.seconds()
    if remaining <= 0:
        return defer.fail(failure)
    return task.deferLater(clock, remaining, lambda: failure)


def normalise_address(host: Any) -> str:
    """The address bans and filters use: ``::ffff:1.2.3.4`` as ``1.2.3.4``, no zone; "" when not an IP."""
    if not isinstance(host, str) or not host:
        return ""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return ""
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def plain_address(host: str) -> str:
    """A peer as every log and audit line writes it: :func:`normalise_address`, or ``host`` unchanged when not an IP.

    An IPv4 client of a service on ``::`` is then ``127.0.0.1`` on FTP, SSH
    and the Web Manager alike, as in its ban events.
    """
    return normalise_address(host) or host


IPV6_CLIENT_PREFIX = 64  # an IPv6 client is its /64: a site or subscriber gets at least that many addresses


def client_key(address: str) -> str:
    """Who a normalised address counts as for bans, connection limits and login slots.

    An IPv4 address is itself. An IPv6 address is its /64
    (``2001:db8:0:1::/64``): a client holding a /64 could otherwise make
    every attempt from an address of its own, and never be banned or
    limited. IPv4 behind one NAT shares one address the same way.
    """
    if ":" not in address:
        return address
    return str(ipaddress.IPv6Network(f"{address}/{IPV6_CLIENT_PREFIX}", strict=False))


def _username_forms(username: str) -> tuple[str, ...]:
    """The username as typed and as a directory compares it (NFKC, spaces collapsed, invisible characters dropped).

    LDAP matching rules ignore case, leading/trailing and repeated spaces, so
    ``" root"`` must not get past a ``root`` rule; and LDAP string
    preparation (RFC 4518 §2.2) maps format characters such as U+200B and
    U+00AD to nothing, so neither must ``r<U+200B>oot``.
    """
    folded = directory_form(username)
    printable = "".join(char for char in folded if char == " " or char.isprintable())
    return tuple(dict.fromkeys((username, folded, printable)))


class RepeatThrottle:
    """At most one event per key (service, address, reason) every ``interval`` seconds
    (:data:`REFUSAL_AUDIT_INTERVAL` by default).

    A flood of refusals from one address then writes one event a minute,
    with how many were not written since, instead of one per attempt. At
    most :data:`_MAX_REFUSALS_TRACKED` keys are remembered. The listening
    sockets throttle their log lines with it too.

    ``summarise(key, repeats)``, when given, is called once the interval
    after the last written event is over for a key that counted repeats
    since: the last ones of a flood are told even when nothing follows them.
    One timer serves every key.
    """

    def __init__(self, clock: IReactorTime, interval: float = REFUSAL_AUDIT_INTERVAL,
                 summarise: Optional[Callable[[Any, int], None]] = None):
        self._clock = clock
        self._interval = interval
        self._summarise = summarise
        self._sweep: Optional[IDelayedCall] = None
        self._seen: dict[Any, list[float]] = {}  # key -> [time of the last written one, repeats since]

    def due(self, key: Any) -> Optional[int]:
        """None: written less than the interval ago (this one is counted); else the repeats not written since."""
        now = self._clock.seconds()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._interval:
            seen[1] += 1
            if self._summarise is not None and self._sweep is None:
                self._sweep = self._clock.callLater(seen[0] + self._interval - now, self._summarise_repeats)
            return None
        if len(self._seen) >= _MAX_REFUSALS_TRACKED:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._interval}
            if len(self._seen) >= _MAX_REFUSALS_TRACKED:
                self._seen.clear()
        self._seen[key] = [now, 0]
        return int(seen[1]) if seen is not None else 0

    def _summarise_repeats(self, all_now: bool = False) -> None:
        """Summarise each key whose interval is over (``all_now``: each) with repeats counted; a summary counts as
        written then."""
        self._sweep = None
        now = self._clock.seconds()
        next_in: Optional[float] = None
        for key, seen in list(self._seen.items()):
            if not seen[1]:
                continue
            left = seen[0] + self._interval - now
            if left > 0 and not all_now:
                next_in = left if next_in is None else min(next_in, left)
                continue
            repeats = int(seen[1])
            seen[0], seen[1] = now, 0
            try:
                self._summarise(key, repeats)
            except Exception:
                _log.failure("summarising {repeats} repeats of {key!r} failed", repeats=repeats, key=key)
        if next_in is not None:
            self._sweep = self._clock.callLater(next_in, self._summarise_repeats)

    def stop(self) -> None:
        """The process is stopping: summarise the repeats counted so far, now."""
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        if self._summarise is not None:
            self._summarise_repeats(all_now=True)
            self._summarise = None


class SecurityPolicy:
    """One ``[security-policies/ID]``: what it refuses, and its ban counters in the shared state."""

    def __init__(self, settings: SecurityPolicySettings, bans: Optional[BanStore], audit: AuditLog, clock: IReactorTime):
        self.settings = settings
        self._bans = bans
        self._audit = audit
        self._clock = clock
        self._ban_timers: dict[str, Any] = {}
        # Refused connections audited, by (service, address, reason); the last of a flood in a summary.
        self._refusals = RepeatThrottle(clock, summarise=self._refusals_not_audited)
        self._held: dict[str, int] = {}  # client (client_key) -> open connections, with maximum_connections_per_address

    @property
    def id(self) -> str:
        return self.settings.id

    @property
    def bans_enabled(self) -> bool:
        return self._bans is not None and self.settings.source_ip_ban_after_count > 0

    # -- addresses ----------------------------------------------------------------------

    def source_allowed(self, address: str) -> bool:
        """True when ``source_ip_filter`` is empty or holds ``address`` (a normalised address)."""
        networks = self.settings.source_ip_filter
        return not networks or address_in(address, networks)

    def ban_left(self, address: str) -> defer.Deferred:
        """Seconds the ban of ``address`` still lasts (0.0: not banned); never fails."""
        if not self.bans_enabled or not address:
            return defer.succeed(0.0)
        try:
            deferred = self._bans.ban_left(self.id, address)
        except Exception:
            deferred = defer.fail()

        def failed(failure: Failure) -> float:
            _log.failure("security policy {policy}: cannot check the ban of {address}", failure, policy=self.id, address=address)
            return 0.0

        return deferred.addErrback(failed)

    def check_connection(self, service_id: str, host: str) -> defer.Deferred:
        """Fire with None to accept a connection from ``host``, or the refusal reason (audited)."""
        address = normalise_address(host)
        if not address and not (host and self.settings.source_ip_filter):
            return defer.succeed(None)  # not an IP connection: nothing to filter or ban
        if not self.source_allowed(address):
            self._connection_refused(service_id, address or host, "source-filtered")
            return defer.succeed("source-filtered")

        def decided(left: float) -> Optional[str]:
            if left > 0:
                self._connection_refused(service_id, address, "banned")
                return "banned"
            return None

        return self.ban_left(client_key(address)).addCallback(decided)

    def hold_connection(self, service_id: str, host: str) -> Optional[str]:
        """Count an admitted connection of ``host`` against ``maximum_connections_per_address``.

        Returns the client (:func:`client_key`) to :meth:`release_connection` when the
        connection closes; "" when nothing was counted (no limit, or not an
        IP connection); None when the address already holds the maximum: the
        connection is refused, audited as ``too-many-connections``. Counted
        in this process only, as ``maximum_concurrent_connections``.
        """
        limit = self.settings.maximum_connections_per_address
        address = normalise_address(host) if limit else ""
        if not address:
            return ""
        client = client_key(address)
        held = self._held.get(client, 0)
        if held >= limit:
            self._connection_refused(service_id, address, "too-many-connections")
            return None
        self._held[client] = held + 1
        return client

    def release_connection(self, client: str) -> None:
        """A connection :meth:`hold_connection` counted has closed (``client``: what it returned)."""
        held = self._held.pop(client, 0) - 1
        if held > 0:
            self._held[client] = held

    def connection_refused(self, service_id: str, host: str, reason: str, **fields: str) -> None:
        """A service refused what a client at ``host`` asked (FTPS's TLS policy): audited as the refusals here.

        ``fields`` (``username``, ``detail``) are added to the event when not empty.
        """
        self._connection_refused(service_id, normalise_address(host), reason, **fields)

    def _connection_refused(self, service_id: str, address: str, reason: str, **fields: str) -> None:
        repeats = self._refusals.due((service_id, address, reason))
        if repeats is not None:
            self._audit_refusal(service_id, address, reason, repeats, **{name: value for name, value in fields.items() if value})

    def _refusals_not_audited(self, key: tuple[str, str, str], repeats: int) -> None:
        """The refusals counted since the last event, once its minute is over and none was written to tell them."""
        self._audit_refusal(*key, repeats, summary=True)  # no refusal of its own: it stands for the repeats only

    def _audit_refusal(self, service_id: str, address: str, reason: str, repeats: int, **fields: Any) -> None:
        # repeats: refusals of this address on this service not audited since the last event
        self._audit.record(
            "connection", service=service_id, peer=address, outcome="refused", reason=reason, policy=self.id,
            repeats=repeats, **fields,
        )

    # -- logins -------------------------------------------------------------------------

    async def check_before_login(self, request: LoginRequest) -> None:
        """Raise :class:`LoginFailed` for a filtered or banned source or a denied username."""
        address = normalise_address(request.peer)
        if request.peer and not self.source_allowed(address):
            raise LoginFailed(
                "source-filtered", f"{address or request.peer!r} is not in source_ip_filter of [security-policies/{self.id}]"
            )
        if address:
            client = client_key(address)
            left = await self.ban_left(client)
            if left > 0:
                who = address if client == address else f"{address} ({client})"
                raise LoginFailed(
                    "banned", f"{who} is banned by [security-policies/{self.id}] for {math.ceil(left)} more seconds"
                )
        denied = self.denied_username(request.username, request.manager)
        if denied is not None:
            raise denied

    def denied_username(self, username: str, manager: bool) -> Optional[LoginFailed]:
        """The refusal when ``username`` matches deny_usernames (deny_administrators for the Web Manager)."""
        if not username or len(username) > MAX_MATCHED_USERNAME:
            return None  # the chain's input check refuses it
        if manager:
            option, reason, expressions = "deny_administrators", "denied-administrator", self.settings.deny_administrators
        else:
            option, reason, expressions = "deny_usernames", "denied-username", self.settings.deny_usernames
        forms = _username_forms(username)
        for expression in expressions:
            if expression.first_match(forms) is not None:
                return LoginFailed(reason, f"the username matches {expression.text!r} of {option} in [security-policies/{self.id}]")
        return None

    async def record(self, request: LoginRequest, outcome: str, reason: str = "") -> None:
        """Count a login's outcome for its source address; never raises.

        A success resets the count without waiting for the store; a failure
        is counted before the client gets its answer, so the next attempt
        already meets the ban.
        """
        address = client_key(normalise_address(request.peer))
        if not address or not self.bans_enabled:
            return
        try:
            if outcome == "success":
                self._bans.reset(self.id, address).addErrback(
                    lambda failure: _log.failure("security policy {policy}: cannot reset a counter", failure, policy=self.id)
                )
                return
            if reason in NOT_COUNTED:
                return
            settings = self.settings
            counted: FailureCount = await self._bans.add_failure(
                self.id, address, settings.source_ip_ban_after_count, settings.source_ip_ban_interval
            )
        except Exception:
            _log.failure("security policy {policy}: cannot count a failed login of {address}", policy=self.id, address=address)
            return
        if counted.banned_now:
            self._banned(request, address, counted)

    def slow_down(self, reason: str) -> defer.Deferred:
        """Fires FLOOD_REFUSAL_DELAY seconds later for a ``banned`` or ``too-many-logins`` refusal, at once otherwise."""
        if reason not in SLOWED_DOWN:
            return defer.succeed(None)
        return task.deferLater(self._clock, FLOOD_REFUSAL_DELAY, lambda: None)

    def _banned(self, request: LoginRequest, address: str, counted: FailureCount) -> None:
        until = datetime.datetime.fromtimestamp(self._clock.seconds() + counted.ban_left, datetime.timezone.utc)
        self._audit.record(
            "ban",
            policy=self.id,
            peer=address,
            service=request.service_id,
            protocol=request.protocol,
            username=request.username,
            failures=counted.count,
            interval=self.settings.source_ip_ban_interval,
            until=until.isoformat(timespec="seconds"),
        )
        _log.warn(
            "security policy {policy}: {address} is banned for {seconds}s after {count} consecutive failed logins",
            policy=self.id,
            address=address,
            seconds=self.settings.source_ip_ban_interval,
            count=counted.count,
        )
        previous = self._ban_timers.pop(address, None)
        if previous is not None and previous.active():
            previous.cancel()
        if len(self._ban_timers) >= MAX_BAN_END_TIMERS:
            _log.warn("security policy {policy}: too many bans at once, the end of this one is not audited", policy=self.id)
            return
        self._ban_timers[address] = self._clock.callLater(counted.ban_left, self._ban_ended, address)

    def _ban_ended(self, address: str) -> None:
        self._ban_timers.pop(address, None)
        self._audit.record("ban-ended", policy=self.id, peer=address)
        _log.info("security policy {policy}: the ban of {address} ended", policy=self.id, address=address)

    def stop(self) -> None:
        """The process is stopping: forget the pending ban-end events; audit the refusals not audited yet."""
        timers, self._ban_timers = self._ban_timers, {}
        for timer in timers.values():
            if timer.active():
                timer.cancel()
        self._refusals.stop()


class LoginSlots:
    """At most ``in_progress`` logins of one source address run at once; ``waiting`` more wait in order.

    Per process, whatever the service or policy: it protects this process's
    threads and CPU. One more waiting login is refused (``too-many-logins``,
    not counted towards a ban: it never ran).
    """

    def __init__(self, in_progress: int = MAX_LOGINS_IN_PROGRESS, waiting: int = MAX_LOGINS_WAITING):
        self._in_progress = in_progress
        self._waiting = waiting
        self._by_address: dict[str, defer.DeferredSemaphore] = {}

    def __len__(self) -> int:
        return len(self._by_address)

    def acquire(self, host: str) -> defer.Deferred:
        """Fire with a function that gives the slot back (call it exactly once)."""
        address = client_key(normalise_address(host))
        if not address:
            return defer.succeed(lambda: None)
        semaphore = self._by_address.get(address)
        if semaphore is None:
            semaphore = self._by_address[address] = defer.DeferredSemaphore(self._in_progress)
        if len(semaphore.waiting) >= self._waiting:
            return defer.fail(
                LoginFailed(
                    "too-many-logins",
                    f"{address} already has {self._in_progress} logins in progress and {self._waiting} waiting",
                )
            )
        released = []

        def release() -> None:
            if released:
                return
            released.append(True)
            semaphore.release()
            if semaphore.tokens == semaphore.limit and not semaphore.waiting:
                self._by_address.pop(address, None)

        return semaphore.acquire().addCallback(lambda ignored: release)


class SecurityPolicies:
    """Every policy of a configuration, built once and shared by the chain and the listening sockets."""

    def __init__(self, configuration: Configuration, bans: Optional[BanStore], audit: AuditLog, clock: IReactorTime):
        self._configuration = configuration
        settings = dict(configuration.security_policies)
        if DEFAULT_SECURITY_POLICY not in settings:  # a Configuration built by hand (tests)
            settings[DEFAULT_SECURITY_POLICY] = SecurityPolicySettings(DEFAULT_SECURITY_POLICY, "", 5, 3600, (), (), ())
        self.by_id: Mapping[str, SecurityPolicy] = {
            policy_id: SecurityPolicy(policy, bans, audit, clock) for policy_id, policy in settings.items()
        }
        self.slots = LoginSlots()

    def login_slot(self, host: str) -> defer.Deferred:
        """Wait for a turn of ``host`` (see :class:`LoginSlots`); fires with the function releasing it."""
        return self.slots.acquire(host)

    def for_service(self, service_id: str) -> SecurityPolicy:
        """The policy of ``service_id``; DEFAULT-SECURITY-POLICY for logins of no service (test-login)."""
        service = self._configuration.services.get(service_id)
        policy_id = service.security_policy if service is not None else DEFAULT_SECURITY_POLICY
        return self.by_id.get(policy_id) or self.by_id[DEFAULT_SECURITY_POLICY]

    def stop(self) -> None:
        for policy in self.by_id.values():
            policy.stop()
