"""The Web Manager's rules over real twisted.web requests: login, cookies, CSRF, roles, expiry, API."""

from __future__ import annotations

import json
import tempfile
import urllib.parse

import pytest
from twisted.internet import defer
from twisted.logger import LogLevel, globalLogPublisher

from sftpauth.account import Account
from sftpauth.auth.errors import LoginFailed, UnknownUser
from sftpauth.auth.ldap.verify import Check, MethodReport

from manager_harness import HTTPResult, ManagerHarness

LDAP_METHOD = """
[authentications/ldap]
type = ldap
address = 127.0.0.1
bind_dn = ou=people,dc=example,dc=com
manager_search_filter = (objectClass=person)
"""


class RolesMethod:
    """Stands in for an LDAP method: knows one manager account with the given roles."""

    def __init__(self, method_id: str, username: str, password: str, roles: tuple[str, ...]):
        self.id = method_id
        self.username, self.password, self.roles = username, password, roles
        self.requests = []

    async def authenticate(self, request):
        self.requests.append(request)
        if request.username != self.username:
            raise UnknownUser("not here")
        if request.password != self.password:
            raise LoginFailed("invalid-password", "wrong password")
        if not request.manager:
            raise LoginFailed("filter-mismatch", "file transfer")
        return Account(request.username, self.id, "", frozenset(), (), email="l@example.com", full_name="L Dap", roles=self.roles)


@pytest.fixture
def manager(tmp_path, make_hash):
    """A Web Manager with admin (full), auditor (read-only) and an FTP account."""
    made = []

    def make(**options) -> ManagerHarness:
        harness = ManagerHarness(tmp_path / f"m{len(made)}", make_hash, **options)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


def test_pages_need_a_session_and_redirect_to_login(manager):
    """Without a session the dashboard redirects to /login?next=..., the API answers 401 JSON."""
    m = manager()
    page = m.get("/events?username=x")
    assert page.status == 303
    assert page.header("location") == "/login?next=%2Fevents"
    api = m.get("/api/v1/authentications")
    assert api.status == 401
    assert api.json() == {"error": "login required"}


def test_local_administrator_logs_in_with_secure_cookie(manager):
    """A good password opens a session whose cookie is Secure, HttpOnly, SameSite=Strict and random."""
    m = manager()
    result = m.login()
    assert result.status == 303
    assert result.header("location") == "/"
    cookie = result.cookie("__Host-sftpauth-session")
    assert cookie is not None
    parts = [part.strip().lower() for part in cookie.split(";")]
    assert {"secure", "httponly", "samesite=strict", "path=/"} <= set(parts)
    assert len(cookie.split(";")[0].split("=", 1)[1]) >= 43  # 256 random bits
    dashboard = m.get("/")
    assert dashboard.status == 200
    assert "Dashboard" in dashboard.text and "admin" in dashboard.text
    event = m.events()[-1]
    assert event["username"] == "admin" and event["outcome"] == "success" and event["protocol"] == "manager"
    assert event["method"] == "DEFAULT-AUTHENTICATION"
    start = m.events("session-start")[-1]
    assert start["service"] == "manager" and start["roles"] == ["DEFAULT-ROLE"]


def test_the_dashboard_writes_an_ipv6_service_address_in_brackets(manager):
    """QA, session 26: the services table showed ``::1:2121``."""
    m = manager(extra="[services/ftp6]\ntype = ftp\naddress = ::1\nport = 2121\n")
    m.login()
    dashboard = m.get("/")
    assert "<code>[::1]:2121</code>" in dashboard.text and "<code>127.0.0.1:10443</code>" in dashboard.text


def test_session_ids_differ_for_each_login(manager):
    """Two logins get two different session IDs (no fixation, no predictable ID)."""
    m = manager()
    first = m.login().cookie("__Host-sftpauth-session")
    m.cookies.clear()
    second = m.login().cookie("__Host-sftpauth-session")
    assert first.split(";")[0] != second.split(";")[0]


def test_wrong_password_is_refused_with_one_audited_failure(manager):
    """A wrong password renders the login page with a generic message and audits the reason."""
    m = manager()
    result = m.login("admin", "nope")
    assert result.status == 401
    assert "Login failed" in result.text
    assert "invalid-password" not in result.text
    assert result.cookie("__Host-sftpauth-session") is None
    event = m.events()[-1]
    assert (event["username"], event["outcome"], event["reason"]) == ("admin", "failure", "invalid-password")
    assert "nope" not in (m.folder / "audit.jsonl").read_text()


def test_file_transfer_account_cannot_log_into_the_manager(manager):
    """An [accounts/..] password is not a Web Manager login."""
    m = manager()
    assert m.login("ftpuser", "ftp-pass").status == 401
    assert m.events()[-1]["reason"] == "unknown-user"


def test_administrator_password_never_opens_file_transfer(manager, result_of):
    """The application method sends non-manager logins to the accounts only: admins are unknown there."""
    from sftpauth.auth.credentials import LoginRequest

    m = manager()
    request = LoginRequest("admin", "admin-pass", "ftp", "ftp", "10.0.0.1")
    with pytest.raises(LoginFailed) as caught:
        result_of(m.chain.requestAvatarId(request))
    assert caught.value.reason == "unknown-user"


def test_login_form_without_its_csrf_token_is_refused(manager):
    """POST /login needs the token of the login cookie (double submit); a missing one is refused."""
    m = manager()
    m.get("/login")
    result = m.post_form("/login", {"username": "admin", "password": "admin-pass"})
    assert result.status == 403
    assert result.cookie("__Host-sftpauth-session") is None
    forged = m.post_form("/login", {"csrf_token": "forged", "username": "admin", "password": "admin-pass"})
    assert forged.status == 403
    assert m.events() == []  # never reached the chain


def test_every_post_needs_the_session_csrf_token(manager):
    """Logout, test-login and verify refuse a POST without the session's token (form field or header)."""
    m = manager()
    m.login()
    for path in ("/logout", "/test-login", "/authentications/x/verify_connection"):
        assert m.post_form(path, {"username": "u", "password": "p"}).status == 403, path
        assert m.post_form(path, {"csrf_token": "wrong"}).status == 403, path
    assert m.get("/").status == 200  # still logged in
    api = m.post_json("/api/v1/test_login", {"username": "u", "password": "p"})
    assert api.status == 403
    assert "CSRF" in api.json()["error"]


def test_logout_ends_the_session(manager):
    """POST /logout with the token ends the session server-side and expires the cookie."""
    m = manager()
    m.login()
    cookie = dict(m.cookies)
    token = m.csrf_token()
    result = m.post_form("/logout", {"csrf_token": token})
    assert result.status == 303
    expired = result.cookie("__Host-sftpauth-session")
    assert "Max-Age=0" in expired
    m.cookies = cookie  # a stolen copy of the old cookie no longer works
    assert m.get("/").status == 303
    end = m.events("session-end")[-1]
    assert end["reason"] == "logout" and end["username"] == "admin"


def test_idle_session_expires_with_the_clock(manager):
    """A session unused for session_idle_timeout ends; using it before then keeps it alive."""
    m = manager(manager_options="session_idle_timeout = 600")
    m.login()
    m.clock.advance(599)
    assert m.get("/").status == 200
    m.clock.advance(599)
    assert m.get("/").status == 200
    m.clock.advance(600)
    page = m.get("/")
    assert page.status == 303
    login = m.get("/login")
    assert "Your session has ended" in login.text
    assert m.events("session-end")[-1]["reason"] == "idle-timeout"


def test_sweep_ends_idle_sessions_without_a_request(manager):
    """The periodic sweep records session-end for idle sessions, keeping the open-session gauge right."""
    m = manager(manager_options="session_idle_timeout = 60")
    m.login()
    assert len(m.sessions) == 1
    m.clock.advance(61)
    assert m.sessions.expire_idle() == 1
    assert len(m.sessions) == 0
    assert 'sftpauth_open_sessions{service="manager"} 0.0' in m.metrics.render().decode()


def test_the_running_service_ends_an_idle_session_within_a_second(manager):
    """The manager service's own sweep: a session idle for session_idle_timeout gets its session-end within 1 s."""
    from sftpauth.manager.service import ManagerService

    m = manager(manager_options="session_idle_timeout = 60")
    service = ManagerService(m.settings, m.runtime)
    service.startService()
    try:
        m.clock.advance(5)  # not in step with any sweep interval
        service.sessions.open("admin", ("DEFAULT-ROLE",), True, "DEFAULT-AUTHENTICATION", "127.0.0.1")
        m.clock.advance(59.5)
        assert len(service.sessions) == 1
        for _ in range(15):
            m.clock.advance(0.1)
        assert len(service.sessions) == 0
        assert m.events("session-end")[-1]["reason"] == "idle-timeout"
    finally:
        service.stopService()


def session_store(idle_timeout: float, **options):
    """A SessionStore on a fake clock: ``(clock, store, ended)``, ended listing each session-end's (username, reason)."""
    from twisted.internet.task import Clock

    from sftpauth.audit import AuditLog
    from sftpauth.manager.sessions import SessionStore

    clock = Clock()
    audit = AuditLog(echo=False)
    ended = []
    audit.listeners.append(lambda entry: entry["event"] == "session-end" and ended.append((entry["username"], entry["reason"])))
    return clock, SessionStore(clock, idle_timeout, audit, "manager", **options), ended


def test_the_sweep_takes_the_least_recently_used_first_and_a_full_store_refuses_new_sessions():
    """Sessions are ordered by last use: the sweep stops at the first live one. A full store refuses a new
    session (TooManySessions) rather than ending somebody else's."""
    from sftpauth.manager.sessions import TooManySessions

    clock, store, ended = session_store(60, limit=3)
    first = store.open("first", (), True, "m", "127.0.0.1")
    clock.advance(10)
    store.open("second", (), True, "m", "127.0.0.1")
    clock.advance(20)
    assert store.get(first.id) is first  # used again at 30: now the most recent
    clock.advance(40)  # 70: second idle 60 s, first 40 s
    assert store.expire_idle() == 1 and ended == [("second", "idle-timeout")]
    store.open("third", (), True, "m", "127.0.0.1")
    store.open("fourth", (), True, "m", "127.0.0.1")
    with pytest.raises(TooManySessions):
        store.open("fifth", (), True, "m", "127.0.0.1")
    assert len(ended) == 1 and len(store) == 3 and store.get(first.id) is first
    clock.advance(61)
    assert store.expire_idle() == 3
    store.open("fifth", (), True, "m", "127.0.0.1")  # room again


def test_one_user_cannot_push_out_other_users_sessions():
    """QA: 10,004 header logins of one user ended every administrator's session. Now a user past its
    per-user limit ends its own least recently used session; the others keep theirs."""
    clock, store, ended = session_store(60, limit=10, per_user=3)
    admin = store.open("admin", (), True, "m", "127.0.0.10")
    flood = [store.open("flooder", (), True, "m", "127.0.0.2") for _ in range(50)]
    assert store.get(admin.id) is admin
    assert len(store) == 4
    assert ended == [("flooder", "evicted")] * 47
    assert [store.get(session.id) is session for session in flood[-3:]] == [True, True, True]
    assert store.get(flood[0].id) is None


def test_a_session_ends_at_its_lifetime_however_busy():
    """session_lifetime: a session used every minute still ends that long after its login (request or sweep)."""
    clock, store, ended = session_store(300, lifetime=3600)
    busy = store.open("busy", (), True, "m", "127.0.0.1")
    clock.advance(60)
    swept = store.open("swept", (), True, "m", "127.0.0.1")
    logged_out = store.open("logged-out", (), True, "m", "127.0.0.1")
    store.close(logged_out, "logout")
    for _ in range(58):
        clock.advance(60)
        assert store.get(busy.id) is busy and store.get(swept.id) is swept
    assert store.expire_idle() == 0
    clock.advance(60)  # busy: 3600 s since its login
    assert store.get(busy.id) is None
    assert store.get(swept.id) is swept
    clock.advance(60)
    assert store.expire_idle() == 1
    assert ended == [("logged-out", "logout"), ("busy", "lifetime"), ("swept", "lifetime")]
    assert len(store) == 0


def test_ended_sessions_do_not_pile_up_behind_a_long_one():
    """Logins and logouts behind a live session: the store's login order stays within twice its limit."""
    clock, store, _ = session_store(300, limit=10, lifetime=3600)
    long_one = store.open("admin", (), True, "m", "127.0.0.1")
    for _ in range(1000):
        store.close(store.open("script", (), True, "m", "127.0.0.2"), "logout")
    assert len(store._logins) <= 20
    clock.advance(3600)
    assert store.expire_idle() == 1 and store.get(long_one.id) is None


def test_session_lifetime_option():
    from sftpauth.config.errors import ConfigError
    from sftpauth.config.loader import parse_configuration

    def manager(options: str):
        text = f"[services/web]\ntype = manager\nport = 8443\n{options}"
        return parse_configuration(text, "/etc/sftpauth/sftpauth.ini", "/etc/sftpauth", {}).services["web"]

    assert manager("").session_lifetime == 43200
    assert manager("session_lifetime = 3600\n").session_lifetime == 3600
    with pytest.raises(ConfigError, match=r"sftpauth.ini:4 \[services/web\] session_lifetime"):
        manager("session_lifetime = 10\n")


def test_security_headers_and_no_store(manager):
    """Pages carry CSP, X-Frame-Options, nosniff and no-store; the CSS may be cached."""
    m = manager()
    m.login()
    page = m.get("/")
    assert "default-src 'none'" in page.header("content-security-policy")
    assert "frame-ancestors 'none'" in page.header("content-security-policy")
    assert "script-src" not in page.header("content-security-policy")
    assert page.header("x-frame-options") == "DENY"
    assert page.header("x-content-type-options") == "nosniff"
    assert page.header("strict-transport-security") == "max-age=31536000"
    assert page.header("cache-control") == "no-store"
    assert page.header("server") == "sftpauth"
    css = m.get("/static/manager.css")
    assert css.status == 200 and css.header("content-type").startswith("text/css")
    assert css.header("cache-control") != "no-store"
    assert m.get("/static/..%2Fweb.py").status == 404
    assert m.get("/static/missing.css").status == 404


def test_read_only_role_sees_pages_but_cannot_act(manager):
    """permissions = configuration, read: pages open, actions answer 403 and buttons are disabled."""
    m = manager(verify=_never_verify)
    m.login("auditor", "auditor-pass")
    page = m.get("/test-login")
    assert page.status == 200
    assert "read-only" in page.text
    assert 'id="tl-run" disabled' in page.text
    token = m.csrf_token()
    result = m.post_form("/test-login", {"csrf_token": token, "username": "admin", "password": "admin-pass"})
    assert result.status == 403
    api = m.post_json("/api/v1/test_login", {"username": "a", "password": "b"}, headers={"X-CSRF-Token": token})
    assert api.status == 403
    assert m.get("/api/v1/session").json()["can_act"] is False
    assert m.get("/events").status == 200
    assert [event["username"] for event in m.events()] == ["auditor"]  # no test login ran
    # QA, session 29: each refused attempt is a manager-action event, with who tried what on what
    verify = m.post_form("/authentications/ldap/verify_connection", {"csrf_token": token})
    assert verify.status == 403
    refused = [(event["action"], event["target"], event["username"], event["outcome"], event["reason"])
               for event in m.events("manager-action")]
    assert refused == [("test-login", "admin", "auditor", "failure", "read-only-role"),
                       ("test-login", "a", "auditor", "failure", "read-only-role"),
                       ("verify-connection", "ldap", "auditor", "failure", "read-only-role")]


def _never_verify(settings, reactor):
    raise AssertionError("a read-only role must not reach verify")


def test_ldap_administrator_gets_mapped_roles(manager):
    """An LDAP manager login's roles (roles_mapping) decide what the session may do."""
    method = RolesMethod("ldap", "lisa", "lisa-pass", ("auditors",))
    m = manager(extra=LDAP_METHOD, methods={"ldap": method}, manager_options="authentications = DEFAULT-AUTHENTICATION, ldap")
    assert m.login("lisa", "lisa-pass").status == 303
    session = m.get("/api/v1/session").json()
    assert session["roles"] == ["auditors"] and session["can_act"] is False
    assert session["full_name"] == "L Dap"
    assert method.requests[-1].manager is True
    assert method.requests[-1].protocol == "manager"


def test_ldap_administrator_without_roles_gets_default_role(manager):
    """No role from LDAP means DEFAULT-ROLE, with full permissions."""
    method = RolesMethod("ldap", "lisa", "lisa-pass", ())
    m = manager(extra=LDAP_METHOD, methods={"ldap": method}, manager_options="authentications = DEFAULT-AUTHENTICATION, ldap")
    m.login("lisa", "lisa-pass")
    session = m.get("/api/v1/session").json()
    assert session["roles"] == ["DEFAULT-ROLE"] and session["can_act"] is True


def test_next_parameter_cannot_redirect_elsewhere(manager):
    """After login only local paths are followed: //evil.example and https:// go to /."""
    m = manager()
    for target, expected in (("//evil.example/x", "/"), ("https://evil.example/", "/"), ("/events?outcome=failure", "/events?outcome=failure")):
        m.cookies.clear()
        page = m.get("/login?" + __import__("urllib.parse").parse.urlencode({"next": target}))
        result = m.post_form(
            "/login", {"csrf_token": page.form_value("csrf_token"), "username": "admin", "password": "admin-pass", "next": page.form_value("next")}
        )
        assert result.header("location") == expected


def test_pages_escape_what_users_typed(manager):
    """A username with HTML is shown escaped on the test-login and events pages."""
    m = manager()
    m.login()
    token = m.csrf_token()
    evil = "<script>alert(1)</script>"
    page = m.post_form("/test-login", {"csrf_token": token, "username": evil, "password": "x"})
    assert page.status == 200
    assert evil not in page.text
    assert "&lt;script&gt;" in page.text
    events = m.get("/events?kind=all")
    assert evil not in events.text


def test_control_characters_a_client_chose_are_shown_escaped(manager):
    """A username with a NUL or a line break shows as alice\\x00 on the events and test-login pages, never as "alice"."""
    m = manager()
    m.login()
    token = m.csrf_token()
    page = m.post_form("/test-login", {"csrf_token": token, "username": "alice\x00\nbob", "password": "x"})
    assert page.status == 200 and "\x00" not in page.text
    assert "alice\\x00\\x0abob" in page.text
    from sftpauth.auth.credentials import LoginRequest

    request = LoginRequest(username="alice\x00", password="pw", service_id="ftp", protocol="ftp", peer="127.0.0.9")
    refused = defer.ensureDeferred(m.chain.login(request))  # an FTP login as a client would try it
    assert isinstance(refused.result.value, LoginFailed)
    refused.addErrback(lambda failure: None)
    assert m.events()[-1]["username"] == "alice\x00"
    events = m.get("/events?kind=all")
    assert "\x00" not in events.text and "alice\\x00" in events.text
    # Invisible format characters and direction overrides too: r<U+200B>oot must not show as root.
    for typed, shown in (("r\u200boot", "r\\u200boot"), ("\u202etoor", "\\u202etoor"), ("ro\u00adot", "ro\\xadot")):
        request = LoginRequest(username=typed, password="pw", service_id="ftp", protocol="ftp", peer="127.0.0.9")
        defer.ensureDeferred(m.chain.login(request)).addErrback(lambda failure: None)
        events = m.get("/events?kind=all")
        assert typed not in events.text and shown in events.text


def test_test_login_page_explains_each_step_without_the_password(manager):
    """The test-login page shows the trace and the result lines of sftpauth test-login; never the password."""
    m = manager()
    m.login()
    token = m.csrf_token()
    page = m.post_form(
        "/test-login", {"csrf_token": token, "username": "admin", "password": "admin-pass", "manager": "on"}
    )
    assert page.status == 200
    assert "ACCEPTED" in page.text
    assert "found [administrators/admin]" in page.text
    assert "password hash matched" in page.text
    assert "result: ACCEPTED by DEFAULT-AUTHENTICATION as &#39;admin&#39;" in page.text
    assert "admin-pass" not in page.text
    refused = m.post_form("/test-login", {"csrf_token": token, "username": "ftpuser", "password": "bad"})
    assert "REJECTED" in refused.text and "invalid-password" in refused.text
    action = m.events("manager-action")[-1]
    assert action["action"] == "test-login" and action["target"] == "ftpuser" and action["username"] == "admin"
    assert "bad" not in [value for event in m.events("manager-action") for value in event.values()]


def test_api_login_session_and_test_login(manager):
    """The JSON API: login returns the CSRF token, test_login needs it in X-CSRF-Token."""
    m = manager()
    login = m.post_json("/api/v1/login", {"username": "admin", "password": "admin-pass"})
    assert login.status == 200
    token = login.json()["csrf_token"]
    assert login.cookie("__Host-sftpauth-session")
    outcome = m.post_json(
        "/api/v1/test_login", {"username": "ftpuser", "password": "ftp-pass"}, headers={"X-CSRF-Token": token}
    )
    assert outcome.status == 200
    body = outcome.json()
    assert body["accepted"] is True
    assert body["account"]["groups"] == ["DEFAULT_GROUP"]
    assert [step["action"] for step in body["steps"]][:2] == ["try", "lookup"]
    assert "ftp-pass" not in outcome.text


@pytest.mark.parametrize("value", ["yes", 1, "true", None])
def test_api_test_login_manager_must_be_a_boolean(manager, value):
    """"manager": "yes" or 1 is a 400, not silently a file-transfer test (docs/manager.rst: a boolean)."""
    m = manager()
    token = m.post_json("/api/v1/login", {"username": "admin", "password": "admin-pass"}).json()["csrf_token"]
    outcome = m.post_json(
        "/api/v1/test_login", {"username": "ftpuser", "password": "ftp-pass", "manager": value},
        headers={"X-CSRF-Token": token},
    )
    assert outcome.status == 400
    assert outcome.json() == {"error": '"manager" must be true or false'}


def test_api_login_needs_json(manager):
    """POST /api/v1/login as a form (what a cross-site page can send) is refused with 415."""
    m = manager()
    result = m.post_form("/api/v1/login", {"username": "admin", "password": "admin-pass"})
    assert result.status == 415
    assert result.cookie("__Host-sftpauth-session") is None


def test_api_login_failure_is_generic(manager):
    """A failed API login says only "login failed"."""
    m = manager()
    result = m.post_json("/api/v1/login", {"username": "admin", "password": "bad"})
    assert result.status == 401 and result.json() == {"error": "login failed"}


def test_api_events_filter_by_username_and_outcome(manager):
    """GET /api/v1/events filters authentication events by username and outcome, newest first."""
    m = manager()
    m.login("admin", "wrong")
    m.login("auditor", "auditor-pass")
    m.cookies.clear()
    m.login()
    failures = m.get("/api/v1/events?outcome=failure").json()["events"]
    assert [(event["username"], event["reason"]) for event in failures] == [("admin", "invalid-password")]
    audited = m.get("/api/v1/events?username=AUDIT").json()["events"]
    assert [event["username"] for event in audited] == ["auditor"]
    everything = m.get("/api/v1/events").json()["events"]
    assert [event["username"] for event in everything] == ["admin", "auditor", "admin"]
    assert m.get("/api/v1/events?outcome=maybe").status == 400
    page = m.get("/events?username=auditor&outcome=success")
    assert page.text.count('<tr class="event">') == 1


@pytest.mark.parametrize("limit", ["abc", "0", "-1", "1001", "2.5", " 5"])
def test_api_events_refuses_a_limit_it_cannot_use(manager, limit):
    m = manager()
    m.post_json("/api/v1/login", {"username": "admin", "password": "admin-pass"})
    refused = m.get("/api/v1/events?limit=" + urllib.parse.quote(limit))
    assert refused.status == 400 and refused.json() == {"error": "limit must be a whole number from 1 to 1000"}
    assert m.get("/api/v1/events?limit=1000").status == 200


def test_events_show_usernames_that_were_not_utf8(manager):
    """An FTP client's undecodable username (lone surrogates) is audited as \\xff text; the pages still answer.

    Also for an audit file written before that, which holds the surrogates as JSON escapes.
    """
    m = manager()
    m.audit.record("authentication", username="b\udcff\udcfeob", outcome="failure", reason="invalid-username")
    with open(m.configuration.server.audit_log, "a", encoding="utf-8") as audit_file:
        audit_file.write('{"event": "authentication", "username": "old\\udcff", "outcome": "failure"}\n')
    m.login()
    events = m.get("/api/v1/events?outcome=failure").json()["events"]
    assert [event["username"] for event in events] == ["old\\xff", "b\\xff\\xfeob"]
    page = m.get("/events")
    assert page.status == 200 and "b\\xff\\xfeob" in page.text


def test_events_without_an_audit_file_come_from_memory(manager):
    """With no [server] audit_log the events page shows what happened since start-up."""
    m = manager(audit_file=False)
    m.login("admin", "wrong")
    m.login()
    events = m.get("/api/v1/events").json()["events"]
    assert [event["outcome"] for event in events] == ["success", "failure"]


def test_verify_connection_runs_the_verify_engine(manager):
    """POST verify_connection runs the verify-ldap engine for that method and renders its checks."""
    calls = []

    async def verify(settings, reactor):
        calls.append(settings.id)
        return MethodReport(
            settings.id, f"[authentications/{settings.id}]",
            (Check("127.0.0.1:389", "tcp", "ok", "connected"), Check("127.0.0.1:389", "bind", "FAIL", "bad", "hint text")),
        )

    m = manager(extra=LDAP_METHOD, verify=verify)
    m.login()
    token = m.csrf_token()
    page = m.post_form("/authentications/ldap/verify_connection", {"csrf_token": token})
    assert page.status == 200
    assert "1 failed" in page.text and "hint text" in page.text
    api = m.post_json("/api/v1/authentications/ldap/verify_connection", {}, headers={"X-CSRF-Token": token})
    assert api.json()["failures"] == 1
    assert api.json()["checks"][1]["hint"] == "hint text"
    assert calls == ["ldap", "ldap"]
    missing = m.post_json("/api/v1/authentications/nope/verify_connection", {}, headers={"X-CSRF-Token": token})
    assert missing.status == 404
    action = m.events("manager-action")[-1]
    assert action["action"] == "verify-connection" and action["outcome"] == "failure"


def test_api_authentications_lists_methods(manager):
    """GET /api/v1/authentications lists every method, LDAP ones with their servers."""
    m = manager(extra=LDAP_METHOD)
    m.login()
    methods = {item["id"]: item for item in m.get("/api/v1/authentications").json()["authentications"]}
    assert methods["DEFAULT-AUTHENTICATION"]["type"] == "application"
    assert methods["ldap"]["type"] == "ldap"


def test_health_is_public_json(manager):
    """/health answers without a session: version and service states."""
    m = manager()
    health = m.get("/health")
    assert health.status == 200
    body = health.json()
    assert body["status"] == "ok"
    assert body["services"]["manager"]["state"] == "running"
    assert "version" in body


def test_metrics_need_login_unless_configured(manager):
    """/metrics is 401 without a session by default, open with metrics_require_login = no."""
    m = manager()
    assert m.get("/metrics").status == 401
    m.login()
    metrics = m.get("/metrics")
    assert metrics.status == 200
    assert metrics.header("content-type").startswith("text/plain")
    assert 'sftpauth_login_attempts_total{method="DEFAULT-AUTHENTICATION",outcome="success",service="manager"} 1.0' in metrics.text
    assert 'sftpauth_open_sessions{service="manager"} 1.0' in metrics.text
    assert "sftpauth_bans_in_force 0.0" in metrics.text
    open_metrics = manager(manager_options="metrics_require_login = no")
    assert open_metrics.get("/metrics").status == 200


def test_unknown_path_and_method(manager):
    """Unknown paths are 404; a known path with another method is 405 with Allow."""
    m = manager()
    assert m.get("/nope").status == 404
    result = m.request("DELETE", "/login")
    assert (result.status, result.reason) == (405, "Method Not Allowed")
    assert "GET" in result.header("allow")
    assert "<h1>Method not allowed" in result.text and result.header("content-security-policy")  # the styled page
    api = m.request("DELETE", "/api/v1/session")
    assert api.status == 405 and api.header("content-type") == "application/json"
    assert "error" in api.json() and api.header("allow")


def test_oversized_and_malformed_bodies_are_refused(manager):
    """A body over 64 KiB is 413, a non-UTF-8 body 400, a JSON array 400."""
    m = manager()
    assert m.request("POST", "/login", b"a=" + b"x" * 70000, content_type="application/x-www-form-urlencoded").status == 413
    assert m.request("POST", "/login", b"a=\xff\xfe", content_type="application/x-www-form-urlencoded").status == 400
    assert m.request("POST", "/api/v1/login", b"[1]", content_type="application/json").status == 400


@pytest.fixture
def spooled(monkeypatch):
    """Every temporary file twisted.web makes for a request body while the test runs."""
    made = []
    real = tempfile.TemporaryFile

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "TemporaryFile", recording)
    return made


@pytest.fixture
def critical_log():
    """The formats of log events at level critical or carrying a traceback, while the test runs."""
    seen: list[str] = []

    def observer(event):
        if event.get("log_level") == LogLevel.critical or "log_failure" in event:
            seen.append(event.get("log_format", ""))

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


LOGIN_HEAD = b"POST /api/v1/login HTTP/1.1\r\nHost: m\r\nContent-Type: application/json\r\n"


def test_declared_body_over_the_limit_is_refused_before_it_is_read(manager, spooled):
    """A Content-Length over 64 KiB gets 413 and a close right after the headers; the body is never read or stored."""
    m = manager()
    protocol, transport = m.connect()
    protocol.dataReceived(LOGIN_HEAD + b"Content-Length: 1000000000\r\n\r\n")
    assert HTTPResult(transport.value()).status == 413
    assert transport.disconnecting
    answered = transport.value()
    protocol.dataReceived(b'{"username": "admin", "password": "admin-pass"}' + b" " * 100000)
    assert transport.value() == answered  # nothing more is parsed, the request never reaches the manager
    assert spooled == [] and protocol.requests[-1].content is None
    assert m.events() == []
    m.clock.advance(protocol.abortTimeout)
    assert transport.disconnected  # a client that does not close its side is cut off
    protocol, transport = m.connect()
    protocol.dataReceived(LOGIN_HEAD + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n")  # too long for int()
    assert HTTPResult(transport.value()).status == 413


def test_chunked_body_is_counted_as_it_arrives(manager, spooled):
    """A chunked body is refused (413, close) as soon as it passes 64 KiB; a small one is handled, in memory."""
    m = manager()
    protocol, transport = m.connect()
    chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
    protocol.dataReceived(LOGIN_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 4)
    assert transport.value() == b""  # 64 KiB exactly is still allowed
    protocol.dataReceived(chunk)
    assert HTTPResult(transport.value()).status == 413
    assert transport.disconnecting
    assert protocol.requests[-1].content.tell() <= 64 * 1024
    protocol.dataReceived(chunk * 10 + b"0\r\n\r\n")
    assert transport.value().count(b"HTTP/1.1 ") == 1
    # Everything in one read, the final chunk too: still one 413, and the login is never attempted.
    protocol, transport = m.connect()
    protocol.dataReceived(LOGIN_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 5 + b"0\r\n\r\n")
    assert transport.value().count(b"HTTP/1.1 ") == 1 and HTTPResult(transport.value()).status == 413
    assert m.events() == []
    protocol, transport = m.connect()
    body = b'{"username": "admin", "password": "wrong"}'
    protocol.dataReceived(LOGIN_HEAD + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    assert HTTPResult(transport.value()).status == 401
    assert spooled == []


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GET /health HTTP/1.1\r\nHost: m\r\nX-Long: " + b"a" * 17000 + b"\r\n\r\n", 431),
        (b"GET /health HTTP/1.1\r\nHost: m\r\nX-Long: " + b"a" * 17000, 431),  # no line end yet
        (b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\n\r\n", 414),
    ],
)
def test_line_over_16_kib_is_answered_at_once(manager, raw, status):
    """A header line (431) or request line (414) over 16 KiB is answered and closed at once, not left to time out."""
    m = manager()
    protocol, transport = m.connect()
    protocol.dataReceived(raw)
    assert HTTPResult(transport.value()).status == status
    assert transport.disconnecting


def test_a_request_sent_byte_by_byte_is_cut_off_at_request_timeout(manager):
    """Slowloris: a byte every 10 s keeps the idle timeout away, but the whole request must be in within 30 s: 408, close."""
    m = manager()
    assert m.settings.request_timeout == 30 and m.settings.idle_connection_timeout == 300
    protocol, transport = m.connect()
    start = m.clock.seconds()
    for byte in LOGIN_HEAD[:3]:
        protocol.dataReceived(bytes([byte]))
        m.clock.advance(9.9)
    assert m.clock.seconds() - start < 30 and transport.value() == b"" and not transport.disconnecting
    protocol.dataReceived(LOGIN_HEAD[3:4])
    m.clock.advance(30 - (m.clock.seconds() - start))
    assert HTTPResult(transport.value()).status == 408
    assert transport.disconnecting and not transport.disconnected
    m.clock.advance(protocol.abortTimeout)
    assert transport.disconnected  # a client that does not close its side is cut off


def test_request_timeout_covers_the_body_too(manager):
    """Headers at once and a declared body that trickles in: 408 at 30 s; the login is never attempted."""
    m = manager()
    protocol, transport = m.connect()
    body = b'{"username": "admin", "password": "admin-pass"}'
    protocol.dataReceived(LOGIN_HEAD + b"Content-Length: %d\r\n\r\n" % len(body))
    for index in range(len(body) - 1):
        protocol.dataReceived(body[index : index + 1])
        m.clock.advance(1)
    assert HTTPResult(transport.value()).status == 408 and transport.disconnecting
    protocol.dataReceived(body[-1:])
    assert transport.value().count(b"HTTP/1.1 ") == 1
    assert m.events() == []


def test_a_connection_that_never_sends_is_aborted_at_request_timeout(manager):
    """Nothing at all in 30 s (a TLS handshake that never ends looks the same here): aborted, nothing written."""
    m = manager()
    protocol, transport = m.connect()
    m.clock.advance(29.9)
    assert not transport.disconnecting
    m.clock.advance(0.1)
    assert transport.disconnected and transport.value() == b""


def test_request_timeout_counts_each_request_of_a_kept_alive_connection_from_its_first_byte(manager):
    """Between requests only idle_connection_timeout applies; a later request gets its own 30 s from its first byte."""
    m = manager()
    protocol, transport = m.connect()
    request = b"GET /health HTTP/1.1\r\nHost: m\r\n\r\n"
    m.clock.advance(29)
    protocol.dataReceived(request)  # a whole first request 29 s after the connection's start
    assert HTTPResult(transport.value()).status == 200
    transport.clear()
    m.clock.advance(200)  # idle, kept alive
    assert not transport.disconnecting
    protocol.dataReceived(request[:10])
    m.clock.advance(29)
    protocol.dataReceived(request[10:])
    assert HTTPResult(transport.value()).status == 200 and not transport.disconnecting
    transport.clear()
    protocol.dataReceived(request[:10])  # a third request that stalls
    m.clock.advance(30)
    assert HTTPResult(transport.value()).status == 408 and transport.disconnecting


@pytest.fixture
def warnings_logged():
    """The texts of log events at level warn while the test runs."""
    from twisted.logger import formatEvent

    seen: list[str] = []

    def observer(event):
        if event.get("log_level") == LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def test_a_request_twisted_cannot_parse_is_refused_like_the_other_limits(manager, warnings_logged):
    """Headers over 16 KiB in all (twisted.web's own 400): a warning line and the security headers, as for 413/414/431."""
    m = manager()
    protocol, transport = m.connect()
    protocol.dataReceived(b"GET /health HTTP/1.1\r\nHost: m\r\n" + b"X-N: " + b"a" * 1000 + b"\r\n" * 1 + (b"X-N: " + b"a" * 1000 + b"\r\n") * 20)
    answer = HTTPResult(transport.value())
    assert answer.status == 400 and transport.disconnecting
    assert answer.header("content-security-policy") and answer.header("x-frame-options") == "DENY"
    assert warnings_logged == ["Web Manager refused a request from 127.0.0.1: 400 Bad Request"]
    protocol, transport = m.connect()
    protocol.dataReceived(b"POST /login HTTP/1.1\r\nHost: m\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n")
    assert HTTPResult(transport.value()).header("x-content-type-options") == "nosniff"  # a 413 has them too


def test_client_input_that_cannot_be_decoded_is_a_400_without_traceback(manager, critical_log):
    """Bad percent-encoding, deeply nested JSON, lone surrogates and too many query fields are 400s, never 500s."""
    m = manager()
    assert m.get("/static/%ff.css").status == 400
    assert m.get("/%ff").status == 400 and m.get("/api/v1/%ff").json() == {"error": "The path is not UTF-8 (percent-encoded)."}
    assert m.get("/login?next=%ff").status == 400
    assert m.get("/login?" + "&".join(f"a{number}=1" for number in range(60))).status == 400
    deep = m.request("POST", "/api/v1/login", b"[" * 10000 + b"]" * 10000, content_type="application/json")
    assert deep.status == 400 and "not JSON" in deep.json()["error"]
    m.login()
    token = {"X-CSRF-Token": m.csrf_token()}
    path = m.post_json("/api/v1/authentications/%ff/verify_connection", {}, headers=token)
    assert path.status == 400 and "UTF-8" in path.json()["error"]
    assert m.post_form("/authentications/%ff/verify_connection", {"csrf_token": token["X-CSRF-Token"]}).status == 400
    surrogate = m.request(
        "POST", "/api/v1/test_login", b'{"username": "\\udc80", "password": "x"}', headers=token, content_type="application/json"
    )
    assert surrogate.status == 400
    assert critical_log == []


def test_ldap_administrator_with_totp_types_password_and_code(manager):
    """When the LDAP method has the TOTP extension, a Web Manager login needs the code too, once."""
    import pyotp
    from twisted.internet import task

    from ldap_fake import PEOPLE, FakeDirectory, configuration, make_method

    secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    uri = f"otpauth://totp/Srv:alice?secret={secret}&issuer=Srv"
    clock = task.Clock()
    clock.advance(56_666_667 * 30 + 10)
    directory = FakeDirectory(clock)
    directory.add(f"uid=alice,{PEOPLE}", "alice-pass", uid="alice", totpSharedSecret=uri)
    directory.hidden_from_owner = {"totpsharedsecret"}
    method = make_method(directory, configuration())
    section = LDAP_METHOD.replace("[authentications/ldap]", "[authentications/directory]")
    m = manager(extra=section, methods={"directory": method}, manager_options="authentications = DEFAULT-AUTHENTICATION, directory")
    code = pyotp.parse_uri(uri).generate_otp(56_666_667)
    assert m.login("alice", "alice-pass").status == 401
    assert m.events()[-1]["reason"].startswith("totp-")
    assert m.login("alice", "alice-pass" + code).status == 303
    assert m.get("/api/v1/session").json()["username"] == "alice"
    m.cookies.clear()
    assert m.login("alice", "alice-pass" + code).status == 401
    assert m.events()[-1]["reason"] == "totp-replayed"
    assert code not in (m.folder / "audit.jsonl").read_text()


def test_health_reports_failing_and_degraded_states():
    """A stopped service makes /health "failing" (503); an LDAP method with every server down "degraded"."""
    from sftpauth.auth.ldap.client import DOWN, ServerAddress, ServerState
    from sftpauth.config.loader import parse_configuration
    from sftpauth.manager.views import health_report

    class Pool:
        def states(self):
            return (ServerState(ServerAddress("ldap1", 389), DOWN, 1.0, "connection refused", None, 1.0, None),)

    configuration = parse_configuration("[services/web]\ntype = manager\nport = 8443\n", "/x.ini", "/", {})
    assert health_report(configuration, {}, {"web": "stopped"})["status"] == "failing"
    degraded = health_report(configuration, {"ldap": Pool()}, {"web": "running"})
    assert degraded["status"] == "degraded"
    assert degraded["ldap"]["ldap"] == {"servers": [{"address": "ldap1:389", "status": "down", "latency_ms": None}], "up": 0, "total": 1}
    assert "connection refused" not in str(degraded)


def test_health_says_when_redis_is_down():
    """With state = redis://, /health shows the connection's state; down is "degraded" (TOTP logins are refused)."""
    from twisted.internet.task import Clock

    from sftpauth.config.loader import parse_configuration
    from sftpauth.manager.views import health_report
    from sftpauth.state import build_state

    configuration = parse_configuration("[services/web]\ntype = manager\nport = 8443\n", "/x.ini", "/", {})
    state = build_state("redis://10.0.0.5:6379/2", Clock())
    report = health_report(configuration, {}, {"web": "running"}, state)
    assert (report["status"], report["shared_state"]) == ("ok", {"url": "redis://10.0.0.5:6379/2", "status": "connecting"})
    state.connection.status = state.connection.DOWN
    report = health_report(configuration, {}, {"web": "running"}, state)
    assert (report["status"], report["shared_state"]["status"]) == ("degraded", "down")
    state.connection.status = state.connection.REFUSING  # QA: a read-only replica refused every write, /health said ok
    report = health_report(configuration, {}, {"web": "running"}, state)
    assert (report["status"], report["shared_state"]["status"]) == ("degraded", "refusing")
    assert "shared_state" not in health_report(configuration, {}, {"web": "running"}, build_state("memory", Clock()))


def test_head_and_services_api(manager):
    """HEAD /health answers headers only; GET /api/v1/services lists address, port and state."""
    m = manager()
    head = m.request("HEAD", "/health")
    assert head.status == 200 and head.body == b""
    m.login()
    (service,) = m.get("/api/v1/services").json()["services"]
    assert (service["id"], service["type"], service["port"], service["state"]) == ("manager", "manager", 10443, "running")
    assert service["authentications"] == ["DEFAULT-AUTHENTICATION"]


def test_failed_test_logins_are_limited_per_administrator(manager):
    """Test logins count toward no ban (no client address): after 10 failures in 10 minutes an administrator gets 429."""
    m = manager()
    token = m.post_json("/api/v1/login", {"username": "admin", "password": "admin-pass"}).json()["csrf_token"]

    def test_login(password: str):
        return m.post_json(
            "/api/v1/test_login", {"username": "ftpuser", "password": password}, headers={"X-CSRF-Token": token}
        )

    assert test_login("ftp-pass").json()["accepted"] is True  # successes do not count
    for attempt in range(10):
        assert test_login(f"guess-{attempt}").json()["reason"] == "invalid-password"
    refused = test_login("ftp-pass")
    assert refused.status == 429 and "10 failed test logins in the last 10 minutes" in refused.json()["error"]
    assert refused.reason == "Too Many Requests"  # Twisted alone sends "Unknown Status"
    tests = [event for event in m.events("manager-action") if event["action"] == "test-login"]
    # QA, session 29: the refused one (it ran no login) is audited too, so an auditor sees the guessing stop
    assert [event.get("reason") for event in tests] == [None] * 11 + ["rate-limited"]
    assert tests[-1]["outcome"] == "failure" and tests[-1]["target"] == "ftpuser" and tests[-1]["username"] == "admin"
    m.clock.advance(599)
    assert test_login("ftp-pass").status == 429
    m.clock.advance(2)  # the ten failures are now older than the window
    assert test_login("ftp-pass").json()["accepted"] is True
    assert test_login("guess-again").json()["reason"] == "invalid-password"
    assert test_login("ftp-pass").json()["accepted"] is True  # one failure in the window


class PendingMethod:
    """A method whose logins wait until the test fails them (test logins running side by side)."""

    def __init__(self, method_id: str):
        self.id = method_id
        self.waiting: list[defer.Deferred] = []

    async def authenticate(self, request):
        waiting = defer.Deferred()
        self.waiting.append(waiting)
        await waiting
        raise LoginFailed("invalid-password", "wrong password")


def test_test_logins_run_side_by_side_cannot_pass_the_failure_limit(manager):
    """Each running test login counts until it succeeds: 30 sent at once run 10, the rest are 429."""
    method = PendingMethod("ldap")
    m = manager(extra=LDAP_METHOD, methods={"ldap": method})
    token = m.post_json("/api/v1/login", {"username": "admin", "password": "admin-pass"}).json()["csrf_token"]
    body = json.dumps({"username": "someone", "password": "guess", "authentication": "ldap"}).encode()
    cookie = "; ".join(f"{name}={value}" for name, value in m.cookies.items())
    transports = []
    for _ in range(30):
        protocol, transport = m.connect()
        protocol.dataReceived(
            b"POST /api/v1/test_login HTTP/1.1\r\nHost: manager.example\r\nConnection: close\r\n"
            + f"Cookie: {cookie}\r\nX-CSRF-Token: {token}\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        transports.append(transport)
    assert len(method.waiting) == 10
    assert sum(b" 429 " in transport.value().split(b"\r\n", 1)[0] for transport in transports) == 20
    for waiting in method.waiting:
        waiting.callback(None)
    assert m.post_json(
        "/api/v1/test_login", {"username": "ftpuser", "password": "ftp-pass"}, headers={"X-CSRF-Token": token}
    ).status == 429
    page = m.post_form("/test-login", {"csrf_token": token, "username": "ftpuser", "password": "ftp-pass"})
    assert page.status == 429 and "<h1>Too Many Requests " in page.text  # not "Bad request"


def test_a_wrong_password_costs_a_hash_check_whether_or_not_the_administrator_exists(manager, monkeypatch):
    """QA: 'admin' answered in ~150 ms and 'nosuchadmin' in ~10 ms, which told the local administrators'
    names. An unknown name is now checked against an administrator's hash too (its answer ignored)."""
    from sftpauth.auth import administrators

    checked = []
    real = administrators.verify_password
    monkeypatch.setattr(administrators, "verify_password", lambda stored, password: checked.append(stored) or real(stored, password))
    m = manager()
    assert m.post_json("/api/v1/login", {"username": "nosuchadmin", "password": "admin-pass"}).status == 401
    assert len(checked) == 1 and checked[0].startswith("$argon2")
    assert m.events()[-1]["outcome"] == "failure"


def test_a_disabled_or_passwordless_administrator_costs_a_hash_check_too(manager, monkeypatch):
    """QA: a disabled administrator was refused in ~5 ms where any other name took ~150 ms, which told that
    the name is a disabled administrator's. Its hash (or another administrator's when it has none) is
    checked first, the answer ignored; the audit reason stays exact."""
    from sftpauth.auth import application

    checked = []
    real = application.verify_password
    monkeypatch.setattr(application, "verify_password", lambda stored, password: checked.append(stored) or real(stored, password))
    m = manager(extra="""
        [administrators/off]
        enabled = no
        password = $argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$0iQ6Dp5x6yQ0tJQ2m0YJ4g
        [administrators/empty]
        roles = DEFAULT-ROLE
        """)
    assert m.post_json("/api/v1/login", {"username": "off", "password": "admin-pass"}).status == 401
    assert m.events()[-1]["reason"] == "account-disabled"
    assert m.post_json("/api/v1/login", {"username": "empty", "password": "admin-pass"}).status == 401
    assert m.events()[-1]["reason"] == "no-password"
    assert len(checked) == 2 and checked[0].startswith("$argon2id$v=19$m=8") and checked[1].startswith("$argon2")


def test_an_access_line_keeps_at_most_200_characters_of_each_field_a_client_chooses():
    """QA, session 29: every request, a refused one too, wrote its whole path (up to 16 KiB), Referer and User-Agent
    to the log, so any client could fill the log at network speed; docs/manager.rst said "nothing in the log"."""
    from twisted.internet.address import IPv4Address
    from twisted.web.test.requesthelper import DummyRequest

    from sftpauth.manager.service import ACCESS_FIELD_LIMIT, access_line

    request = DummyRequest([b""])
    request.uri = b"/login?" + b"a" * 16000
    request.method = b"GET"
    request.clientproto = b"HTTP/1.1"
    request.code = 400
    request.sentLength = 0
    request.client = IPv4Address("TCP", "127.0.0.9", 4242)
    request.requestHeaders.setRawHeaders(b"user-agent", [b'say "hi"\x01' + b"x" * 5000])
    line = access_line("[24/Nov/2026:20:00:00 +0000]", request)
    assert line.startswith('"127.0.0.9" - - [24/Nov/2026:20:00:00 +0000] "GET /login?aaa')
    assert len(line) < 4 * ACCESS_FIELD_LIMIT + 100
    assert '"/login?' not in line and " 400 - " in line
    assert 'say \\"hi\\"\\x01xxx' in line and line.endswith('..."')
    assert '"-"' in line  # no Referer
    # ...and it is the line the Web Manager's site writes
    from io import StringIO

    from twisted.internet.task import Clock
    from twisted.web.resource import Resource

    from sftpauth.manager.service import ManagerSite

    site = ManagerSite(Resource(), reactor=Clock())
    site._logFile, site._logDateTime = StringIO(), "[24/Nov/2026:20:00:00 +0000]"
    site.log(request)
    assert site._logFile.getvalue() == line + "\n"
