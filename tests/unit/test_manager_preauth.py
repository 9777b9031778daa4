"""Header pre-authentication: honoured only from trusted proxies, {base64} values, audited refusals."""

from __future__ import annotations

import base64

import pytest
from manager_harness import ManagerHarness
from twisted.logger import capturedLogs, formatEvent

from sftpauth.manager import preauth

TRUSTING = """
header_authentication = yes
trusted_proxies = 10.0.0.0/24, ::1
header_authentication_role = auditors
"""


@pytest.fixture
def manager(tmp_path, make_hash):
    """A Web Manager trusting 10.0.0.0/24 and ::1 for pre-authentication (role auditors)."""
    made = []

    def make(options: str = TRUSTING, extra: str = "") -> ManagerHarness:
        harness = ManagerHarness(tmp_path / f"m{len(made)}", make_hash, manager_options=options, extra=extra)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


def b64(text: str) -> str:
    return "{base64}" + base64.b64encode(text.encode("utf-8")).decode("ascii")


def test_trusted_proxy_opens_a_session_with_the_configured_role(manager):
    """preauth-username from a trusted proxy opens a session with header_authentication_role."""
    m = manager()
    page = m.get("/", peer="10.0.0.7", headers={"preauth-username": "jdoe", "preauth-provider": "cas"})
    assert page.status == 200
    assert "jdoe" in page.text
    cookie = page.cookie("__Host-sftpauth-session")
    assert cookie and "Secure" in cookie and "HttpOnly" in cookie
    session = m.get("/api/v1/session", peer="10.0.0.7", headers={"preauth-username": "jdoe"}).json()
    assert session["roles"] == ["auditors"] and session["can_act"] is False
    assert session["method"] == "header-authentication"
    event = m.events()[-1]
    assert (event["username"], event["outcome"], event["method"]) == ("jdoe", "success", "header-authentication")
    assert "cas" in event["detail"]
    assert len(m.events("session-start")) == 1  # the second request reused the session


def test_ipv6_trusted_proxy(manager):
    """An IPv6 address listed in trusted_proxies is trusted too."""
    m = manager()
    assert m.get("/", peer="::1", headers={"preauth-username": "v6user"}).status == 200


def test_untrusted_address_headers_are_ignored_and_audited(manager):
    """From an address outside trusted_proxies the headers do nothing, and the attempt is audited."""
    m = manager()
    page = m.get("/", peer="10.0.1.7", headers={"preauth-username": "mallory"})
    assert page.status == 303
    assert page.header("location").startswith("/login")
    assert page.cookie("__Host-sftpauth-session") is None
    event = m.events()[-1]
    assert (event["username"], event["outcome"], event["reason"]) == ("mallory", "failure", "preauth-untrusted")
    assert event["peer"] == "10.0.1.7"
    assert m.events("session-start") == []


def test_an_ipv4_client_of_a_manager_on_ipv6_is_audited_by_its_ipv4_address(manager):
    """QA (IPv6): on ``address = ::`` the manager audited ``::ffff:10.0.1.7`` where FTP and the bans write 10.0.1.7."""
    m = manager()
    m.get("/", peer="::ffff:10.0.1.7", headers={"preauth-username": "mallory"})
    assert m.events()[-1]["peer"] == "10.0.1.7"


def test_ignored_headers_are_audited_and_logged_once_a_minute_per_address(manager):
    """A client sending preauth headers to every request writes one event and one log line a minute, with the count."""
    m = manager()
    with capturedLogs() as logged:
        for _ in range(50):
            assert m.get("/login", peer="10.0.1.7", headers={"preauth-username": "mallory"}).status == 200
        m.get("/login", peer="10.0.1.8", headers={"preauth-username": "mallory"})  # another address: its own line
        m.clock.advance(60)  # the minute is over and nothing followed: a summary of the 49 tells them
        m.clock.advance(59)
        m.get("/login", peer="10.0.1.7", headers={"preauth-username": "mallory"})  # within the summary's minute
        m.clock.advance(1)  # the summary's minute is over: the one since is summarised
        m.clock.advance(60)
        m.get("/login", peer="10.0.1.7", headers={"preauth-username": "mallory"})  # nothing counted: written at once
    refusals = [event for event in m.events() if event.get("reason") == "preauth-untrusted"]
    assert [(event["peer"], event["repeats"], event.get("summary", False)) for event in refusals] == [
        ("10.0.1.7", 0, False), ("10.0.1.8", 0, False), ("10.0.1.7", 49, True), ("10.0.1.7", 1, True), ("10.0.1.7", 0, False)
    ]
    assert "username" not in refusals[2]  # a summary stands for several attempts, not one
    lines = [formatEvent(event) for event in logged if "pre-authentication headers ignored" in formatEvent(event)]
    assert len(lines) == 5, lines
    assert lines[2].endswith("requests from 10.0.1.7 since the last such line: 49 more with pre-authentication "
                             "headers ignored (preauth-untrusted)"), lines
    assert lines[3].endswith(": 1 more with pre-authentication headers ignored (preauth-untrusted)"), lines
    assert lines[4].endswith("10.0.1.7 is not in trusted_proxies: pre-authentication headers ignored"), lines


def test_ignored_headers_not_audited_yet_are_summarised_at_the_stop(manager):
    """A stop writes the summary of the ignored headers still counted: the audit log loses none of them."""
    m = manager()
    for _ in range(3):
        m.get("/login", peer="10.0.1.7", headers={"preauth-username": "mallory"})
    m.app.stop()
    refusals = [event for event in m.events() if event.get("reason") == "preauth-untrusted"]
    assert [(event["repeats"], event.get("summary", False)) for event in refusals] == [(0, False), (2, True)]


def test_headers_ignored_when_header_authentication_is_off(manager):
    """With header_authentication = no even a listed address cannot pre-authenticate."""
    m = manager("trusted_proxies = 10.0.0.0/24")
    page = m.get("/", peer="10.0.0.7", headers={"preauth-username": "jdoe"})
    assert page.status == 303
    assert m.events()[-1]["reason"] == "preauth-disabled"


def test_untrusted_headers_do_not_change_a_password_session(manager):
    """A logged-in administrator stays who they are when an untrusted client adds preauth headers."""
    m = manager()
    m.login()
    session = m.get("/api/v1/session", peer="127.0.0.1", headers={"preauth-username": "root"}).json()
    assert session["username"] == "admin"


def test_base64_values_are_decoded_as_utf8(manager):
    """{base64} values are decoded as UTF-8: names with non-ASCII letters arrive intact."""
    m = manager()
    headers = {
        "preauth-username": b64("jürgen"),
        "preauth-firstname": b64("Jürgen"),
        "preauth-lastname": "Muller",
        "preauth-email": "j@example.com",
    }
    session = m.get("/api/v1/session", peer="10.0.0.2", headers=headers).json()
    assert session["username"] == "jürgen"
    assert session["full_name"] == "Jürgen Muller"


def test_invalid_base64_is_refused_and_audited(manager):
    """A {base64} value that is not base64 (or not UTF-8) is a 400, audited, with no session."""
    m = manager()
    result = m.get("/", peer="10.0.0.2", headers={"preauth-username": "{base64}***"})
    assert result.status == 400
    assert result.cookie("__Host-sftpauth-session") is None
    assert m.events()[-1]["reason"] == "preauth-invalid"
    not_utf8 = "{base64}" + base64.b64encode(b"\xff\xfe").decode()
    assert m.get("/", peer="10.0.0.2", headers={"preauth-username": not_utf8}).status == 400


def test_another_preauth_username_replaces_the_session(manager):
    """When the proxy sends another username, the old session ends and a new one starts."""
    m = manager()
    m.get("/", peer="10.0.0.2", headers={"preauth-username": "first"})
    session = m.get("/api/v1/session", peer="10.0.0.2", headers={"preauth-username": "second"}).json()
    assert session["username"] == "second"
    ends = m.events("session-end")
    assert [(end["username"], end["reason"]) for end in ends] == [("first", "replaced")]


def test_preauth_session_still_needs_csrf_for_posts(manager):
    """A pre-authenticated session follows the same CSRF rule on POST."""
    m = manager(TRUSTING.replace("auditors", "DEFAULT-ROLE"))
    headers = {"preauth-username": "jdoe"}
    assert m.post_form("/test-login", {"username": "a", "password": "b"}, peer="10.0.0.2", headers=headers).status == 403
    token = m.get("/api/v1/session", peer="10.0.0.2", headers=headers).json()["csrf_token"]
    page = m.post_form("/test-login", {"csrf_token": token, "username": "a", "password": "b"}, peer="10.0.0.2", headers=headers)
    assert page.status == 200


@pytest.mark.parametrize(
    "raw, expected",
    [(b"plain", "plain"), (b"{base64}w6ll", "\u00e9e"), (b"{BASE64}YWJj", "abc"), (b"  spaced  ", "spaced")],
)
def test_decode_value(raw, expected):
    """Plain values are UTF-8 text; {base64} (any case) is decoded; spaces around are removed."""
    assert preauth.decode_value(raw, "preauth-username") == expected


@pytest.mark.parametrize("raw", [b"{base64}!!", b"\xff", b"{base64}" + base64.b64encode(b"a\x01b"), b"x" * 300])
def test_decode_value_refuses_bad_values(raw):
    """Bad base64, non-UTF-8, control characters and oversized values are refused."""
    with pytest.raises(preauth.InvalidPreAuthentication):
        preauth.decode_value(raw, "preauth-username")


def test_deny_administrators_applies_to_pre_authenticated_usernames(manager):
    """The proxy says who the user is; deny_administrators still decides whether they get in."""
    m = manager(extra="\n[security-policies/DEFAULT-SECURITY-POLICY]\ndeny_administrators = root, svc-*\n")
    page = m.get("/", peer="10.0.0.2", headers={"preauth-username": "svc-backup"})
    assert page.status == 403
    assert page.cookie("__Host-sftpauth-session") is None
    event = m.events()[-1]
    assert (event["username"], event["outcome"], event["reason"]) == ("svc-backup", "failure", "denied-administrator")
    assert m.events("session-start") == []
    # Other names still pass, and a session of an allowed name ends when the proxy switches to a denied one.
    assert m.get("/api/v1/session", peer="10.0.0.2", headers={"preauth-username": "jdoe"}).json()["username"] == "jdoe"
    assert m.get("/api/v1/session", peer="10.0.0.2", headers={"preauth-username": "root"}).status == 403
    assert m.get("/api/v1/session", peer="10.0.0.2").status == 401


def test_a_header_sent_twice_is_refused(manager):
    """A proxy that adds its preauth-username to the client's own would let the client's come first: 400."""
    m = manager()
    result = m.get("/", peer="10.0.0.2", headers={"preauth-username": "mallory\r\npreauth-username: alice"})
    assert result.status == 400
    assert result.cookie("__Host-sftpauth-session") is None
    event = m.events()[-1]
    assert (event["reason"], event["detail"]) == ("preauth-invalid", "preauth-username: sent 2 times (at most once)")
    assert m.events("session-start") == []


@pytest.mark.parametrize("username", ["r\u200boot", "ro\u00adot", "\u202etoor", "al\u2028ice", "b\u00a0ob"])
def test_invisible_characters_in_a_pre_authenticated_username_are_refused(manager, username):
    """Zero-width, soft hyphen, direction overrides and separators would pass for another name on the pages."""
    m = manager(extra="\n[security-policies/DEFAULT-SECURITY-POLICY]\ndeny_administrators = root\n")
    result = m.get("/", peer="10.0.0.2", headers={"preauth-username": b64(username)})
    assert result.status == 400
    assert m.events()[-1]["reason"] == "preauth-invalid"
    assert "invisible character" in m.events()[-1]["detail"]
    assert m.events("session-start") == []


@pytest.mark.parametrize("username", ["admin", "ADMIN", "\uff41\uff44\uff4d\uff49\uff4e"])
def test_a_pre_authenticated_name_cannot_be_a_local_administrators(manager, username):
    """The proxy's user 'admin' would pass for [administrators/admin] in the audit log: 403, audited."""
    m = manager()
    result = m.get("/", peer="10.0.0.2", headers={"preauth-username": b64(username)})
    assert result.status == 403
    event = m.events()[-1]
    assert (event["outcome"], event["reason"]) == ("failure", "preauth-administrator")
    assert "[administrators/admin]" in event["detail"]
    assert m.events("session-start") == []
