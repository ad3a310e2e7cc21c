"""The desk's sessions, forms and sign-in over plain HTTP (no browser): CSRF tokens, the
cookie's flags over HTTP, TLS and a proxy, sessions that end on the server, the sign-in
rate limit, and pages that load nothing from elsewhere."""

from __future__ import annotations

import asyncio
import html
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from desk_support import (
    PASSWORD,
    add_agent,
    csrf_of,
    interaction_id,
    mailrouter,
    send_mail,
    show,
    signed_in_client,
)
from served import Served, http_settings, start

from helpers import counts, make_settings, pickup_messages
from mailrouter import agents
from mailrouter.config import HttpSettings, Settings
from mailrouter.http import create_app, start_http
from mailrouter.runtime import Runtime, opened
from servers import TlsFiles, free_port

WRONG = "Sign-in failed: unknown agent or wrong password."


@pytest.fixture(scope="module")
def desk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = start(http_settings(tmp_path_factory.mktemp("desk-security")))
    try:
        yield served
    finally:
        served.close()


def _cookie_attributes(set_cookie: str) -> dict[str, str]:
    name_value, *attrs = (part.strip() for part in set_cookie.split(";"))
    out = {"": name_value}
    for attr in attrs:
        key, _, value = attr.partition("=")
        out[key.lower()] = value
    return out


def _set_cookies(response: httpx.Response) -> dict[str, dict[str, str]]:
    """The response's Set-Cookie fields by cookie name, attributes keyed in lower case."""
    out = {}
    for field in response.headers.get_list("set-cookie"):
        attributes = _cookie_attributes(field)
        out[attributes[""].partition("=")[0]] = attributes
    return out


# --------------------------------------------------------------------------- CSRF


def test_form_posted_without_its_csrf_token_is_refused_403_and_changes_nothing(
    desk: Served,
) -> None:
    """Pick, transfer, reply, close and sign out, posted with the session cookie but
    without the form's token (or with a wrong one): 403 in words, the store unchanged."""
    settings = desk.settings
    add_agent(settings, "frank", "sales")
    subject = "CSRF: a desk for twelve"
    send_mail(settings, to="sales@example.test", subject=subject, msgid="<csrf-1@customer.test>")
    iid = interaction_id(settings, subject)
    before = show(settings, iid)
    with signed_in_client(desk, "frank") as client:
        token = csrf_of(client.get("/accounts").text)  # the session's, as every form has it
        forms = {
            "pick": {},
            "transfer": {"to": "support"},
            "reply": {"body": "Sent by a page on another site."},
            "close": {},
        }
        for action, fields in forms.items():
            for bad in ({}, {"csrf": "not-the-token"}, {"csrf": ""}):
                r = client.post(f"/interactions/{iid}/{action}", data={**fields, **bad})
                assert r.status_code == 403, (action, bad, r.text)
                assert 'role="alert"' in r.text and "nothing was changed" in r.text
        r = client.post("/sign-out", data={})
        assert r.status_code == 403
        assert client.get("/accounts").status_code == 200  # still signed in
        assert show(settings, iid) == before
        assert pickup_messages(settings) == []
        # The same form with its token does what it says.
        r = client.post(f"/interactions/{iid}/pick", data={"csrf": token})
        assert (r.status_code, r.headers["location"]) == (
            303,
            f"/interactions/{iid}?done=picked",
        )
    assert show(settings, iid)["assigned_agent"] == "frank"


def test_sign_in_form_without_its_token_is_refused(desk: Served) -> None:
    """A sign-in posted from elsewhere (no token matching the form's cookie) checks no
    password and opens no session."""
    add_agent(desk.settings, "gwen", "support")
    with desk.client(follow_redirects=False) as client:
        r = client.post("/", data={"agent": "gwen", "password": PASSWORD})
        assert r.status_code == 403
        assert "mailrouter_session" not in _set_cookies(r)
        token = csrf_of(client.get("/").text)
        client.cookies.clear()  # the token without its cookie: still refused
        r = client.post("/", data={"csrf": token, "agent": "gwen", "password": PASSWORD})
        assert r.status_code == 403 and "mailrouter_session" not in _set_cookies(r)


@pytest.mark.parametrize(
    ("asked", "landed"),
    [("/accounts/sales/advanced?to=billing", "/accounts/sales/advanced?to=billing")]
    + [(f"/?next={far}", "/accounts") for far in ("//evil.example/", "https://evil.example/")],
    ids=["own-page", "protocol-relative", "absolute"],
)
def test_sign_in_from_a_link_lands_where_it_was_going_and_only_here(
    desk: Served, asked: str, landed: str
) -> None:
    """A page asked for without a session sends the browser to sign in, then back to it;
    a ``next`` pointing at another site is ignored."""
    name = f"rosa-{len(asked)}"
    add_agent(desk.settings, name, "sales")
    with desk.client(follow_redirects=False) as client:
        r = client.get(asked)
        form_url = r.headers["location"] if r.status_code == 303 else asked
        form = client.get(form_url)
        assert form.status_code == 200
        data = {"csrf": csrf_of(form.text), "agent": name, "password": PASSWORD}
        found = re.search(r'name="next" value="([^"]*)"', form.text)
        if found is not None:
            data["next"] = html.unescape(found.group(1))
        r = client.post("/", data=data)
    assert (r.status_code, r.headers["location"]) == (303, landed)


# --------------------------------------------------------------------------- the cookie


def test_session_cookie_is_httponly_samesite_strict_and_not_secure_over_plain_http(
    desk: Served,
) -> None:
    """Over plain HTTP (loopback): HttpOnly, SameSite=Strict, Path=/, no Secure, and no
    expiry (the browser forgets it when it closes; the server ends it after 12 h)."""
    add_agent(desk.settings, "hana", "sales")
    with desk.client(follow_redirects=False) as client:
        form = client.get("/")
        r = client.post(
            "/", data={"csrf": csrf_of(form.text), "agent": "hana", "password": PASSWORD}
        )
    assert r.status_code == 303
    for cookie in (_set_cookies(form)["mailrouter_signin"], _set_cookies(r)["mailrouter_session"]):
        assert "httponly" in cookie
        assert cookie["samesite"].lower() == "strict"
        assert cookie["path"] == "/"
        assert "secure" not in cookie
        assert "max-age" not in cookie and "expires" not in cookie


@asynccontextmanager
async def _in_process(
    settings: Settings, http: HttpSettings, **client: object
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    """The HTTP app on ``http`` in this test's own loop, and a client for it."""
    with opened(settings) as rt:
        server = await start_http(create_app(rt), http)
        scheme = "https" if http.tls else "http"
        try:
            async with httpx.AsyncClient(
                base_url=f"{scheme}://127.0.0.1:{http.port}",
                **client,  # type: ignore[arg-type]
            ) as c:
                yield rt, c
        finally:
            await server.drain()


async def _sign_in(
    c: httpx.AsyncClient, name: str, password: str = PASSWORD, headers: dict[str, str] | None = None
) -> httpx.Response:
    form = await c.get("/", headers=headers)
    # Sent back by hand: a Secure cookie (behind a TLS proxy) is one httpx keeps to https.
    token = _set_cookies(form)["mailrouter_signin"][""]
    return await c.post(
        "/",
        data={"csrf": csrf_of(form.text), "agent": name, "password": password},
        headers={**(headers or {}), "Cookie": token},
    )


def _agent(settings: Settings, name: str, *accounts: str) -> None:
    with opened(settings) as rt:
        agents.add(rt, name, accounts)
        agents.set_password(rt, name, PASSWORD)


async def test_session_cookie_is_secure_over_tls(tmp_path: Path, tls_files: TlsFiles) -> None:
    """Served with TLS, both desk cookies are Secure."""
    settings = make_settings(tmp_path)
    _agent(settings, "ivan", "sales")
    http = HttpSettings(
        enabled=True, port=free_port(), tls_cert=tls_files.cert, tls_key=tls_files.key
    )
    async with _in_process(settings, http, verify=tls_files.client_context()) as (_, c):
        r = await _sign_in(c, "ivan")
    assert r.status_code == 303
    assert "secure" in _set_cookies(r)["mailrouter_session"]


@pytest.mark.parametrize(
    ("trusted", "secure"), [(("127.0.0.0/8",), True), (("10.9.9.9",), False)], ids=["ours", "other"]
)
async def test_session_cookie_is_secure_behind_a_tls_proxy_only_if_trusted(
    tmp_path: Path, trusted: tuple[str, ...], secure: bool
) -> None:
    """X-Forwarded-Proto: https makes the cookie Secure only from a trusted proxy."""
    settings = make_settings(tmp_path)
    _agent(settings, "jane", "sales")
    http = HttpSettings(enabled=True, port=free_port(), behind_proxy=True, trusted_proxies=trusted)
    async with _in_process(settings, http) as (_, c):
        r = await _sign_in(c, "jane", headers={"X-Forwarded-Proto": "https"})
    assert r.status_code == 303
    assert ("secure" in _set_cookies(r)["mailrouter_session"]) is secure


# --------------------------------------------------------------------------- sessions end


def test_removed_agent_loses_its_session_at_once(desk: Served) -> None:
    """`agent remove`: the next request of its open session lands on the sign-in page."""
    add_agent(desk.settings, "karl", "support")
    with signed_in_client(desk, "karl") as client:
        assert client.get("/accounts").status_code == 200
        mailrouter(desk.settings, "agent", "remove", "karl")
        r = client.get("/accounts")
        assert (r.status_code, r.headers["location"]) == (303, "/?next=%2Faccounts")
        poll = client.get("/accounts/support/rows", headers={"X-Desk-Poll": "1"})
        assert poll.status_code == 401  # the list's script reloads to the sign-in page


def test_new_password_ends_sessions_opened_before(desk: Served) -> None:
    """`agent passwd`: sessions signed in with the old password end; a new sign-in works."""
    add_agent(desk.settings, "lena", "support")
    with signed_in_client(desk, "lena") as client:
        mailrouter(desk.settings, "agent", "passwd", "lena", stdin="another password\n")
        assert client.get("/accounts").status_code == 303
    with signed_in_client(desk, "lena", "another password") as client:
        assert client.get("/accounts").status_code == 200


@pytest.mark.parametrize("column", ["expires_at", "last_seen_at"])
def test_session_ends_when_it_expires_or_sits_idle(desk: Served, column: str) -> None:
    """A session past its 12 hours, or idle for 2, is signed out."""
    name = f"mia-{column[:4]}"
    add_agent(desk.settings, name, "support")
    with signed_in_client(desk, name) as client:
        assert client.get("/accounts").status_code == 200
        db = sqlite3.connect(desk.settings.database_url.removeprefix("sqlite:///"))
        with db:
            db.execute(
                f"UPDATE desk_sessions SET {column} = '2000-01-01 00:00:00.000000' "
                "WHERE agent_id = (SELECT id FROM agents WHERE name = ?)",
                (name,),
            )
        db.close()
        assert client.get("/accounts").status_code == 303


# --------------------------------------------------------------------------- rate limit


async def test_failed_sign_ins_are_rate_limited_per_name_in_the_same_words(
    tmp_path: Path,
) -> None:
    """Five failures of a name (known or not, same answer): then even the right password
    waits, with Retry-After; after the wait it signs in."""
    settings = make_settings(tmp_path)
    _agent(settings, "nora", "sales")
    http = HttpSettings(enabled=True, port=free_port())
    async with _in_process(settings, http) as (_, c):
        for name in ("nora", "nobody-by-this-name"):
            for _ in range(5):
                r = await _sign_in(c, name, "wrong password")
                assert r.status_code == 401
                assert WRONG in r.text and "mailrouter_session" not in _set_cookies(r)
            r = await _sign_in(c, name, PASSWORD)
            assert r.status_code == 429
            assert r.headers["retry-after"] == "1"
            assert "Too many failed sign-ins: try again in 1 second." in r.text
            assert 'role="alert"' in r.text
        await asyncio.sleep(1.05)
        r = await _sign_in(c, "nora", PASSWORD)
        assert (r.status_code, r.headers["location"]) == (303, "/accounts")


async def test_failed_sign_ins_are_rate_limited_per_client_address(tmp_path: Path) -> None:
    """Twenty failures from one address (a different name each time) make every name wait
    there, the right password too; another address (told by our proxy) is not held up."""
    settings = make_settings(tmp_path)
    _agent(settings, "olga", "sales")
    http = HttpSettings(
        enabled=True, port=free_port(), behind_proxy=True, trusted_proxies=("127.0.0.0/8",)
    )
    office = {"X-Forwarded-For": "203.0.113.7"}
    async with _in_process(settings, http) as (_, c):
        for n in range(20):
            r = await _sign_in(c, f"guess{n}", "wrong password", headers=office)
            assert r.status_code == 401
        r = await _sign_in(c, "olga", PASSWORD, headers=office)
        assert r.status_code == 429
        r = await _sign_in(c, "olga", PASSWORD, headers={"X-Forwarded-For": "198.51.100.9"})
        assert r.status_code == 303


# --------------------------------------------------------------------------- pages


def test_pages_load_nothing_from_elsewhere_and_say_so_in_their_policy(desk: Served) -> None:
    """Every src/href of a page is ours; the CSP allows only our own origin; pages are not
    cached; static files are versioned."""
    add_agent(desk.settings, "pia", "sales")
    with signed_in_client(desk, "pia") as client:
        for path in ("/", "/accounts", "/accounts/sales", "/accounts/sales/advanced"):
            r = client.get(path, follow_redirects=True)
            assert r.status_code == 200, path
            for url in re.findall(r'(?:src|href|action)="([^"]*)"', r.text):
                assert url.startswith("/") and not url.startswith("//"), (path, url)
            csp = r.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "script-src 'self'" in csp
            assert r.headers["cache-control"] == "no-store"
            assert r.headers["x-frame-options"] == "DENY"
        css = re.search(r'href="(/static/desk\.css\?v=\w+)"', client.get("/accounts").text)
        assert css is not None
        r = client.get(css.group(1))
        assert r.headers["content-type"].startswith("text/css")
        assert "immutable" in r.headers["cache-control"]


def test_desk_routes_are_not_in_the_openapi_document(tmp_path: Path) -> None:
    """The desk is HTML for people: the API's document (and schemathesis) leave it out."""
    with opened(make_settings(tmp_path)) as rt:
        paths = create_app(rt).openapi()["paths"]
    assert all(p.startswith("/api/v1/") or p == "/healthz" for p in paths), sorted(paths)


def test_refused_operation_is_shown_in_words_with_the_apis_status(desk: Served) -> None:
    """A refusal (here: reply with an empty body, which a browser's `required` would stop)
    answers the page with the domain's sentence in role=alert, 422, nothing queued."""
    settings = desk.settings
    add_agent(settings, "quinn", "sales")
    subject = "Empty reply"
    send_mail(settings, to="sales@example.test", subject=subject, msgid="<empty-1@customer.test>")
    iid = interaction_id(settings, subject)
    with signed_in_client(desk, "quinn") as client:
        token = csrf_of(client.get("/accounts").text)
        before = counts_of(settings)
        r = client.post(f"/interactions/{iid}/reply", data={"csrf": token, "body": "  "})
    assert r.status_code == 422
    assert '<p class="alert" role="alert">the reply body is empty</p>' in r.text
    assert counts_of(settings) == before


def counts_of(settings: Settings) -> dict[str, int]:
    with opened(settings) as rt:
        return counts(rt)
