"""Fixtures: a real tx-server on 127.0.0.1, and a tiny scripted HTTP server.

The scripted server is a real ``http.server`` on a free port that answers each path from a
queue of canned replies (status, headers, body) and records every request it receives. It
stands in only where the tx-server cannot produce the situation on demand (5xx, 429,
``retry-after``, ``x-should-retry``) or does not serve an endpoint yet (training), so that what
the client *sends* can be checked byte for byte against the official SDK.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tx_server.testing import RunningServer, make_settings, run_server

API_KEY = "tml-tx-client-tests-0001"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    """A real tx-server (open-key mode) with a 0.5 s long-poll so pending polls end fast."""
    with run_server(make_settings(tmp_path, long_poll_seconds=0.5)) as running:
        yield running


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict[str, Any] | list[Any] = b"{}"
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Responder = Callable[[Received], Reply]


@dataclass
class Scripted:
    """Canned replies per path (a queue; the last reply repeats) and the request log."""

    url: str
    replies: dict[str, deque[Reply | Responder]] = field(default_factory=lambda: defaultdict(deque))
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def reply(
        status: int = 200,
        body: bytes | dict[str, Any] | list[Any] = b"{}",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Reply:
        """A canned reply (tests reach the class through the fixture)."""
        return Reply(status, body, headers or {}, content_type)

    def script(self, path: str, *replies: Reply | Responder) -> None:
        self.replies[f"/api/v1/{path}"].extend(replies)

    def calls(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path.split("?")[0] == f"/api/v1/{path}"]

    def answer(self, request: Received) -> Reply:
        with self.lock:
            self.received.append(request)
            queue = self.replies.get(request.path.split("?")[0])
            if not queue:
                return Reply(404, {"detail": f"no script for {request.path}"})
            item = queue.popleft() if len(queue) > 1 else queue[0]
        return item(request) if callable(item) else item


def _handler(scripted: Scripted) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # two writes per reply; avoid 40 ms delayed-ACK stalls

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            request = Received(
                self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
            )
            reply = scripted.answer(request)
            payload = (
                reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            )
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(payload)))
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = _serve  # noqa: N815 (http.server names)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    """A scripted server; ``client/config`` and ``dynamic_config`` answer ``{}`` by default."""
    state = Scripted("")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    state.script("client/config", Reply())
    state.script("client/dynamic_config", Reply())
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
