"""The HTTP server inside ``mailrouter run``: health, the OpenAPI document, bearer tokens,
TLS, a port already taken, and which peers may speak for clients with X-Forwarded-*."""

from __future__ import annotations

import http.client
import json
import smtplib
import socket
import sqlite3
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import Request
from served import Served, command, http_settings, start, wait_until

from helpers import run_cli, subprocess_env
from mailrouter import __version__
from mailrouter.config import HttpSettings, Settings
from mailrouter.http import create_app, start_http
from mailrouter.http.problems import PROBLEM_JSON
from mailrouter.runtime import opened
from servers import TlsFiles, free_port


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One daemon for the tests that only read from it (starting one takes seconds)."""
    s = start(http_settings(tmp_path_factory.mktemp("served")))
    try:
        yield s
    finally:
        s.close()


def _token(settings: Settings, *args: str) -> str:
    code, out, err = run_cli(settings, "agent", "add", *args)
    assert code == 0, err
    return out.strip()


def test_healthz_answers_200_with_status_and_version(served: Served) -> None:
    """GET /healthz: 200, a small JSON status, a Date header; no token needed."""
    with served.client() as c:
        r = c.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "version": __version__}
    assert r.headers["content-type"] == "application/json"
    assert "date" in r.headers and "server" not in r.headers


def test_ready_line_names_the_http_address(served: Served) -> None:
    """The ready log line lists the HTTP listener beside SMTP."""
    [ready] = [ln for ln in served.log().splitlines() if "event=ready" in ln]
    assert f"http=127.0.0.1:{served.settings.http.port}" in ready


def test_openapi_document_is_generated_and_served(served: Served) -> None:
    """/api/v1/openapi.json is OpenAPI 3 from the code; no docs pages (they need a CDN)."""
    with served.client() as c:
        doc = c.get("/api/v1/openapi.json").json()
        assert c.get("/docs").status_code == 404
        assert c.get("/redoc").status_code == 404
    assert doc["openapi"].startswith("3.")
    assert "/api/v1/accounts" in doc["paths"]
    assert doc["components"]["securitySchemes"]["token"]["scheme"] == "bearer"
    assert "Problem" in doc["components"]["schemas"]


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer mrt_0000000000000000_nope", "Bearer garbage", "Basic YWxpY2U6c2VjcmV0"],
    ids=["missing", "unknown", "malformed", "basic"],
)
def test_missing_or_bad_token_is_401_problem_with_www_authenticate(
    served: Served, authorization: str | None
) -> None:
    """No valid bearer token: 401 problem+json and WWW-Authenticate: Bearer."""
    headers = {"Authorization": authorization} if authorization else {}
    with served.client() as c:
        r = c.get("/api/v1/accounts", headers=headers)
    assert r.status_code == 401
    assert r.headers["content-type"] == PROBLEM_JSON
    assert r.headers["www-authenticate"].startswith("Bearer")
    body = r.json()
    assert set(body) == {"type", "title", "status", "detail", "code"}
    assert body["status"] == 401
    assert body["type"] == f"/api/v1/problems/{body['code']}"


def test_problem_type_uri_answers_its_status_and_title(served: Served) -> None:
    """A problem's ``type`` is a URI on the server that names the status and title."""
    with served.client() as c:
        r = c.get("/api/v1/problems/already-picked")
        missing = c.get("/api/v1/problems/no-such-thing")
    assert r.json() == {"code": "already-picked", "status": 409, "title": "Picked by another agent"}
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM_JSON


def test_unknown_path_and_method_are_problems(served: Served) -> None:
    """An unknown path is a 404 problem, a wrong method 405 with Allow."""
    with served.client() as c:
        nowhere = c.get("/api/v1/nowhere")
        wrong = c.delete("/healthz")
    assert (nowhere.status_code, nowhere.headers["content-type"]) == (404, PROBLEM_JSON)
    assert (wrong.status_code, wrong.headers["allow"]) == (405, "GET")
    assert wrong.json()["code"] == "method-not-allowed"


def test_token_from_agent_add_opens_the_api(served: Served) -> None:
    """A token printed by `agent add` authenticates at once; the agent sees its accounts."""
    token = _token(served.settings, "alice", "--account", "sales")
    with served.client(token) as c:
        r = c.get("/api/v1/accounts")
    assert r.status_code == 200, r.text
    [sales] = r.json()
    assert (sales["name"], sales["address"], sales["unread"], sales["open"]) == (
        "sales",
        "sales@example.test",
        0,
        0,
    )
    assert sales["transfer"] == {
        "enabled": True,
        "notify": True,
        "template": "transfer_notice",
        "targets": ["support", "billing"],
    }


def test_http_port_in_use_fails_startup_clearly(tmp_path: Path) -> None:
    """A taken HTTP port: `run` exits 1 saying which address, and nothing keeps running."""
    settings = http_settings(tmp_path)
    with socket.create_server(("127.0.0.1", settings.http.port)):
        done = subprocess.run(
            [*command(), "-c", str(settings.config_path), "run"],
            env=subprocess_env(settings),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert f"http: cannot listen on 127.0.0.1:{settings.http.port}" in done.stderr
    assert "event=ready" not in done.stderr


def test_tls_settings_serve_https(tmp_path: Path, tls_files: TlsFiles) -> None:
    """With tls_cert and tls_key the API is HTTPS only."""
    settings = http_settings(
        tmp_path, http=f'tls_cert = "{tls_files.cert}"\ntls_key = "{tls_files.key}"\n'
    )
    trust = ssl.create_default_context(cafile=tls_files.cert)
    served = start(settings, scheme="https", verify=trust)
    try:
        with served.client() as c:
            assert c.get("/healthz").json()["status"] == "ok"
        with pytest.raises(httpx.TransportError), httpx.Client() as plain:
            plain.get(f"http://127.0.0.1:{settings.http.port}/healthz", timeout=5)
    finally:
        served.close()


@pytest.mark.parametrize(
    ("behind_proxy", "trusted", "client"),
    [
        (False, (), "127.0.0.1"),
        (True, ("10.9.9.9",), "127.0.0.1"),
        (True, ("127.0.0.0/8",), "203.0.113.7"),
    ],
    ids=["no-proxy", "other-proxy", "our-proxy"],
)
async def test_forwarded_for_is_believed_only_from_the_trusted_proxy(
    tmp_path: Path, behind_proxy: bool, trusted: tuple[str, ...], client: str
) -> None:
    """X-Forwarded-For/-Proto change the client only when the peer is a trusted proxy."""
    settings = http_settings(tmp_path)
    http = HttpSettings(
        enabled=True,
        port=free_port(),
        behind_proxy=behind_proxy,
        trusted_proxies=trusted,
    )
    with opened(settings) as rt:
        app = create_app(rt)

        @app.get("/echo")
        async def echo(request: Request) -> dict[str, str | None]:
            return {
                "client": request.client.host if request.client else None,
                "scheme": request.url.scheme,
            }

        server = await start_http(app, http)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http.port}") as c:
                r = await c.get(
                    "/echo",
                    headers={"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"},
                )
        finally:
            await server.drain()
    assert r.json() == {
        "client": client,
        "scheme": "https" if client != "127.0.0.1" else "http",
    }


def _server_has_read(port: int, client_port: int) -> bool:
    """The daemon has taken our request out of its socket (its receive queue is empty)."""
    local, remote = f"0100007F:{port:04X}", f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[4].split(":")[1], 16) == 0
    return False


def test_sigterm_lets_a_request_in_flight_finish(tmp_path: Path) -> None:
    """SIGTERM while a pick waits for the store: no new connections, the pick is answered
    200 once the store is free, and the daemon exits 0 within its drain timeout."""
    settings = http_settings(tmp_path)
    served = start(settings)
    try:
        token = _token(settings, "alice", "--account", "sales")
        with smtplib.SMTP("127.0.0.1", settings.smtp.port, timeout=30) as smtp:
            smtp.sendmail(
                "c@customer.test",
                ["sales@example.test"],
                b"From: c@customer.test\r\nTo: sales@example.test\r\n"
                b"Message-ID: <drain-1@customer.test>\r\nSubject: drain\r\n\r\nhi\r\n",
            )
        # Another writer holds SQLite's write lock, so the pick waits inside the daemon.
        lock = sqlite3.connect(settings.database_url.removeprefix("sqlite:///"))
        lock.isolation_level = None
        lock.execute("BEGIN IMMEDIATE")
        conn = http.client.HTTPConnection("127.0.0.1", settings.http.port, timeout=60)
        try:
            conn.request(
                "POST", "/api/v1/interactions/1/pick", headers={"Authorization": f"Bearer {token}"}
            )
            client_port = conn.sock.getsockname()[1]
            assert wait_until(lambda: _server_has_read(settings.http.port, client_port))
            served.proc.terminate()

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", settings.http.port), timeout=1).close()
                except OSError:
                    return True
                return False

            assert wait_until(refused), "still accepting after SIGTERM"
            assert served.proc.poll() is None  # waiting for the request in flight
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        assert (response.status, body["assigned_agent"]) == (200, "alice")
        assert served.proc.wait(timeout=30) == 0
        assert "drain-timeout" not in served.log()
        assert "event=stopped" in served.log()
    finally:
        served.close()
