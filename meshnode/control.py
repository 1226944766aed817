"""Local control API: HTTP/JSON on loopback, plus Prometheus ``/metrics``.

The HTTP parsing is the standard library's ``ThreadingHTTPServer`` (no hand-written server); it runs
in a worker thread owned by a task in the node's nursery. Handlers never touch trio objects from that
thread: each request is answered by a function run on the trio thread via ``trio.from_thread``, so
node state is read consistently.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trio

from meshnode.logs import get_logger, kv

log = get_logger("meshnode.control")

# A route gets the path tail (e.g. the session id) and returns (status, content_type, body).
Route = Callable[[str], tuple[int, str, bytes]]


def _json(result: Any) -> tuple[int, str, bytes]:
    if result is None:
        return 404, "application/json", b'{"error": "not found"}'
    return 200, "application/json", json.dumps(result, default=str).encode()


def json_route(fn: Callable[[str], Any]) -> Route:
    """A synchronous JSON route (run on the trio thread)."""
    def route(tail: str) -> tuple[int, str, bytes]:
        return _json(fn(tail))
    return route


def async_json_route(fn: Callable[[str], Any]) -> Route:
    """A JSON route whose handler is async (e.g. a DHT lookup); runs as a trio task."""
    async def route(tail: str) -> tuple[int, str, bytes]:
        return _json(await fn(tail))
    route.is_async = True  # type: ignore[attr-defined]
    return route


class ControlServer:
    """Serves ``routes`` (prefix -> Route) on host:port until the owning task is cancelled."""

    def __init__(self, host: str, port: int, routes: dict[str, Route], port_file: Path | None) -> None:
        self.host, self.port, self.routes, self.port_file = host, port, routes, port_file
        self.bound_port: int | None = None

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        token = trio.lowlevel.current_trio_token()
        routes = self.routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (stdlib API)
                path = self.path.split("?", 1)[0].rstrip("/") or "/"
                for prefix, route in routes.items():
                    if path == prefix or path.startswith(prefix + "/"):
                        tail = path[len(prefix):].lstrip("/")
                        try:
                            if getattr(route, "is_async", False):
                                status, ctype, body = trio.from_thread.run(route, tail, trio_token=token)
                            else:
                                status, ctype, body = trio.from_thread.run_sync(route, tail, trio_token=token)
                        except (trio.RunFinishedError, trio.Cancelled):
                            status, ctype, body = 503, "application/json", b'{"error": "shutting down"}'
                        except Exception as exc:  # report, don't kill the server
                            log.exception("control route failed", extra=kv(path=path))
                            status, ctype = 500, "application/json"
                            body = json.dumps({"error": str(exc)}).encode()
                        break
                else:
                    status, ctype = 404, "application/json"
                    body = json.dumps({"error": "unknown path", "paths": sorted(routes)}).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet; node logs matter
                return

        server = ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        self.bound_port = server.server_address[1]
        if self.port_file is not None:
            tmp = self.port_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"host": self.host, "port": self.bound_port, "pid": os.getpid()}))
            os.replace(tmp, self.port_file)
        log.info("control API listening", extra=kv(url=f"http://{self.host}:{self.bound_port}"))
        thread = threading.Thread(target=server.serve_forever, name="control-api", daemon=True)
        thread.start()
        task_status.started(self.bound_port)
        try:
            await trio.sleep_forever()
        finally:
            server.shutdown()
            server.server_close()
            if self.port_file is not None:
                self.port_file.unlink(missing_ok=True)
