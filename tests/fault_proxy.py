"""A loopback HTTP proxy for the synthesizer's fault tests: it forwards to a real server, or fails on purpose.

``FaultProxy(upstream, plan)`` listens on 127.0.0.1; ``plan(number, body)`` picks, for the
``number``-th POST (1-based) with the parsed JSON ``body``, one of :data:`FAULTS`; ``rewrite``, if
given, changes a request body before it is forwarded (to stand in for another server's dialect):

* ``pass``: forward to the upstream server and relay its answer;
* ``429``: answer 429 with ``Retry-After: 1`` (nothing forwarded);
* ``500``: answer 500 with a JSON error;
* ``401``: answer 401 (a refused key, echoed in the error message);
* ``400-max-tokens``: answer 400 as OpenAI's reasoning models do to ``max_tokens``;
* ``drop``: close the connection without an answer;
* ``truncate``: forward, then send the answer's headers and half its body, and close;
* ``nonjson``: answer 200 with ``content-type: application/json`` and an HTML body.

Every POST is logged (:class:`Exchange`) with the fault, the time, the request and, for
``pass``, the body relayed, so a test can recompute what the client should have accepted.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("pass", "429", "500", "401", "400-max-tokens", "drop", "truncate", "nonjson")
MAX_TOKENS_REFUSAL = {
    "error": {
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
        "Use 'max_completion_tokens' instead.",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "unsupported_parameter",
    }
}


@dataclass
class Exchange:
    number: int
    fault: str
    started: float
    request: dict
    authorization: str | None
    status: int | None = None
    body: bytes | None = None  # relayed to the client (pass only)

    @property
    def content(self) -> str | None:
        """The assistant message of a relayed chat completion."""
        if self.fault != "pass" or self.status != 200 or self.body is None:
            return None
        return json.loads(self.body)["choices"][0]["message"]["content"]


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        plan: Callable[[int, dict], str] = lambda number, body: "pass",
        rewrite: Callable[[dict], dict] | None = None,
    ):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.plan, self.rewrite = plan, rewrite
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                return

            def do_GET(self):
                status, headers, body = proxy._forward("GET", self.path, None, dict(self.headers))
                self._answer(status, headers, body)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    request = json.loads(raw)
                except ValueError:
                    request = {}
                with proxy._lock:
                    number = len(proxy.exchanges) + 1
                    fault = proxy.plan(number, request)
                    if fault not in FAULTS:
                        raise ValueError(f"plan: unknown fault {fault!r}")
                    exchange = Exchange(number, fault, time.monotonic(), request, self.headers.get("Authorization"))
                    proxy.exchanges.append(exchange)
                if fault == "drop":
                    self._hang_up()
                elif fault == "400-max-tokens":
                    exchange.status = 400
                    self._answer(400, {"Content-Type": "application/json"}, json.dumps(MAX_TOKENS_REFUSAL).encode())
                elif fault in ("429", "500", "401"):
                    message = {
                        "429": "rate limited, slow down",
                        "500": "injected server error",
                        # as some servers do: the refused key echoed back
                        "401": f"invalid api key: {self.headers.get('Authorization')}",
                    }[fault]
                    exchange.status = int(fault)
                    extra = {"Retry-After": "1"} if fault == "429" else {}
                    self._answer(
                        int(fault),
                        {"Content-Type": "application/json", **extra},
                        json.dumps({"error": {"message": message, "type": "injected"}}).encode(),
                    )
                elif fault == "nonjson":
                    exchange.status = 200
                    self._answer(200, {"Content-Type": "application/json"}, b"<html><body>502 Bad Gateway</body>")
                else:
                    if proxy.rewrite is not None:
                        raw = json.dumps(proxy.rewrite(dict(request))).encode()
                    status, headers, body = proxy._forward("POST", self.path, raw, dict(self.headers))
                    if fault == "truncate":
                        self.send_response(status)
                        self.send_header("Content-Type", headers.get("Content-Type", "application/json"))
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        self._hang_up()
                    else:
                        exchange.status, exchange.body = status, body
                        self._answer(status, headers, body)

            def _answer(self, status, headers, body):
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _hang_up(self):
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _forward(self, method, path, body, headers):
        connection = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=600)
        keep = {k: v for k, v in headers.items() if k.lower() in ("content-type", "authorization", "accept")}
        connection.request(method, path, body=body, headers=keep)
        response = connection.getresponse()
        data = response.read()
        out = {k: v for k, v in response.getheaders()}
        connection.close()
        return response.status, out, data

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
