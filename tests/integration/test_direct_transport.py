"""The sink's direct connection against a real HTTP server on loopback.

Keep-alive reuse, a connection the server closed while idle, refused connections, read
timeouts and dropped answers, each raised as requests would raise it so that the sink's
decisions (retry, delivery unknown) stay what they were with requests. TLS over the
direct connection is covered by test_transport_hardening.py's sink test.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from moesif_beam.transforms.delivery.direct import DirectSession, goes_direct
from moesif_beam.transforms.delivery.http import _HttpWriter
from moesif_beam.transforms.delivery.policy import RetryPolicy
from moesif_beam.transforms.delivery.transport import Secret, delivery_unknown
from moesif_beam.transforms.records import Record
from tests.unit.test_transport_hardening import _deliver


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.modes: list[str] = []  # what to do with each request, in order; then "ok"
        self.connections = 0
        self.bodies: list[tuple[str, bytes, dict[str, str]]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/events/batch"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def log_message(self, fmt: str, /, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            mode = self.server.modes.pop(0) if self.server.modes else "ok"
            self.server.bodies.append((self.path, body, dict(self.headers)))
        if mode == "drop":  # the request arrived; no answer ever comes
            self.close_connection = True
            return
        if mode == "slow":
            time.sleep(1.0)
        answer = b'{"error": "busy"}' if mode == "busy" else b"{}"
        self.send_response(503 if mode == "busy" else 201)
        self.send_header("Content-Length", str(len(answer)))
        if mode == "busy":
            self.send_header("Retry-After", "7")
        self.end_headers()
        self.wfile.write(answer)
        # "ok-then-close": answered as keep-alive, then closed while the client is idle.
        if mode == "ok-then-close":
            self.close_connection = True


@pytest.fixture
def server() -> Iterator[_Server]:
    running = _Server()
    thread = threading.Thread(target=running.serve_forever, daemon=True)
    thread.start()
    yield running
    running.shutdown()
    running.server_close()


def test_posts_reuse_one_connection_and_answer_as_requests_would(server):
    session = DirectSession(server.url)
    session.headers.update({"X-Moesif-Application-Id": "direct-app-id", "Content-Type": "x/y"})
    first = session.post(server.url, data=b"[1]", timeout=5, allow_redirects=False)
    server.modes.append("busy")
    second = session.post(server.url, data=b"[2]", timeout=5)
    session.close()

    assert (first.status_code, first.text) == (201, "{}")
    assert (second.status_code, second.text) == (503, '{"error": "busy"}')
    assert second.headers.get("retry-after") == "7"  # case-insensitive, as requests' are
    assert server.connections == 1
    assert [(path, body) for path, body, _ in server.bodies] == [
        ("/v1/events/batch", b"[1]"),
        ("/v1/events/batch", b"[2]"),
    ]
    assert server.bodies[0][2]["X-Moesif-Application-Id"] == "direct-app-id"


def test_a_connection_the_server_closed_while_idle_is_replaced_not_failed(server):
    session = DirectSession(server.url)
    server.modes.append("ok-then-close")
    assert session.post(server.url, data=b"[1]", timeout=5).status_code == 201
    time.sleep(0.2)  # the server has closed its end by now
    assert session.post(server.url, data=b"[2]", timeout=5).status_code == 201
    assert server.connections == 2
    assert len(server.bodies) == 2


def test_a_refused_connection_sent_nothing():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/events/batch"
    with pytest.raises(requests.exceptions.ConnectionError) as caught:
        DirectSession(url).post(url, data=b"[]", timeout=5)
    assert not delivery_unknown(caught.value)


def test_a_late_answer_is_a_read_timeout_and_a_dropped_one_a_lost_connection(server):
    session = DirectSession(server.url)
    server.modes.append("slow")
    with pytest.raises(requests.exceptions.ReadTimeout) as late:
        session.post(server.url, data=b"[1]", timeout=0.2)
    assert delivery_unknown(late.value)  # the body went out: it may have been stored

    server.modes.append("drop")
    with pytest.raises(requests.exceptions.ConnectionError) as dropped:
        session.post(server.url, data=b"[2]", timeout=5)
    assert delivery_unknown(dropped.value)

    # The session goes on with a new connection.
    assert session.post(server.url, data=b"[3]", timeout=5).status_code == 201


def test_the_writer_goes_direct_unless_a_proxy_or_credentials_apply(server, monkeypatch, tmp_path):
    policy = RetryPolicy(max_retry_seconds=5)
    batch = [("d-1", Record(0, b'{"transaction_id": "d-1"}', b"raw", "f:1"))]
    monkeypatch.delenv("NETRC", raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc

    writer = _HttpWriter(server.url, Secret("direct-app-id"), "events", 1, policy, 5.0)
    writer.open()
    letters, counts = _deliver(writer, batch)
    assert letters == [None]
    assert counts["sent"] == 1
    assert isinstance(writer._session(), DirectSession)

    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    proxied = _HttpWriter(server.url, Secret("direct-app-id"), "events", 1, policy, 5.0)
    proxied.open()
    assert isinstance(proxied._session(), requests.Session)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    bypassed = _HttpWriter(server.url, Secret("direct-app-id"), "events", 1, policy, 5.0)
    bypassed.open()
    assert isinstance(bypassed._session(), DirectSession)


def test_goes_direct_is_false_for_a_proxy_credentials_or_a_client_certificate():
    url = "https://api.moesif.net/v1/events/batch"
    assert goes_direct(url, {"verify": True, "proxies": {}, "cert": None}, None)
    assert goes_direct(url, {"proxies": {"http": "http://p:1"}}, None)  # not for https
    assert not goes_direct(url, {"proxies": {"https": "http://p:1"}}, None)
    assert not goes_direct(url, {"proxies": {"all": "http://p:1"}}, None)
    assert not goes_direct(url, {"proxies": {}}, ("user", "password"))
    assert not goes_direct(url, {"proxies": {}, "cert": "/client.pem"}, None)
