"""The Web Manager's HTTP resource: routes, sessions, CSRF, roles and headers in one place.

Every request goes through :meth:`ManagerApp.handle`: security headers,
route lookup, the session cookie, header pre-authentication, the login
requirement, the CSRF token of every POST and the role check of every
action, and only then the handler. Handlers return a :class:`Response`;
pages are Jinja2 templates with autoescaping, the API under ``/api/v1/``
answers JSON with the same sessions and CSRF rules.
"""

from __future__ import annotations

import collections
import json
import os
import re
import time
import unicodedata
import urllib.parse
from http import HTTPStatus
from typing import Any, Callable, Optional

import attrs
from jinja2 import Environment, PackageLoader, select_autoescape
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from sftpauth import __version__
from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.policy import RepeatThrottle, plain_address
from sftpauth.auth.trace import Trace
from sftpauth.config.models import LDAPAuthenticationSettings, ManagerServiceSettings
from sftpauth.manager import csrf, preauth
from sftpauth.manager.events import KINDS, MAX_EVENTS, OUTCOMES, AuditHistory, clamp_limit
from sftpauth.manager.metrics import CONTENT_TYPE, ManagerMetrics
from sftpauth.manager.sessions import ManagerSession, SessionStore, TooManySessions, effective_roles
from sftpauth.manager.views import build_chart, health_report, ldap_overview, service_overview

_log = Logger()

SESSION_COOKIE = b"__Host-sftpauth-session"
LOGIN_COOKIE = b"__Host-sftpauth-login"
MAX_BODY = 64 * 1024
STATIC_FOLDER = os.path.join(os.path.dirname(__file__), "static")
STATIC_TYPES = {".css": b"text/css; charset=utf-8", ".svg": b"image/svg+xml"}
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    b"frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    b"content-security-policy": CONTENT_SECURITY_POLICY,
    b"x-frame-options": b"DENY",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cross-origin-opener-policy": b"same-origin",
    b"cross-origin-resource-policy": b"same-origin",
    # HTTPS only: a browser that once reached the manager by its name never tries it in plain HTTP
    b"strict-transport-security": b"max-age=31536000",
    b"server": b"sftpauth",
}
LOGIN_FAILED = "Login failed: wrong username or password, or this account may not use the Web Manager."
PREAUTH_METHOD = "header-authentication"


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(value: Any) -> str:
    """Text a client chose (a username, a detail quoting it), with what does not print shown as ``\\xNN``/``\\uNNNN``.

    The audit log keeps it exactly (JSON escapes); on a page a NUL, a line
    break, a zero-width space or a right-to-left override would be
    invisible, and ``alice\\x00`` or ``r\\u200boot`` would pass for alice or root.
    Spaces print; other separators (a no-break space) are shown escaped.
    """
    text = "" if value is None else str(value)
    if text.replace(" ", "").isprintable():
        return text
    return "".join(char if char == " " or char.isprintable() else _escaped(char) for char in text)


@attrs.define
class Response:
    status: int = 200
    body: bytes = b""
    content_type: bytes = b"text/html; charset=utf-8"
    headers: dict[bytes, bytes] = attrs.Factory(dict)
    cacheable: bool = False


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value, ensure_ascii=False, indent=1).encode("utf-8") + b"\n", b"application/json")


def redirect(location: str, status: int = 303) -> Response:
    return Response(status, b"", headers={b"location": location.encode("utf-8")})


@attrs.frozen
class Route:
    method: bytes
    pattern: re.Pattern
    handler: str
    login: bool = True  # a session is required
    action: str = ""  # the manager-action it runs (read-only roles may not): "test-login", "verify-connection"
    api: bool = False  # JSON errors instead of pages and redirects
    csrf: str = "session"  # POST check: "session" token, "login" double-submit cookie, "json" content type


def _route(method: str, path: str, handler: str, **options) -> Route:
    pattern = re.compile("^" + re.sub(r"<(\w+)>", r"(?P<\1>[^/]+)", path) + "$")
    return Route(method.encode("ascii"), pattern, handler, **options)


ROUTES = (
    _route("GET", "/health", "health", login=False),
    _route("GET", "/metrics", "metrics_page", login=False),
    _route("GET", "/static/<name>", "static", login=False),
    _route("GET", "/login", "login_page", login=False),
    _route("POST", "/login", "login_form", login=False, csrf="login"),
    _route("POST", "/logout", "logout"),
    _route("GET", "/", "dashboard"),
    _route("GET", "/authentications", "authentications_page"),
    _route("POST", "/authentications/<method_id>/verify_connection", "verify_page", action="verify-connection"),
    _route("GET", "/test-login", "test_login_page"),
    _route("POST", "/test-login", "test_login_form", action="test-login"),
    _route("GET", "/events", "events_page"),
    _route("POST", "/api/v1/login", "api_login", login=False, api=True, csrf="json"),
    _route("POST", "/api/v1/logout", "api_logout", api=True),
    _route("GET", "/api/v1/session", "api_session", api=True),
    _route("GET", "/api/v1/services", "api_services", api=True),
    _route("GET", "/api/v1/authentications", "api_authentications", api=True),
    _route("POST", "/api/v1/authentications/<method_id>/verify_connection", "api_verify", api=True,
           action="verify-connection"),
    _route("POST", "/api/v1/test_login", "api_test_login", api=True, action="test-login"),
    _route("GET", "/api/v1/events", "api_events", api=True),
)


@attrs.define
class Call:
    """One request as the handlers see it."""

    request: Any
    peer: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    body_json: Optional[dict]
    params: dict[str, str]
    session: Optional[ManagerSession] = None
    session_ended: bool = False  # the cookie named a session that is gone (expired, logged out)

    def field(self, name: str) -> str:
        if self.body_json is not None:
            value = self.body_json.get(name, "")
            return value if isinstance(value, str) else ""
        return self.form.get(name, "")

    def flag(self, name: str) -> bool:
        """A checkbox of a form, or a JSON boolean (absent is false; ``"yes"`` or ``1`` is a 400, not false)."""
        if self.body_json is not None:
            value = self.body_json.get(name, False)
            if not isinstance(value, bool):
                raise BadRequest(f'"{name}" must be true or false')
            return value
        return self.form.get(name, "") in ("on", "yes", "1", "true")


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# Failed test logins an administrator may run in TEST_LOGIN_WINDOW seconds: enough to diagnose a
# login, too few to guess passwords with (a test login counts toward no ban: it has no client address).
TEST_LOGIN_FAILURES = 10
TEST_LOGIN_WINDOW = 600


class ManagerApp:
    """The Web Manager of one ``[services/ID] type = manager``."""

    def __init__(
        self,
        settings: ManagerServiceSettings,
        runtime,
        sessions: SessionStore,
        metrics: ManagerMetrics,
        history: AuditHistory,
        service_states: Callable[[], dict[str, str]] = dict,
        verify: Optional[Callable] = None,
        certificate_fingerprint: str = "",
    ):
        self.settings = settings
        self.runtime = runtime
        self.configuration = runtime.configuration
        self.sessions = sessions
        self.metrics = metrics
        self.history = history
        self.service_states = service_states
        self.certificate_fingerprint = certificate_fingerprint
        if verify is None:
            from sftpauth.auth.ldap.verify import verify_method

            verify = verify_method
        self._verify = verify
        self._test_failures: dict[str, collections.deque[float]] = {}  # administrator: times of failed test logins
        # Headers from where they are not honoured; the last of a run of them in a summary.
        self._ignored_preauth = RepeatThrottle(runtime.reactor, summarise=self._preauth_not_audited)
        self.templates = Environment(
            loader=PackageLoader("sftpauth.manager", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["visible"] = visible

    # -- the pipeline ------------------------------------------------------------------

    async def handle(self, request) -> Response:
        path = request.path.decode("utf-8", "replace")
        try:
            urllib.parse.unquote_to_bytes(request.path).decode("utf-8")
        except UnicodeDecodeError:  # checked once here, for every route and for pages that do not exist
            return self._error(path.startswith("/api/"), 400, "Bad request", "The path is not UTF-8 (percent-encoded).")
        matched = None
        allowed = []
        for route in ROUTES:
            match = route.pattern.match(path)
            if match:
                allowed.append(route.method)
                if route.method == request.method or (route.method == b"GET" and request.method == b"HEAD"):
                    matched = (route, match)
                    break
        if matched is None:
            if allowed:
                methods = ", ".join(method.decode("ascii") for method in allowed)
                refused = self._error(path.startswith("/api/"), 405, "Method not allowed", f"This address takes {methods} only.")
                refused.headers[b"allow"] = methods.encode("ascii")
                return refused
            return self._error(path.startswith("/api/"), 404, "Not found", "There is no such page.")
        route, match = matched
        try:
            call = self._call(request, path, route, match)
        except BadRequest as error:
            return self._error(route.api, error.status, HTTPStatus(error.status).phrase, str(error))
        cookie = request.getCookie(SESSION_COOKIE)
        cookie_id = cookie.decode("ascii", "replace") if cookie else None
        call.session = self.sessions.get(cookie_id)
        call.session_ended = bool(cookie_id) and call.session is None
        if preauth.present(request) and route.handler != "static":
            problem = self._pre_authenticate(call)
            if problem is not None:
                return problem
        if route.login and call.session is None:
            if route.api:
                return json_response({"error": "login required"}, 401)
            if route.method == b"GET":
                return redirect("/login?" + urllib.parse.urlencode({"next": path}))
            return redirect("/login")
        if request.method == b"POST":
            problem = self._check_csrf(call, route)
            if problem is not None:
                return problem
        if route.action and not call.session.can_act:
            self._record_action(call, route.action, self._action_target(call, route.action), "failure",
                                reason="read-only-role", detail="the administrator's roles cannot run actions")
            return self._error(
                route.api, 403, "Not allowed", "Your role is read-only: it can look at everything but cannot run actions."
            )
        return await getattr(self, route.handler)(call)

    def _call(self, request, path: str, route: Route, match: re.Match) -> Call:
        """The request's query, body and path parameters, parsed; BadRequest for anything a client got wrong."""
        try:
            parsed_query = urllib.parse.parse_qs(
                request.uri.partition(b"?")[2].decode("utf-8"), keep_blank_values=True, max_num_fields=50, errors="strict"
            )
        except UnicodeDecodeError:
            raise BadRequest("the query is not UTF-8 (percent-encoded)") from None
        except ValueError:
            raise BadRequest("the query has too many parameters") from None
        query = {key: values[0] for key, values in parsed_query.items()}
        form: dict[str, str] = {}
        body_json = None
        if request.method == b"POST":
            request.content.seek(0)
            body = request.content.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                raise BadRequest("the request body is too large", 413)
            content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest("the request body is not UTF-8") from None
            if content_type == b"application/json":
                try:
                    body_json = json.loads(text) if text.strip() else {}
                    # JSON escapes can make lone surrogates (\udc80), which no answer could echo as UTF-8.
                    json.dumps(body_json, ensure_ascii=False).encode("utf-8")
                except (ValueError, RecursionError):  # RecursionError: nested too deep
                    raise BadRequest("the request body is not JSON") from None
                if not isinstance(body_json, dict):
                    raise BadRequest("the request body must be a JSON object")
            elif content_type == b"application/x-www-form-urlencoded":
                try:
                    parsed = urllib.parse.parse_qs(text, keep_blank_values=True, max_num_fields=50, errors="strict")
                except (ValueError, UnicodeDecodeError):
                    raise BadRequest("the form is malformed") from None
                form = {key: values[0] for key, values in parsed.items()}
        params = {name: urllib.parse.unquote(value, errors="strict") for name, value in match.groupdict().items()}  # UTF-8: handle()
        return Call(request, _peer(request), path, query, form, body_json, params)

    def _check_csrf(self, call: Call, route: Route) -> Optional[Response]:
        request = call.request
        if route.csrf == "json":
            # A cross-site page cannot send application/json without a CORS preflight, which is never allowed.
            if call.body_json is None:
                return json_response({"error": "send a JSON object (Content-Type: application/json)"}, 415)
            return None
        if route.csrf == "login":
            cookie = request.getCookie(LOGIN_COOKIE)
            expected = cookie.decode("ascii", "replace") if cookie else None
        else:
            expected = call.session.csrf_token if call.session is not None else None
        header = request.getHeader(csrf.HEADER)
        given = header.decode("ascii", "replace") if header else call.field(csrf.FORM_FIELD)
        if csrf.token_matches(expected, given):
            return None
        _log.warn(
            "Web Manager {service}: refused a POST to {path} from {peer}: missing or wrong CSRF token",
            service=self.settings.id, path=call.path, peer=call.peer,
        )
        if route.csrf == "login":
            return self._login_response(call, "The login form expired. Please try again.", status=403)
        return self._error(
            route.api, 403, "Form expired", "The form expired or did not come from this Web Manager: reload the page and try again.",
            api_message="missing or wrong CSRF token (X-CSRF-Token header or csrf_token field)",
        )


    def _audit_preauth_refusal(self, call, reason: str, detail: str, **fields) -> None:
        """A pre-authentication attempt that was not honoured is an authentication failure in the audit log."""
        self.runtime.audit.record(
            "authentication",
            service=self.settings.id,
            protocol="manager",
            peer=call.peer,
            username=preauth.claimed_username(call.request),
            method=PREAUTH_METHOD,
            outcome="failure",
            reason=reason,
            detail=detail,
            **fields,
        )

    def _preauth_not_audited(self, key: tuple[str, str, str], repeats: int) -> None:
        """The ignored pre-authentication headers since the last event, once its minute is over and none followed."""
        service_id, peer, reason = key
        self.runtime.audit.record(
            "authentication", service=service_id, protocol="manager", peer=peer, method=PREAUTH_METHOD,
            outcome="failure", reason=reason, repeats=repeats, summary=True,  # no attempt of its own
        )
        _log.warn("Web Manager {service}: requests from {peer} since the last such line: {repeats} more with "
                  "pre-authentication headers ignored ({reason})", service=service_id, repeats=repeats, peer=peer, reason=reason)

    def stop(self) -> None:
        """The service is stopping: the ignored headers not audited yet are, now."""
        self._ignored_preauth.stop()

    def _local_administrator_name(self, username: str) -> Optional[LoginFailed]:
        """A refusal when a pre-authenticated name is that of an [administrators/..] (any case or width).

        Its session would pass for the local administrator's in the audit
        log and the test-login limits, with the proxy's role, and a disabled
        administrator's name would get in.
        """
        claimed = unicodedata.normalize("NFKC", username).casefold()
        for administrator in self.configuration.administrators.values():
            if unicodedata.normalize("NFKC", administrator.username).casefold() == claimed:
                return LoginFailed(
                    "preauth-administrator",
                    f"{username!r} is the name of the local [administrators/{administrator.id}]: "
                    "header pre-authentication cannot open its session",
                )
        return None

    def _pre_authenticate(self, call: Call) -> Optional[Response]:
        """Honour ``preauth-*`` headers only from a trusted proxy with header_authentication = yes."""
        settings = self.settings
        request = call.request
        audit = self.runtime.audit
        if not settings.header_authentication or not settings.is_trusted_proxy(call.peer):
            if not settings.header_authentication:
                reason, detail = "preauth-disabled", "header_authentication = no: pre-authentication headers ignored"
            else:
                reason, detail = "preauth-untrusted", f"{call.peer} is not in trusted_proxies: pre-authentication headers ignored"
            # Ignored, so the request goes on as without them: audited and logged once a minute per address.
            repeats = self._ignored_preauth.due((settings.id, call.peer, reason))
            if repeats is not None:
                self._audit_preauth_refusal(call, reason, detail, repeats=repeats)
                _log.warn("Web Manager {service}: request from {peer}: {detail}{more}", service=settings.id, peer=call.peer,
                          detail=detail, more=f" ({repeats} more since the last such line)" if repeats else "")
            return None
        try:
            claim = preauth.read(request)
        except preauth.InvalidPreAuthentication as error:
            self._audit_preauth_refusal(call, "preauth-invalid", str(error))
            return self._error(call.path.startswith("/api/"), 400, "Bad request", f"Invalid pre-authentication header: {error}")
        if claim is None:
            return None
        session = call.session
        if session is not None and session.source == "header" and session.username == claim.username:
            return None
        # The proxy vouches for who the user is, not for whether sftpauth lets them in.
        policy = self.runtime.policy_for(settings)
        denied = policy.denied_username(claim.username, manager=True) if policy is not None else None
        if denied is None:
            denied = self._local_administrator_name(claim.username)
        if denied is not None:
            if session is not None:
                self.sessions.close(session, "replaced")
                call.session = None
            self._audit_preauth_refusal(call, denied.reason, denied.explanation)
            return self._error(call.path.startswith("/api/"), 403, "Not allowed", "This account may not use the Web Manager.")
        if session is not None:
            self.sessions.close(session, "replaced")
        roles, can_act = effective_roles(self.configuration, (settings.header_authentication_role,))
        provider = f" ({claim.provider})" if claim.provider else ""
        audit.record(
            "authentication",
            service=settings.id,
            protocol="manager",
            peer=call.peer,
            username=claim.username,
            method=PREAUTH_METHOD,
            outcome="success",
            reason="",
            detail=f"pre-authenticated by the trusted proxy {call.peer}{provider}",
        )
        try:
            call.session = self._open_session(
                call,
                claim.username,
                roles,
                can_act,
                PREAUTH_METHOD,
                source="header",
                email=claim.email,
                full_name=claim.full_name,
                provider=claim.provider,
            )
        except TooManySessions:
            call.session = None
            return self._too_many_sessions(call)
        call.session_ended = False
        _set_cookie(request, SESSION_COOKIE, call.session.id)
        return None

    # -- rendering ---------------------------------------------------------------------------

    def render(self, call: Call, template: str, status: int = 200, **context) -> Response:
        session = call.session
        context.update(
            session=session,
            csrf_token=session.csrf_token if session else "",
            can_act=bool(session and session.can_act),
            server_name=self.configuration.server.name,
            service=self.settings,
            version=__version__,
            path=call.path,
        )
        body = self.templates.get_template(template).render(**context)
        return Response(status, body.encode("utf-8"))

    def _error(self, api: bool, status: int, title: str, message: str, api_message: str = "") -> Response:
        if api:
            return json_response({"error": api_message or message}, status)
        body = self.templates.get_template("error.html").render(
            title=title, message=message, status=status, server_name=self.configuration.server.name, session=None,
            version=__version__, path="",
        )
        return Response(status, body.encode("utf-8"))

    # -- public endpoints -------------------------------------------------------------------------

    async def health(self, call: Call) -> Response:
        report = health_report(self.configuration, self.runtime.ldap_pools, self.service_states(), self.runtime.state)
        return json_response(report, 200 if report["status"] != "failing" else 503)

    async def metrics_page(self, call: Call) -> Response:
        if self.settings.metrics_require_login and call.session is None:
            return Response(
                401, b"log in first (metrics_require_login = yes)\n", b"text/plain; charset=utf-8",
            )
        return Response(200, self.metrics.render(), CONTENT_TYPE.encode("ascii"))

    async def static(self, call: Call) -> Response:
        name = call.params["name"]
        extension = os.path.splitext(name)[1]
        if extension not in STATIC_TYPES or name not in os.listdir(STATIC_FOLDER):
            return Response(404, b"not found\n", b"text/plain; charset=utf-8")
        data = await self.runtime.run_in_thread(_read_file, os.path.join(STATIC_FOLDER, name))
        return Response(200, data, STATIC_TYPES[extension], cacheable=True)

    # -- login and logout -------------------------------------------------------------------------

    def _login_response(self, call: Call, error: str = "", status: int = 200, username: str = "") -> Response:
        token = csrf.new_token()
        _set_cookie(call.request, LOGIN_COOKIE, token)
        next_path = _safe_next(call.form.get("next") or call.query.get("next", ""))
        notice = ""
        if call.session_ended and not error:
            notice = "Your session has ended. Please log in again."
        call.session = None
        return self.render(
            call, "login.html", status, login_token=token, error=error, notice=notice, username=username, next_path=next_path
        )

    async def login_page(self, call: Call) -> Response:
        if call.session is not None:
            return redirect(_safe_next(call.query.get("next", "")))
        return self._login_response(call)

    async def _authenticate(self, call: Call, username: str, password: str) -> Optional[ManagerSession]:
        """The manager-mode login through the one authentication chain; a new session or None."""
        request = LoginRequest(
            username=username,
            password=password,
            service_id=self.settings.id,
            protocol="manager",
            peer=call.peer,
            manager=True,
        )
        # Bans, denied usernames and the audit event are the chain's: the same as FTP and SFTP logins.
        try:
            account = await self.runtime.chain.login(request)
        except LoginFailed:
            return None
        if call.session is not None:
            self.sessions.close(call.session, "replaced")
            call.session = None
        roles, can_act = effective_roles(self.configuration, account.roles)
        session = self._open_session(
            call, account.username, roles, can_act, account.method_id, email=account.email, full_name=account.full_name
        )
        _set_cookie(call.request, SESSION_COOKIE, session.id)
        call.session = session
        return session

    def _open_session(self, call: Call, username: str, roles, can_act: bool, method: str, **extra) -> ManagerSession:
        """A new session for a login that succeeded; TooManySessions (logged) when the store is full."""
        try:
            return self.sessions.open(username, roles, can_act, method, call.peer, **extra)
        except TooManySessions as error:
            _log.warn(
                "Web Manager {service}: {username} from {peer} logged in, but no session was opened: {error}",
                service=self.settings.id, username=visible(username), peer=call.peer, error=str(error),
            )
            raise

    def _too_many_sessions(self, call: Call) -> Response:
        return self._error(
            call.path.startswith("/api/"), 503, "Too many sessions",
            "The Web Manager has too many open sessions. Please try again later.",
            api_message="too many open Web Manager sessions: try again later",
        )

    async def login_form(self, call: Call) -> Response:
        username = call.field("username")
        try:
            session = await self._authenticate(call, username, call.field("password"))
        except TooManySessions:
            return self._too_many_sessions(call)
        if session is None:
            return self._login_response(call, LOGIN_FAILED, status=401, username=username)
        _expire_cookie(call.request, LOGIN_COOKIE)
        return redirect(_safe_next(call.field("next")))

    async def logout(self, call: Call) -> Response:
        self.sessions.close(call.session, "logout")
        _expire_cookie(call.request, SESSION_COOKIE)
        return redirect("/login?logged_out=1")

    # -- pages ---------------------------------------------------------------------------------------

    async def dashboard(self, call: Call) -> Response:
        series = self.metrics.logins_per_minute()
        return self.render(
            call,
            "dashboard.html",
            services=service_overview(self.configuration, self.service_states()),
            methods=ldap_overview(self.configuration, self.runtime.ldap_pools, self.runtime.reactor.seconds()),
            chart=build_chart(series),
            accepted=sum(item[1] for item in series),
            refused=sum(item[2] for item in series),
            manager_sessions=len(self.sessions),
            bans=self.metrics.bans_in_force() or 0,
            fingerprint=self.certificate_fingerprint,
            active="dashboard",
        )

    def _ldap_methods(self) -> dict[str, LDAPAuthenticationSettings]:
        return {
            method_id: settings
            for method_id, settings in self.configuration.authentications.items()
            if isinstance(settings, LDAPAuthenticationSettings)
        }

    async def authentications_page(self, call: Call, report=None, report_method: str = "") -> Response:
        return self.render(
            call,
            "authentications.html",
            methods=ldap_overview(self.configuration, self.runtime.ldap_pools, self.runtime.reactor.seconds()),
            others=[
                settings for settings in self.configuration.authentications.values()
                if not isinstance(settings, LDAPAuthenticationSettings)
            ],
            report=report,
            report_method=report_method,
            active="authentications",
        )

    async def _run_verify(self, call: Call, method_id: str):
        settings = self._ldap_methods().get(method_id)
        if settings is None:
            raise BadRequest(f"no LDAP authentication method {method_id!r}", 404)
        started = time.monotonic()
        report = await self._verify(settings, self.runtime.reactor)
        self._record_action(
            call, "verify-connection", method_id, "success" if not report.failures else "failure",
            detail=f"{report.failures} check(s) failed" if report.failures else "every check passed",
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return report

    def _record_action(self, call: Call, action: str, target: str, outcome: str, **fields) -> None:
        """One ``manager-action`` audit event: who ran (or tried) what, on what, and how it ended."""
        self.runtime.audit.record(
            "manager-action",
            service=self.settings.id,
            protocol="manager",
            peer=call.peer,
            username=call.session.username,
            action=action,
            target=target,
            outcome=outcome,
            **fields,
        )

    @staticmethod
    def _action_target(call: Call, action: str) -> str:
        return call.field("username") if action == "test-login" else call.params.get("method_id", "")

    async def verify_page(self, call: Call) -> Response:
        try:
            report = await self._run_verify(call, call.params["method_id"])
        except BadRequest as error:
            return self._error(False, error.status, "Not found", str(error))
        return await self.authentications_page(call, report=report, report_method=call.params["method_id"])

    def _test_login_form_context(self) -> dict:
        return {
            "methods": list(self.configuration.authentications),
            "chain": ", ".join(self.configuration.server.authentications),
            "manager_chain": ", ".join(self.configuration.authentications_for(self.settings)),
        }

    async def test_login_page(self, call: Call) -> Response:
        return self.render(
            call, "test_login.html", outcome=None, username="", manager=False, method="", active="test-login",
            **self._test_login_form_context(),
        )

    def _recent_test_failures(self, administrator: str) -> collections.deque[float]:
        """The times of ``administrator``'s failed (or running) test logins within the window; older ones dropped."""
        cutoff = self.runtime.reactor.seconds() - TEST_LOGIN_WINDOW
        for name in [name for name, times in self._test_failures.items() if not times or times[-1] <= cutoff]:
            del self._test_failures[name]  # nobody's old failures are kept
        failures = self._test_failures.setdefault(administrator, collections.deque())
        while failures and failures[0] <= cutoff:
            failures.popleft()
        return failures

    async def _run_test_login(self, call: Call, username: str, password: str, manager: bool, method_id: str) -> dict:
        """Run the real chain once with a trace, as ``sftpauth test-login`` does, and explain it."""
        from sftpauth.cli import result_lines, server_state_lines

        if method_id and method_id not in self.configuration.authentications:
            raise BadRequest(f"no authentication method {method_id!r}; defined: {', '.join(self.configuration.authentications)}")
        administrator = call.session.username
        failures = self._recent_test_failures(administrator)
        if len(failures) >= TEST_LOGIN_FAILURES:
            wait = int(failures[0] + TEST_LOGIN_WINDOW - self.runtime.reactor.seconds()) + 1
            self._record_action(call, "test-login", username, "failure", reason="rate-limited",
                                detail=f"{len(failures)} failed test logins in {TEST_LOGIN_WINDOW // 60} minutes")
            raise BadRequest(
                f"{len(failures)} failed test logins in the last {TEST_LOGIN_WINDOW // 60} minutes: "
                f"try again in {wait} seconds (this limit keeps test logins from guessing passwords)",
                429,
            )
        # Counted as failed until it succeeds, so test logins run side by side cannot pass the limit together.
        started = self.runtime.reactor.seconds()
        failures.append(started)
        trace = Trace()
        request = LoginRequest(
            username=username,
            password=password,
            # A manager-mode test uses this Web Manager's chain; a file-transfer one the [server] chain.
            service_id=self.settings.id if manager else "test-login",
            protocol="test-login",
            peer="",
            manager=manager,
            trace=trace,
            test=True,
        )
        account, failure = None, None
        try:
            account = await self.runtime.chain.login(request, only_method=method_id or None)
        except LoginFailed as error:
            failure = error
        else:
            current = self._test_failures.get(administrator)  # the same deque, unless all of it aged out meanwhile
            if current is not None and started in current:
                current.remove(started)
        method_ids = (method_id,) if method_id else self.runtime.chain.method_ids_for(request)
        self._record_action(call, "test-login", username, "success" if failure is None else "failure",
                            detail="manager mode" if manager else "file transfer mode")
        return {
            "username": username,
            "manager": manager,
            "chain": list(method_ids),
            "accepted": failure is None,
            "reason": failure.reason if failure else "",
            "explanation": failure.explanation if failure else "",
            "steps": [
                {"elapsed_ms": round(step.elapsed * 1000, 1), "method": step.method, "action": step.action, "detail": step.detail}
                for step in trace.steps
            ],
            "result": result_lines(account, failure, manager),
            "servers": server_state_lines(self.runtime, method_ids),
            "account": None
            if account is None
            else {
                "username": account.username,
                "method": account.method_id,
                "dn": account.dn,
                "home_folder": account.home_folder or None,
                "groups": list(account.groups),
                "roles": list(account.roles),
                "email": account.email,
                "full_name": account.full_name,
            },
        }

    async def test_login_form(self, call: Call) -> Response:
        username = call.field("username")
        manager = call.flag("manager")
        method_id = call.field("method")
        try:
            outcome = await self._run_test_login(call, username, call.field("password"), manager, method_id)
        except BadRequest as error:
            return self._error(False, error.status, HTTPStatus(error.status).phrase, str(error))
        return self.render(
            call, "test_login.html", outcome=outcome, username=username, manager=manager, method=method_id,
            active="test-login", **self._test_login_form_context(),
        )

    async def events_page(self, call: Call) -> Response:
        username = call.query.get("username", "")[:256]
        outcome = call.query.get("outcome", "")
        outcome = outcome if outcome in OUTCOMES else ""
        kind = call.query.get("kind", "authentication")
        kind = kind if kind in KINDS else "authentication"
        limit = clamp_limit(call.query.get("limit"))
        events = await self.history.recent(username, outcome, kind, limit)
        return self.render(
            call, "events.html", events=events, username=username, outcome=outcome, kind=kind, limit=limit,
            source=self.runtime.audit.path, active="events",
        )

    # -- JSON API -----------------------------------------------------------------------------------------

    def _session_json(self, session: ManagerSession) -> dict:
        return {
            "username": session.username,
            "full_name": session.full_name,
            "roles": list(session.roles),
            "can_act": session.can_act,
            "method": session.method,
            "csrf_token": session.csrf_token,
            "idle_timeout": self.sessions.idle_timeout,
        }

    async def api_login(self, call: Call) -> Response:
        try:
            session = await self._authenticate(call, call.field("username"), call.field("password"))
        except TooManySessions:
            return self._too_many_sessions(call)
        if session is None:
            return json_response({"error": "login failed"}, 401)
        return json_response(self._session_json(session))

    async def api_logout(self, call: Call) -> Response:
        self.sessions.close(call.session, "logout")
        _expire_cookie(call.request, SESSION_COOKIE)
        return json_response({"logged_out": True})

    async def api_session(self, call: Call) -> Response:
        return json_response(self._session_json(call.session))

    async def api_services(self, call: Call) -> Response:
        return json_response({"services": service_overview(self.configuration, self.service_states())})

    async def api_authentications(self, call: Call) -> Response:
        now = self.runtime.reactor.seconds()
        methods = ldap_overview(self.configuration, self.runtime.ldap_pools, now)
        ldap = {method["id"]: method for method in methods}
        result = []
        for method_id, settings in self.configuration.authentications.items():
            item = {"id": method_id, "name": settings.name, "type": settings.type, "enabled": settings.enabled}
            if method_id in ldap:
                item["servers"] = ldap[method_id]["servers"]
            result.append(item)
        return json_response({"authentications": result})

    async def api_verify(self, call: Call) -> Response:
        try:
            report = await self._run_verify(call, call.params["method_id"])
        except BadRequest as error:
            return json_response({"error": str(error)}, error.status)
        return json_response(
            {
                "method": report.method_id,
                "title": report.title,
                "failures": report.failures,
                "checks": [attrs.asdict(check) for check in report.checks],
            }
        )

    async def api_test_login(self, call: Call) -> Response:
        if call.body_json is None:
            return json_response({"error": "send a JSON object (Content-Type: application/json)"}, 415)
        method = call.body_json.get("authentication") or ""
        try:
            outcome = await self._run_test_login(
                call, call.field("username"), call.field("password"), call.flag("manager"), method if isinstance(method, str) else ""
            )
        except BadRequest as error:
            return json_response({"error": str(error)}, error.status)
        return json_response(outcome)

    async def api_events(self, call: Call) -> Response:
        outcome = call.query.get("outcome", "")
        if outcome not in OUTCOMES:
            return json_response({"error": "outcome must be success or failure"}, 400)
        kind = call.query.get("kind", "authentication")
        if kind not in KINDS:
            return json_response({"error": "kind must be authentication or all"}, 400)
        limit = call.query.get("limit", "")
        if limit and not (limit.isdigit() and 1 <= int(limit) <= MAX_EVENTS):
            return json_response({"error": f"limit must be a whole number from 1 to {MAX_EVENTS}"}, 400)
        events = await self.history.recent(call.query.get("username", "")[:256], outcome, kind, clamp_limit(limit))
        return json_response({"events": events})


def _read_file(path: str) -> bytes:
    with open(path, "rb") as static_file:
        return static_file.read()


def _peer(request) -> str:
    address = request.getClientAddress()
    return plain_address(getattr(address, "host", "") or "")


def _safe_next(value: str) -> str:
    """Only a local path: never another site (open redirect), never a scheme-relative URL."""
    if not value.startswith("/") or value.startswith("//") or "\\" in value or any(ord(char) < 32 for char in value):
        return "/"
    if value.startswith(("/login", "/logout")):
        return "/"
    return value


def _set_cookie(request, name: bytes, value: str) -> None:
    request.addCookie(name, value.encode("ascii"), path=b"/", secure=True, httpOnly=True, sameSite=b"strict")


def _expire_cookie(request, name: bytes) -> None:
    request.addCookie(
        name, b"", path=b"/", secure=True, httpOnly=True, sameSite=b"strict",
        expires=b"Thu, 01 Jan 1970 00:00:00 GMT", max_age=b"0",
    )


class ManagerResource(Resource):
    """The twisted.web resource of the whole Web Manager (it routes by itself)."""

    isLeaf = True

    def __init__(self, app: ManagerApp):
        super().__init__()
        self.app = app

    def render(self, request):
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        deferred = defer.ensureDeferred(self.app.handle(request))

        def failed(failure):
            _log.failure("Web Manager request {path} failed", failure, path=request.path)
            return self.app._error(request.path.startswith(b"/api/"), 500, "Internal error", "Something went wrong; see the server log.")

        def write(response: Response) -> None:
            if gone:
                return
            # With its phrase: Twisted knows none for some (429 went out as "Unknown Status").
            request.setResponseCode(response.status, HTTPStatus(response.status).phrase.encode("ascii"))
            for name, value in SECURITY_HEADERS.items():
                request.setHeader(name, value)
            if not response.cacheable:
                request.setHeader(b"cache-control", b"no-store")
                request.setHeader(b"pragma", b"no-cache")
            else:
                request.setHeader(b"cache-control", b"private, max-age=3600")
            request.setHeader(b"content-type", response.content_type)
            request.setHeader(b"content-length", str(len(response.body)).encode("ascii"))
            for name, value in response.headers.items():
                request.setHeader(name, value)
            if request.method != b"HEAD":
                request.write(response.body)
            request.finish()

        deferred.addErrback(failed).addCallback(write).addErrback(
            lambda failure: _log.failure("Web Manager could not answer", failure)
        )
        return NOT_DONE_YET
