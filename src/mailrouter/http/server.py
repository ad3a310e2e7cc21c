"""Serve the HTTP application with uvicorn's ``Server`` inside the daemon's own loop.

uvicorn's ``serve()`` would install its own signal handlers and poll a flag every 0.1 s;
here the daemon owns the signals and the lifecycle, so only uvicorn's pieces are used:
we bind the sockets ourselves (a port in use is an ``OSError`` the daemon reports, where
uvicorn would call ``sys.exit``), ``Server.startup`` serves on them, and
:meth:`HttpServer.drain` is ``Server.shutdown``: stop accepting, let requests in flight
finish, close idle keep-alive connections.  The daemon bounds the drain with
``daemon.shutdown_timeout`` and then calls :meth:`HttpServer.abort`.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

import uvicorn
from starlette.types import ASGIApp

from mailrouter.config import HttpSettings

__all__ = ["HttpServer", "start_http"]


def bind(host: str, port: int) -> list[socket.socket]:
    """Bound (not yet listening) sockets for every address ``host`` resolves to."""
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"http: cannot listen on {host}:{port}: {exc.strerror}"
                ) from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


@dataclass
class HttpServer:
    """A serving uvicorn ``Server`` and the sockets it listens on."""

    server: uvicorn.Server
    sockets: list[socket.socket]
    _clock: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        host, port = self.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def _tick(self) -> None:
        # uvicorn refreshes its Date header once a second from its main loop, which we do
        # not run; this does only that.
        while True:
            await self.server.on_tick(0)
            await asyncio.sleep(1.0)

    async def drain(self) -> None:
        """Stop accepting; return when the requests in flight have been answered."""
        try:
            await self.server.shutdown(sockets=self.sockets)
        finally:
            self._stop_clock()

    def abort(self) -> None:
        """After the drain timeout: cancel requests still running and hang up."""
        self.server.force_exit = True
        for task in list(self.server.server_state.tasks):
            task.cancel()
        for connection in list(self.server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.close()
        for sock in self.sockets:
            sock.close()
        self._stop_clock()

    def _stop_clock(self) -> None:
        if self._clock is not None:
            self._clock.cancel()


async def start_http(app: ASGIApp, settings: HttpSettings) -> HttpServer:
    """Bind ``settings.host:port`` and serve ``app`` on it from the running loop."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # Our logging stays ours: no dictConfig from uvicorn, no access log (the domain
        # operations log what changed, with the agent who did it).
        log_config=None,
        access_log=False,
        lifespan="off",
        ws="none",
        interface="asgi3",
        server_header=False,
        # Without behind_proxy, X-Forwarded-* is never believed, from anyone (uvicorn's
        # default would trust it from 127.0.0.1).
        proxy_headers=settings.behind_proxy,
        forwarded_allow_ips=list(settings.trusted_proxies),
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
    )
    config.load()  # a bad certificate or key raises here (ssl.SSLError is an OSError)
    sockets = bind(settings.host, settings.port)
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    try:
        await server.startup(sockets=sockets)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    http = HttpServer(server, sockets)
    await server.on_tick(0)  # the Date header for the first requests
    http._clock = asyncio.create_task(http._tick(), name="mailrouter-http-clock")
    return http
