"""``[server] workers``: the option, and the parent channel that keeps bans and TOTP claims shared."""

from __future__ import annotations

import functools
import json
import textwrap
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.test import iosim

from sftpauth.audit import AuditLog
from sftpauth.auth.ldap.client import DOWN, UNKNOWN, UP, LDAPServerPool, LDAPUnavailable, ServerAddress
from sftpauth.cli import main
from sftpauth.config import checks
from sftpauth.config.errors import ConfigError
from sftpauth.config.loader import parse_configuration
from sftpauth.state import (
    CHANNEL_TIMEOUT,
    ChannelBanStore,
    ChannelUnavailable,
    FailureCount,
    MemoryBanStore,
    MemoryReplayStore,
    ReplayStoreFull,
    SharedState,
    StateChannel,
    channel_state,
)
from sftpauth.tls import load_server_certificate
from sftpauth.workers.channel import (
    AUDIT_BATCH_SECONDS,
    CERTIFICATE_PART_BYTES,
    MAX_AUDIT_BYTES,
    ParentSide,
    WorkerAuditLog,
    WorkerSide,
)
from sftpauth.tap import Options, makeService
from sftpauth.workers.pool import (
    MAX_RESTART_DELAY,
    SharedListeningSocket,
    WorkerPool,
    cpu_for_worker,
    describe_exit,
    restart_delay,
    worker_cpus,
)
from sftpauth.workers.worker import keep_to_cpu
from log_capture import captured_logs

BASE = "/etc/sftpauth"


def server_section(workers: str) -> str:
    return f"[server]\nworkers = {workers}\n"


def load(text: str):
    return parse_configuration(text, f"{BASE}/sftpauth.ini", BASE, {})


# -- the option -------------------------------------------------------------------------------


def test_workers_defaults_to_one():
    """Without the option sftpauth is the single process it always was."""
    assert load("[server]\n").server.workers == 1


def test_workers_takes_a_number():
    """workers = 4 asks for four worker processes."""
    assert load(server_section("4")).server.workers == 4


def test_workers_auto_is_one_per_available_core(monkeypatch):
    """workers = auto counts the cores this process may run on (its affinity), not all of the machine's."""
    monkeypatch.setattr(checks.os, "sched_getaffinity", lambda pid: {0, 1, 5})
    assert load(server_section("auto")).server.workers == 3
    assert load(server_section("AUTO")).server.workers == 3


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "0 is out of range; allowed: 1 to 256, or auto (one per core)"),
        ("lots", "'lots' is not a whole number; allowed: 1 to 256, or auto (one per core)"),
        ("257", "257 is out of range; allowed: 1 to 256, or auto (one per core)"),
    ],
)
def test_a_bad_workers_value_names_file_line_section_and_option(value, message):
    """A bad value is reported like any other option's: file, line, [server], workers and what is allowed."""
    with pytest.raises(ConfigError) as caught:
        load("# comment\n" + server_section(value))
    [problem] = caught.value.problems
    assert (problem.path, problem.line, problem.section, problem.option) == (f"{BASE}/sftpauth.ini", 3, "server", "workers")
    assert problem.message == message


def test_check_config_accepts_two_and_auto_and_refuses_zero(tmp_path, capsys):
    """sftpauth check-config: workers = 2 and auto are valid (the summary says how many), 0 is an error with its line."""
    config = tmp_path / "sftpauth.ini"
    config.write_text(server_section("2"))
    assert main(["check-config", str(config)]) == 0
    assert "workers: 2 processes share the FTP/FTPS/SFTP sockets" in capsys.readouterr().out
    config.write_text(server_section("auto"))
    assert main(["check-config", str(config)]) == 0
    capsys.readouterr()
    config.write_text(server_section("0"))
    assert main(["check-config", str(config)]) == 1
    assert f"{config}:2 [server] workers: 0 is out of range" in capsys.readouterr().err


def test_check_config_says_when_auto_gives_a_single_process(tmp_path, capsys, monkeypatch):
    """On one allowed CPU, workers = auto is one process: the summary says so rather than nothing."""
    monkeypatch.setattr(checks, "available_cores", lambda: 1)
    config = tmp_path / "sftpauth.ini"
    config.write_text(server_section("auto"))
    assert main(["check-config", str(config)]) == 0
    assert "workers: 1, a single process serves everything (CPUs available: 1)" in capsys.readouterr().out


def test_check_config_says_which_cpus_the_workers_keep_to(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checks.os, "sched_getaffinity", lambda pid: {2, 3})
    config = tmp_path / "sftpauth.ini"
    config.write_text(server_section("2"))
    assert main(["check-config", str(config)]) == 0
    assert "workers: 2 processes share the FTP/FTPS/SFTP sockets, each kept on one of CPUs 2,3\n" in capsys.readouterr().out
    config.write_text(server_section("2") + "worker_cpu_affinity = no\n")
    assert main(["check-config", str(config)]) == 0
    assert "workers: 2 processes share the FTP/FTPS/SFTP sockets\n" in capsys.readouterr().out


def test_worker_cpu_affinity_is_auto_unless_no_and_names_a_bad_value():
    """Workers keep to one core each unless worker_cpu_affinity = no; another word is an error with its line."""
    assert load("[server]\n").server.worker_cpu_affinity == "auto"
    assert load("[server]\nworkers = 2\nworker_cpu_affinity = no\n").server.worker_cpu_affinity == "no"
    # QA, session 18: the words yes/no options take for "no" were refused here; any case, as for choices
    for word in ("off", "False", "0", "NO"):
        assert load(f"[server]\nworkers = 2\nworker_cpu_affinity = {word}\n").server.worker_cpu_affinity == "no"
    assert load("[server]\nworkers = 2\nworker_cpu_affinity = Auto\n").server.worker_cpu_affinity == "auto"
    with pytest.raises(ConfigError) as caught:
        load("[server]\nworkers = 2\nworker_cpu_affinity = sometimes\n")
    [problem] = caught.value.problems
    assert (problem.path, problem.line, problem.section, problem.option) == (
        f"{BASE}/sftpauth.ini", 3, "server", "worker_cpu_affinity")


@pytest.mark.parametrize(
    ("affinity", "allowed", "expected"),
    [
        ("auto", (5, 1, 3), (1, 3, 5)),  # the CPUs this process may use (a cpuset), in order
        ("auto", (2,), ()),  # one CPU: nothing to choose, the workers are not pinned
        ("no", (0, 1), ()),
    ],
)
def test_worker_cpus_are_the_allowed_ones_when_auto(affinity, allowed, expected):
    assert worker_cpus(affinity, allowed) == expected


def test_workers_are_spread_over_the_cpus_round_robin():
    """Worker N keeps to the Nth CPU; with more workers than CPUs they share them in turn."""
    assert [cpu_for_worker(index, (1, 3)) for index in range(1, 6)] == [1, 3, 1, 3, 1]
    assert cpu_for_worker(1, ()) is None


def test_a_worker_keeps_to_its_cpu_or_logs_why_it_cannot():
    """The whole process (pid 0: itself) is put on the CPU; a refusal is a warning, not a stop."""
    calls = []
    assert keep_to_cpu(1, 2, lambda pid, cpus: calls.append((pid, cpus))) is True
    assert calls == [(0, {1})]

    def refuse(pid, cpus):
        raise OSError(22, "Invalid argument")

    with capturedLogs() as events:
        assert keep_to_cpu(7, 2, refuse) is False
    [event] = events
    assert event["log_level"] is LogLevel.warn
    assert formatEvent(event) == "worker 2: cannot keep to CPU 7 ([Errno 22] Invalid argument); it runs on any CPU"


# -- the parent channel: claims and bans across workers ------------------------------------------


class Parent:
    """The parent's memory state and audit log, and one channel per connected worker."""

    def __init__(self, clock: task.Clock, tmp_path=None, ldap_pools=None):
        self.clock = clock
        self.ldap_pools = ldap_pools or {}
        self.bans = MemoryBanStore(clock)
        self.state = SharedState(replay=MemoryReplayStore(clock), bans=self.bans)
        self.audit = AuditLog(str(tmp_path / "audit.jsonl") if tmp_path else "")
        self.seen: list[dict] = []
        self.audit.listeners.append(self.seen.append)
        self.sides: list[ParentSide] = []
        self.bans.ban_listeners.append(lambda *ban: [side.announce_ban(*ban) for side in self.sides])
        self.ready = 0
        self.lost = 0

    def connect_worker(self, index: int):
        """A worker's state and audit log, connected to this parent through an in-memory AMP pair."""
        channel = StateChannel(self.clock)
        state = channel_state(channel, self.clock, 2)
        audit = WorkerAuditLog(index, channel, self.clock)
        side = ParentSide(self.state, self.audit, self._ready, self._lost, self.ldap_pools)
        self.sides.append(side)
        worker_side = WorkerSide(channel, state.bans, lambda: None)
        _, _, pump = iosim.connectedServerAndClient(lambda: side, lambda: worker_side)
        return Worker(state, audit, channel, pump)

    def _ready(self) -> None:
        self.ready += 1

    def _lost(self) -> None:
        self.lost += 1


class Worker:
    def __init__(self, state: SharedState, audit: WorkerAuditLog, channel: StateChannel, pump):
        self.state = state
        self.audit = audit
        self.channel = channel
        self.pump = pump

    def answer(self, deferred: defer.Deferred, *others: "Worker"):
        """Pump this worker's channel (and the others') until ``deferred`` has fired; its result."""
        results = []
        deferred.addBoth(results.append)
        for _ in range(10):
            if results:
                break
            self.pump.flush()
            for other in others:
                other.pump.flush()
        assert results, "the parent never answered"
        if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]


@pytest.fixture
def clock():
    return task.Clock()


def test_two_workers_claiming_one_code_only_one_wins(clock):
    """Claims of one key from two workers, sent before either is answered: exactly one is True."""
    parent = Parent(clock)
    first, second = parent.connect_worker(1), parent.connect_worker(2)
    claims = [first.state.replay.claim("code", 90), second.state.replay.claim("code", 90), first.state.replay.claim("code", 90)]
    answers = [first.answer(claims[0], second), second.answer(claims[1], first), first.answer(claims[2], second)]
    assert sorted(answers) == [False, False, True]


def test_a_claim_held_by_the_parent_is_refused_to_a_worker(clock):
    """The parent's own claims (a Web Manager login) and the workers' are one store."""
    parent = Parent(clock)
    worker = parent.connect_worker(1)
    parent.state.replay.claim("code", 90)
    assert worker.answer(worker.state.replay.claim("code", 90)) is False


def test_a_full_replay_store_refuses_the_claim_on_the_worker_too(clock):
    """ReplayStoreFull crosses the channel as itself: the login is refused, not accepted."""
    parent = Parent(clock)
    parent.state = SharedState(replay=MemoryReplayStore(clock, max_entries=1), bans=parent.bans)
    worker = parent.connect_worker(1)
    assert worker.answer(worker.state.replay.claim("a", 90)) is True
    with pytest.raises(ReplayStoreFull):
        worker.answer(worker.state.replay.claim("b", 90))


def test_failures_on_two_workers_add_up_to_one_ban_that_both_enforce(clock):
    """Failures alternating over two workers are counted together; exactly one starts the ban; both then refuse the address."""
    parent = Parent(clock)
    first, second = parent.connect_worker(1), parent.connect_worker(2)
    counts = []
    for number in range(4):
        worker = (first, second)[number % 2]
        other = (second, first)[number % 2]
        counts.append(worker.answer(worker.state.bans.add_failure("policy", "10.0.0.9", 4, 60), other))
    for worker in (first, second):
        worker.pump.flush()
    assert [count.count for count in counts] == [1, 2, 3, 4]
    assert [count.banned_now for count in counts] == [False, False, False, True]
    # Both know the ban without asking the parent: ban_left answers at once.
    for worker in (first, second):
        assert worker.state.bans.ban_left("policy", "10.0.0.9").result == pytest.approx(60)
    assert first.state.bans.ban_left("policy", "10.0.0.1").result == 0.0


def test_a_success_on_one_worker_resets_failures_counted_on_the_other(clock):
    """reset() from one worker forgets the failures the other counted (the next failure counts 1)."""
    parent = Parent(clock)
    first, second = parent.connect_worker(1), parent.connect_worker(2)
    for _ in range(2):
        first.answer(first.state.bans.add_failure("policy", "10.0.0.9", 4, 60))
    second.state.bans.reset("policy", "10.0.0.9")
    second.pump.flush()
    assert first.answer(first.state.bans.add_failure("policy", "10.0.0.9", 4, 60)) == FailureCount(1, False, 0.0)


def test_a_worker_that_connects_later_learns_the_bans_in_force(clock):
    """live_bans() lists what a (re)started worker must be told: the bans still in force, with their time left."""
    parent = Parent(clock)
    parent.bans.count_failure("policy", "10.0.0.9", 1, 60)
    clock.advance(20)
    parent.bans.count_failure("policy", "10.0.0.8", 1, 10)
    clock.advance(15)
    assert parent.bans.live_bans() == [("policy", "10.0.0.9", pytest.approx(25))]
    worker = parent.connect_worker(1)
    parent.sides[-1].announce_ban("policy", "10.0.0.9", 25)
    worker.pump.flush()
    assert worker.state.bans.ban_left("policy", "10.0.0.9").result == pytest.approx(25)


def test_without_the_parent_claims_fail_closed_and_failures_are_counted_locally(clock):
    """Channel down: a TOTP claim fails (the login is refused); failures still ban, per worker."""
    channel = StateChannel(clock)
    state = channel_state(channel, clock, 2)
    failures = []
    state.replay.claim("code", 90).addErrback(failures.append)
    assert failures and failures[0].check(ChannelUnavailable)
    counted = [state.bans.add_failure("policy", "10.0.0.9", 2, 60).result for _ in range(2)]
    assert counted[-1].banned_now and state.bans.ban_left("policy", "10.0.0.9").result == 60


def test_a_parent_that_does_not_answer_fails_the_claim_after_the_timeout(clock):
    """A claim waits at most CHANNEL_TIMEOUT seconds for the parent, then fails closed."""
    channel = StateChannel(clock)
    state = channel_state(channel, clock, 2)
    silent = WorkerSide(channel, state.bans, lambda: None)
    silent.makeConnection(iosim.FakeTransport(silent, isServer=False))  # nobody reads the other end
    outcome = []
    state.replay.claim("code", 90).addBoth(outcome.append)
    clock.advance(CHANNEL_TIMEOUT - 0.1)
    assert outcome == []
    clock.advance(0.2)
    assert outcome[0].check(ChannelUnavailable)


def test_bad_arguments_fail_before_the_channel(clock, result_of):
    """A non-positive ttl or limit is refused by the worker's stores as by the memory stores."""
    state = channel_state(StateChannel(clock), clock, 2)
    with pytest.raises(ValueError):
        result_of(state.replay.claim("k", 0))
    with pytest.raises(ValueError):
        result_of(state.bans.add_failure("p", "a", 0, 60))


def test_channel_bans_store_is_what_workers_use_with_memory_state():
    """channel_state() gives the worker the channel stores and says where the state lives."""
    clock = task.Clock()
    state = channel_state(StateChannel(clock), clock, 3)
    assert isinstance(state.bans, ChannelBanStore)
    assert state.description == "memory of the parent process, shared by its 3 workers"


# -- the audit log ------------------------------------------------------------------------------


def test_worker_audit_events_carry_the_worker_and_are_written_by_the_parent(clock, tmp_path):
    """A worker's event reaches the parent's file and listeners once, with its own time and ``worker``.

    A quiet worker's event goes at the end of the reactor turn; later ones 50 ms after the last message.
    """
    parent = Parent(clock, tmp_path)
    worker = parent.connect_worker(2)
    recorded = worker.audit.record("authentication", service="sftp", username="al\udcffice", outcome="success")
    worker.pump.flush()
    assert parent.seen == []  # not inside the reactor turn that recorded it ...
    clock.advance(0)
    worker.pump.flush()
    assert [event["event"] for event in parent.seen] == ["authentication"]  # ... at its end: the worker was quiet
    clock.advance(AUDIT_BATCH_SECONDS / 2)
    worker.audit.record("session-start", service="sftp")
    worker.audit.record("session-end", service="sftp")
    clock.advance(AUDIT_BATCH_SECONDS / 4)
    worker.pump.flush()
    assert len(parent.seen) == 1  # batched: 50 ms after the last message, not sooner
    clock.advance(AUDIT_BATCH_SECONDS / 4)
    worker.pump.flush()
    assert [event["event"] for event in parent.seen] == ["authentication", "session-start", "session-end"]
    line = (tmp_path / "audit.jsonl").read_text(encoding="utf-8").splitlines()[0]
    written = json.loads(line)
    assert written == parent.seen[0]
    assert written["worker"] == 2 and written["time"] == recorded["time"] and written["event"] == "authentication"
    # An undecodable byte is written as the single process writes it (audit.readable).
    assert written["username"] == "al\\xffice"


def test_a_clock_set_back_delays_a_batch_no_more_than_the_batch_time(clock, tmp_path):
    """The system clock set back an hour after a message: the next event still leaves within 50 ms."""
    parent = Parent(clock, tmp_path)
    worker = parent.connect_worker(1)
    worker.audit.record("session-start", service="ftp")
    clock.advance(0)
    worker.pump.flush()
    clock.rightNow -= 3600
    worker.audit.record("session-end", service="ftp")
    clock.advance(AUDIT_BATCH_SECONDS)
    worker.pump.flush()
    assert [event["event"] for event in parent.seen] == ["session-start", "session-end"]


@pytest.mark.parametrize("character", ["x", "\u00e9", "\u20ac"])  # 1, 2 and 3 bytes in UTF-8
def test_events_of_one_batch_go_in_few_messages_in_order(clock, tmp_path, character):
    """A busy worker batches: many events recorded together reach the parent in order, split under the AMP limit.

    The limit is in bytes: lines of non-ASCII text are counted as UTF-8 (as
    characters, a batch of them would exceed AMP's 65,535 bytes and be lost).
    """
    parent = Parent(clock, tmp_path)
    worker = parent.connect_worker(1)
    sent = []
    original = worker.channel.protocol.callRemote
    worker.channel.protocol.callRemote = lambda command, **kw: (sent.append(kw["entries"]), original(command, **kw))[1]
    for number in range(300):
        worker.audit.record("session-end", service="ftp", detail=character * 200, number=number)
    clock.advance(AUDIT_BATCH_SECONDS)
    worker.pump.flush()
    assert 1 < len(sent) < 10 and sum(len(batch) for batch in sent) == 300
    assert all(sum(len(line.encode("utf-8")) + 2 for line in batch) <= MAX_AUDIT_BYTES for batch in sent)
    assert [event["number"] for event in parent.seen] == list(range(300))
    lines = (tmp_path / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["number"] for line in lines] == list(range(300))
    assert character * 200 in lines[0]  # UTF-8 text, as the single process writes it, not \u escapes


def test_sessions_a_dead_worker_left_open_are_ended_by_the_parent(clock, tmp_path):
    """The parent counts each worker's session-start and session-end; what is still open when it dies is ended for it."""
    parent = Parent(clock, tmp_path)
    worker = parent.connect_worker(2)
    for username in ("alice", "alice", "bob", "carol"):
        worker.audit.record("session-start", service="ftp", protocol="ftp", peer="127.0.0.9", username=username)
    worker.audit.record("session-end", service="ftp", protocol="ftp", peer="127.0.0.9", username="alice")
    worker.audit.record("session-end", service="ftp", protocol="ftp", peer="127.0.0.9", username="carol")
    clock.advance(AUDIT_BATCH_SECONDS)
    worker.pump.flush()
    assert parent.sides[0].end_open_sessions(2, "was killed by signal 9") == 2
    ended = [event for event in parent.seen if event.get("reason") == "worker-exited"]
    assert [(event["event"], event["username"], event["worker"]) for event in ended] == [
        ("session-end", "alice", 2), ("session-end", "bob", 2)]
    assert all(event["detail"] == "worker 2 was killed by signal 9" and event["service"] == "ftp" for event in ended)
    assert parent.sides[0].end_open_sessions(2, "exited with status 0") == 0  # each is ended once


def test_worker_audit_without_a_channel_goes_to_the_log(clock):
    """With the parent gone an event is not lost silently: it is logged (and reaches the parent's log)."""
    with captured_logs() as logged:
        audit = WorkerAuditLog(1, StateChannel(clock), clock)
        audit.record("session-end", service="ftp")
        audit.flush()
        audit.record("session-end", groups=["x" * 1000] * 70)  # lists are not shortened
    formats = [event.get("log_format", "") for event in logged]
    assert any("the parent process is gone" in text for text in formats)
    assert any("too long to send" in text for text in formats)


def test_ready_and_lost_reach_the_parent(clock):
    """The parent hears when a worker is ready and when its channel closes."""
    from sftpauth.workers.channel import Ready

    parent = Parent(clock)
    worker = parent.connect_worker(1)
    worker.channel.protocol.callRemote(Ready)
    worker.pump.flush()
    assert parent.ready == 1
    worker.channel.protocol.transport.loseConnection()
    worker.pump.flush()
    assert parent.lost == 1 and worker.channel.protocol is None


def test_ldap_server_states_a_worker_finds_reach_the_parents_pool(clock):
    """A worker's pool going down and up is the parent's: /health and the dashboard read the parent's pools."""
    first, second = ServerAddress("dc1.example.com", 389), ServerAddress("::1", 636)

    def pool():
        return LDAPServerPool((first, second), clock, 5, retry_interval=30, name="ldap")

    parent_pool = pool()
    parent = Parent(clock, ldap_pools={"ldap": parent_pool})
    worker = parent.connect_worker(1)
    worker_pool = pool()
    worker_pool.state_listeners.append(functools.partial(worker.channel.protocol.report_server_state, "ldap"))

    worker_pool._mark_down(second, LDAPUnavailable("[::1]:636: connection refused"))
    worker.pump.flush()
    state = parent_pool.states()[1]
    assert (state.status, state.last_error) == (DOWN, "[::1]:636: connection refused")
    worker_pool._mark_up(second, 0.004, "probe")
    worker.pump.flush()
    assert [(state.status, state.latency) for state in parent_pool.states()] == [(UNKNOWN, None), (UP, 0.004)]

    with capturedLogs() as events:
        worker.channel.protocol.report_server_state("ldap", ServerAddress("dc9.example.com", 389), DOWN, "x", None)
        worker.channel.protocol.report_server_state("other", first, DOWN, "x", None)
        worker.pump.flush()
    assert statuses_of(parent_pool) == [UNKNOWN, UP]
    assert [formatEvent(event) for event in events] == [
        "a worker reported LDAP server dc9.example.com:389 of ldap down, which this process does not know",
        "a worker reported LDAP server dc1.example.com:389 of other down, which this process does not know",
    ]


def statuses_of(pool) -> list[str]:
    return [state.status for state in pool.states()]


# -- the pool -----------------------------------------------------------------------------------


def test_restart_delay_grows_while_a_worker_keeps_exiting_quickly():
    """0.5 s, 1 s, 2 s ... up to MAX_RESTART_DELAY; a worker that ran long (0 quick exits) restarts soon."""
    assert [restart_delay(n) for n in range(5)] == [0.5, 0.5, 1.0, 2.0, 4.0]
    assert restart_delay(100) == MAX_RESTART_DELAY


def test_describe_exit_says_status_or_signal():
    """The log line says how a worker ended."""
    from twisted.internet.error import ProcessDone, ProcessTerminated
    from twisted.python.failure import Failure

    assert describe_exit(Failure(ProcessTerminated(exitCode=None, signal=9))) == "was killed by signal 9"
    assert describe_exit(Failure(ProcessTerminated(exitCode=1))) == "exited with status 1"
    assert describe_exit(Failure(ProcessDone(0))) == "exited with status 0"


class _Reactor(MemoryReactorClock):
    """What makeService needs of a reactor, in memory."""

    def suggestThreadPoolSize(self, size):
        pass

    def getThreadPool(self):
        return None


def make_top(tmp_path, workers: int):
    config = tmp_path / "sftpauth.ini"
    config.write_text(
        textwrap.dedent(
            f"""
            [server]
            data_folder = {tmp_path}/data
            workers = {workers}
            [services/ftp]
            type = ftp
            port = 0
            [services/sftp]
            type = ssh
            port = 0
            [services/manager]
            type = manager
            port = 0
            """
        )
    )
    options = Options()
    options.parseOptions(["--config", str(config)])
    return makeService(options, _Reactor())


def test_one_worker_builds_no_pool(tmp_path):
    """workers = 1: every service is built in this process exactly as before (no shared sockets, no pool)."""
    top = make_top(tmp_path, 1)
    kinds = {type(service) for service in top}
    assert WorkerPool not in kinds and SharedListeningSocket not in kinds
    assert {type(top.getServiceNamed(name)).__name__ for name in ("ftp", "sftp")} == {"ListeningService"}


def test_two_workers_leave_ftp_and_sftp_to_the_pool_and_keep_the_manager(tmp_path):
    """workers = 2: FTP and SFTP become shared sockets for the pool (host keys made once, now); the manager stays here."""
    top = make_top(tmp_path, 2)
    pools = [service for service in top if isinstance(service, WorkerPool)]
    assert len(pools) == 1 and pools[0].count == 2
    assert [shared.settings.id for shared in pools[0].sockets] == ["ftp", "sftp"]
    assert all(isinstance(top.getServiceNamed(name), SharedListeningSocket) for name in ("ftp", "sftp"))
    assert type(top.getServiceNamed("manager")).__name__ == "ManagerService"
    assert sorted(path.name for path in (tmp_path / "data" / "ssh").iterdir()) == ["ssh_host_ed25519_key", "ssh_host_rsa_key"]
    assert list(top)[-1] is pools[0]  # stopped first: the workers' last audit events still reach the file


def test_a_shared_socket_binds_in_privileged_start_and_reports_a_taken_port(tmp_path):
    """The parent binds each socket before any worker exists; a port in use fails as listenTCP would."""
    import socket

    from twisted.internet.error import CannotListenError

    from sftpauth.config.models import ServiceSettings

    settings = ServiceSettings("ftp", "ftp", True, "", "127.0.0.1", 0, (), "p", 300, 10)
    shared = SharedListeningSocket(settings)
    shared.privilegedStartService()
    port = shared.socket.getsockname()[1]
    assert shared.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    taken = SharedListeningSocket(ServiceSettings("ftp2", "ftp", True, "", "127.0.0.1", port, (), "p", 300, 10))
    with pytest.raises(CannotListenError):
        taken.privilegedStartService()
    shared.startService()
    shared.stopService()
    assert shared.socket is None


def test_worker_log_lines_are_written_once_per_reactor_turn():
    """Each line of each event becomes LEVEL<TAB>text; the events of one turn are written (and flushed) together."""
    import io

    from twisted.logger import LogLevel

    from sftpauth.workers.worker import LineWriter

    scheduled = []
    reactor = SimpleNamespace(callLater=lambda delay, f: scheduled.append(f), callFromThread=scheduled.append)
    stream = io.StringIO()
    writer = LineWriter(stream, reactor)
    writer({"log_level": LogLevel.info, "log_format": "one {x}", "x": 1, "log_namespace": "a", "log_time": 0})
    writer({"log_level": LogLevel.warn, "log_format": "two\nlines", "log_namespace": "b", "log_time": 0})
    assert len(scheduled) == 1 and stream.getvalue() == ""
    scheduled.pop()()
    assert stream.getvalue() == "info\t[a#info] one 1\nwarn\t[b#warn] two\nwarn\tlines\n"


def test_an_event_without_text_is_not_written_by_a_worker():
    """An event whose format is empty (a passive FTP port's start, ftp._QuietPort) gives no line and no write."""
    import io

    from twisted.logger import LogLevel

    from sftpauth.workers.worker import LineWriter

    scheduled = []
    reactor = SimpleNamespace(callLater=lambda delay, f: scheduled.append(f), callFromThread=scheduled.append)
    stream = io.StringIO()
    LineWriter(stream, reactor)({"log_level": LogLevel.info, "log_format": "", "log_system": "x", "log_time": 0})
    assert scheduled == [] and stream.getvalue() == ""


def test_no_worker_is_started_without_a_service_for_them(tmp_path):
    """workers = 2 with only a Web Manager: the pool starts no process (the reactor here cannot spawn any)."""
    config = tmp_path / "sftpauth.ini"
    config.write_text(f"[server]\ndata_folder = {tmp_path}/data\nworkers = 2\n[services/web]\ntype = manager\nport = 0\n")
    options = Options()
    options.parseOptions(["--config", str(config)])
    [pool] = [service for service in makeService(options, _Reactor()) if isinstance(service, WorkerPool)]
    pool.startService()
    assert pool.workers == {}
    pool.stopService()


class _SpawningReactor(MemoryReactorClock):
    """Records the processes the pool would start."""

    def __init__(self):
        super().__init__()
        self.spawned: list[list[str]] = []

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None):
        self.spawned.append(list(args))

    def suggestThreadPoolSize(self, size):
        pass

    def getThreadPool(self):
        return None


@pytest.mark.parametrize(("affinity", "expected"), [("auto", [["--cpu", "4"], ["--cpu", "6"], ["--cpu", "4"]]),
                                                    ("no", [[], [], []])])
def test_the_pool_tells_each_worker_its_cpu(tmp_path, monkeypatch, affinity, expected):
    """With auto each worker is started with its CPU of the parent's allowed ones (round robin); with no, none."""
    monkeypatch.setattr(checks.os, "sched_getaffinity", lambda pid: {6, 4})
    config = tmp_path / "sftpauth.ini"
    config.write_text(f"[server]\ndata_folder = {tmp_path}/data\nworkers = 3\nworker_cpu_affinity = {affinity}\n"
                      "[services/ftp]\ntype = ftp\nport = 0\n")
    options = Options()
    options.parseOptions(["--config", str(config)])
    reactor = _SpawningReactor()
    top = makeService(options, reactor)
    [pool] = [service for service in top if isinstance(service, WorkerPool)]
    top.privilegedStartService()  # binds the shared socket
    try:
        for index in (1, 2, 3):
            pool.spawn(index)
    finally:
        for shared in pool.sockets:
            shared.stopService()
    assert [args[args.index("--sockets") + 2:] for args in reactor.spawned] == expected


class _FakeChannel:
    def __init__(self):
        self.sent: list[tuple[str, bytes]] = []

    def send_certificate(self, service, pem):
        self.sent.append((service, pem))


class _FakeWorker:
    def __init__(self, index, ready):
        self.index, self.ready, self.pid = index, ready, 4000 + index
        self.signals: list[str] = []
        self.ended = defer.Deferred()
        self.channel = _FakeChannel()
        self.certificates: dict[str, bytes] = {}

    def signal(self, name):
        self.signals.append(name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from tests.integration.tls_certs import TestPKI

    return TestPKI(tmp_path_factory.mktemp("pki"))


def _write_pem(path, pair) -> bytes:
    pem = pair.certificate.read_bytes() + pair.key.read_bytes()
    path.write_bytes(pem)
    return pem


def _ftps_pool(tmp_path, pki):
    """A pool of two workers for an explicit FTPS service whose certificate file is ``tmp_path/ftps.pem``."""
    first = _write_pem(tmp_path / "ftps.pem", pki.good)
    config = tmp_path / "sftpauth.ini"
    config.write_text(f"[server]\ndata_folder = {tmp_path}/data\nworkers = 2\n[services/ftps]\ntype = ftp\nport = 0\n"
                      f"ssl_certificate = {tmp_path}/ftps.pem\n")
    options = Options()
    options.parseOptions(["--config", str(config)])
    [pool] = [service for service in makeService(options, _SpawningReactor()) if isinstance(service, WorkerPool)]
    return pool, first


def test_sighup_reloads_the_certificate_in_the_parent_and_gives_ready_workers_a_changed_one(tmp_path, pki):
    """QA: each worker read the certificate file at its start and on SIGHUP, so a restarted worker served
    another one, or none. The parent holds it: it reloads on SIGHUP and sends a changed one to ready
    workers; a worker still starting gets it once ready; an unusable file changes nothing anywhere."""
    pool, first = _ftps_pool(tmp_path, pki)
    ready, starting = _FakeWorker(1, True), _FakeWorker(2, False)
    for worker in (ready, starting):
        worker.certificates = {"ftps": first}
    pool.workers = {1: ready, 2: starting}
    pool.reload_certificates()  # the file has not changed: nothing to send
    assert ready.channel.sent == [] and starting.channel.sent == []
    second = _write_pem(tmp_path / "ftps.pem", pki.wrong_name)
    with captured_logs() as events:
        pool.reload_certificates()
    assert ready.channel.sent == [("ftps", second)] and starting.channel.sent == []
    assert [formatEvent(event) for event in events].count(
        "service ftps: reloaded ssl_certificate: " + pool.tls["ftps"].certificate.describe()) == 1
    pool.send_certificates(starting)  # what channel_ready does
    assert starting.channel.sent == [("ftps", second)]
    (tmp_path / "ftps.pem").write_text("not a certificate")
    with captured_logs() as events:
        pool.reload_certificates()
    assert pool.tls["ftps"].certificate.pem == second
    assert ready.channel.sent == [("ftps", second)] and starting.channel.sent == [("ftps", second)]
    assert any("ssl_certificate not reloaded" in formatEvent(event) for event in events)
    assert ready.signals == [] and starting.signals == []  # workers ignore SIGHUP: the parent does the reload
    _write_pem(tmp_path / "ftps.pem", pki.good)
    pool.stopService()
    pool.reload_certificates()
    assert pool.tls["ftps"].certificate.pem == second and ready.channel.sent == [("ftps", second)]


def test_a_worker_starts_with_the_certificate_in_use_even_an_expired_one(tmp_path, pki):
    """The start document carries the parent's certificate file, byte for byte; the worker does not read the
    file (gone or replaced by then), nor refuse to start when the certificate expired since: the parent logs
    that, once."""
    from sftpauth.workers.pool import read_start_document, start_document

    pool, first = _ftps_pool(tmp_path, pki)
    (tmp_path / "ftps.pem").unlink()
    text, host_keys, tls = read_start_document(start_document(pool.configuration_text, {}, pool.tls).decode())
    assert text == pool.configuration_text and host_keys == {}
    assert tls["ftps"].certificate.pem == first and tls["ftps"].path == str(tmp_path / "ftps.pem")
    assert tls["ftps"].certificate.fingerprint == pool.tls["ftps"].certificate.fingerprint
    assert tls["ftps"].maximum_version is not None  # FTPS's TLS 1.2 at most, as in one process
    pool.tls["ftps"].certificate = load_server_certificate(
        _pem_file(tmp_path / "expired.pem", pki.expired), check_expiry=False)
    _, _, tls = read_start_document(start_document(pool.configuration_text, {}, pool.tls).decode())
    assert tls["ftps"].certificate.not_after < pki.now


def _pem_file(path, pair) -> str:
    _write_pem(path, pair)
    return str(path)


def test_a_certificate_longer_than_an_amp_value_reaches_the_worker_whole(clock, tmp_path, pki):
    """A file with a long chain is sent in parts (an AMP value holds 65,535 bytes) and used once whole."""
    parent = Parent(clock)
    got: list[tuple[str, bytes]] = []
    side = ParentSide(parent.state, parent.audit, lambda: None, lambda: None)
    worker_side = WorkerSide(StateChannel(clock), None, lambda: None, lambda service, pem: got.append((service, pem)))
    _, _, pump = iosim.connectedServerAndClient(lambda: side, lambda: worker_side)
    pem = (pki.ca_bundle.read_bytes() * 200) + pki.good.certificate.read_bytes() + pki.good.key.read_bytes()
    assert len(pem) > 2 * CERTIFICATE_PART_BYTES
    side.send_certificate("ftps", pem)
    side.send_certificate("other", b"short")
    pump.flush()
    assert got == [("ftps", pem), ("other", b"short")]


def test_a_starting_worker_has_the_newer_certificate_before_the_answer_that_lets_it_listen(clock):
    """QA: a worker restarted while SIGHUP reloaded the certificate served the one of its start document until
    it was ready. It now asks (Starting) before its services listen; the parent sends what changed, then
    answers, and the channel keeps that order."""
    from sftpauth.workers.channel import Starting

    parent = Parent(clock)
    order: list[str] = []
    side = ParentSide(parent.state, parent.audit, lambda: None, lambda: None,
                      on_starting=lambda: side.send_certificate("ftps", b"NEW PEM"))
    worker_side = WorkerSide(StateChannel(clock), None, lambda: None, lambda service, pem: order.append(f"{service}: {pem.decode()}"))
    _, _, pump = iosim.connectedServerAndClient(lambda: side, lambda: worker_side)
    worker_side.callRemote(Starting).addCallback(lambda answer: order.append("answered"))
    pump.flush()
    assert order == ["ftps: NEW PEM", "answered"]


def test_the_pool_answers_a_starting_worker_with_the_certificate_reloaded_since_its_spawn(tmp_path, pki):
    """The pool wires Starting to send_certificates: a SIGHUP between a worker's spawn and its Starting reaches it."""
    pool, first = _ftps_pool(tmp_path, pki)
    for shared in pool.sockets:
        shared.privilegedStartService()  # binds the shared socket
    try:
        worker = pool.spawn(1)
        assert worker.certificates == {} and pool.tls["ftps"].certificate.pem == first  # no process in a memory reactor
        worker.certificates = {"ftps": first}  # what connectionMade records with the start document
        second = _write_pem(tmp_path / "ftps.pem", pki.wrong_name)
        pool.reload_certificates()  # not ready: nothing sent yet
        assert worker.certificates == {"ftps": first}
        sent = []
        worker.channel.send_certificate = lambda service, pem: sent.append((service, pem))
        worker.channel._starting()
        assert sent == [("ftps", second)] and worker.certificates == {"ftps": second}
    finally:
        for shared in pool.sockets:
            shared.stopService()


def test_a_worker_uses_the_certificate_the_parent_sends_and_keeps_its_own_if_unusable(tmp_path, pki):
    """The worker's FTPS service serves new sessions with the parent's reloaded certificate; a file that cannot
    be used (not expected: the parent checked it) is logged and the one in use is kept."""
    from sftpauth.tls import ServerTLS
    from sftpauth.workers.worker import Worker

    path = _pem_file(tmp_path / "ftps.pem", pki.good)
    tls = ServerTLS(path, "ftps")
    worker = Worker.__new__(Worker)
    worker.index = 2
    worker.runtime = SimpleNamespace(tls={"ftps": tls})
    new = _write_pem(tmp_path / "other.pem", pki.wrong_name)
    with captured_logs() as events:
        worker._use_certificate("ftps", new)
    from OpenSSL import SSL

    served = SSL.Connection(tls.new_session().getContext(), None).get_certificate().to_cryptography()
    assert tls.certificate.pem == new and served.subject == load_server_certificate(str(tmp_path / "other.pem")).certificate.subject
    assert any(formatEvent(event).startswith("service ftps: using the reloaded ssl_certificate") for event in events)
    with captured_logs() as events:
        worker._use_certificate("ftps", b"garbage")
        worker._use_certificate("nothing-here", new)
    assert tls.certificate.pem == new
    texts = [formatEvent(event) for event in events]
    assert any("the certificate the parent sent cannot be used, the one in use is kept" in text for text in texts)
    assert any("the parent sent a certificate for nothing-here, which has none here" in text for text in texts)


def test_a_worker_process_ignores_sighup_from_its_first_line(tmp_path):
    """QA: SIGHUP to a worker still starting (before its handlers) killed it. It is ignored from the first line
    of ``python -m sftpauth.workers``: here the worker waits for its configuration on standard input."""
    import os
    import signal
    import subprocess
    import sys
    import time

    worker = subprocess.Popen(
        [sys.executable, "-m", "sftpauth.workers", "--config", str(tmp_path / "none.ini"), "--index", "1",
         "--workers", "2"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until it blocks reading standard input, past its imports
            with open(f"/proc/{worker.pid}/wchan") as wchan, open(f"/proc/{worker.pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "S" and wchan.read() not in ("", "0"):
                    break
            time.sleep(0.05)
        worker.send_signal(signal.SIGHUP)
        time.sleep(0.2)
        assert worker.poll() is None, worker.stdout.read()
    finally:
        worker.stdin.close()
        worker.wait(20)
        output = worker.stdout.read().decode()
        worker.stdout.close()
    # Nothing came on its standard input: an error line and status 1, no traceback.
    assert worker.returncode == 1 and "its standard input is not what sftpauth's parent sends" in output, output
    assert "Traceback" not in output
