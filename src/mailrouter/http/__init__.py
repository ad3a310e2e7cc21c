"""The HTTP server in the daemon's event loop: ``/healthz`` and the agents' JSON API.

A front end like ``cli/``: routes parse the request, call the same domain operations in a
worker thread, and answer; refusals become problem+json with the CLI's words.
"""

from mailrouter.http.app import create_app
from mailrouter.http.server import HttpServer, start_http

__all__ = ["HttpServer", "create_app", "start_http"]
