"""Serving: the threaded HTTP server, :class:`RunningCollector` and :func:`start_in_thread`."""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import threading
from collections.abc import Iterator, Mapping
from http.server import ThreadingHTTPServer
from types import TracebackType
from typing import Any

from moesif_beam.runners.emulators.collector.config import CollectorConfig
from moesif_beam.runners.emulators.collector.faults import _tls_context
from moesif_beam.runners.emulators.collector.handler import _Handler
from moesif_beam.runners.emulators.collector.state import _Collector

# One logger for the whole emulator, named after its package.
_LOG = logging.getLogger(__package__)


class _CollectorServer(ThreadingHTTPServer):
    """The HTTP server; tracks connections and requests in flight for a clean ``stop()``."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, collector: _Collector, *, verbose: bool) -> None:
        self.collector = collector
        self.verbose = verbose
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        # Set by stop(): wakes handlers sleeping for injected latency and quiets late errors.
        self.stopping = threading.Event()
        self._active = 0
        self._idle = threading.Condition()
        config = collector.config
        self.tls: ssl.SSLContext | None = _tls_context(config)
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        # The handshake runs here, on the connection's own thread, so a client that
        # never completes it (or refuses our certificate) holds up no one else.
        request.settimeout(10)
        try:
            connection = self.tls.wrap_socket(request, server_side=True)
        except OSError:
            _LOG.debug("TLS handshake with %s failed", client_address, exc_info=True)
            return
        try:
            super().finish_request(connection, client_address)
        finally:
            connection.close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on reverse DNS;
        # the plain TCP bind is all we need.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that vanish mid-request are routine in fault tests; never print tracebacks.
        _LOG.debug("connection from %s ended with an error", client_address, exc_info=True)

    def track(self, connection: socket.socket, *, add: bool) -> None:
        with self._connections_lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Marks one request as being handled, for ``wait_idle``."""
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> None:
        """Waits until no request is being handled, or ``timeout`` seconds pass."""
        with self._idle:
            self._idle.wait_for(lambda: self._active == 0, timeout)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)


class RunningCollector:
    """An emulator serving in a background thread; also a context manager that stops it.

    Attributes:
        config: The configuration it runs with.
        url: Base URL without a trailing slash, e.g. ``http://127.0.0.1:54321``; append
            ``/v1/events/batch`` and so on.
    """

    def __init__(
        self, server: _CollectorServer, thread: threading.Thread, collector: _Collector
    ) -> None:
        self._server = server
        self._thread = thread
        self._collector = collector
        self._stopped = False
        self._stop_lock = threading.Lock()
        self.config = collector.config
        host, port = server.server_address[:2]
        text = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{text}]" if ":" in text else text
        scheme = "https" if server.tls is not None else "http"
        self.url = f"{scheme}://{shown}:{port}"

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with ``port=0``)."""
        return int(self._server.server_address[1])

    def stats(self) -> dict[str, Any]:
        """Returns the same counters as ``GET /_emulator/stats``.

        Returns:
            ``records`` (stored records per kind), ``requests`` (per route, per status),
            ``items_received`` (items in every well-formed body), ``content_encodings``
            (well-formed bodies per Content-Encoding), ``items_accepted`` (items in 201
            answers), ``items_stored`` (new records; upserts count each item),
            ``duplicates`` (events and actions dropped by transaction_id), ``faults``
            (``dropped``, ``failed``), ``store``, ``metadata_schema`` (key -> JSON type,
            sorted by key) and ``type_conflicts`` (requests refused for a metadata type
            conflict).
        """
        return self._collector.stats()

    def seed_schema(self, types: Mapping[str, str]) -> dict[str, str]:
        """Adds metadata keys to the schema, as if records had sent them first.

        Like ``POST /_emulator/schema``. Keys the schema already knows keep their type (first
        wins); dots in keys are converted. Persisted like learned keys.

        Args:
            types: Key name -> one of ``METADATA_TYPES``.

        Returns:
            The resulting schema, sorted by key.

        Raises:
            ValueError: If a type name is unknown; nothing is then added.
        """
        return self._collector.seed_schema(types)

    def records(self, kind: str) -> list[dict[str, Any]]:
        """Returns every stored record of one kind, as parsed JSON, in arrival order.

        Upserted profiles are returned merged, in the order they were first created. With
        ``store="count"`` no bodies are kept and the list is empty.

        Args:
            kind: One of ``events``, ``actions``, ``users``, ``companies``, ``subscriptions``.

        Raises:
            ValueError: If ``kind`` is unknown.
        """
        return self._collector.records(kind)

    def reset(self) -> None:
        """Drops every record, counter and metadata schema key; restarts the fault schedule."""
        self._collector.reset()

    def stop(self) -> None:
        """Stops serving, closes open connections and the store; safe to call twice."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self._server.stopping.set()
        self._server.shutdown()
        # Let requests in flight finish writing to the store before it is closed; idle
        # keep-alive connections are then woken by shutting their sockets down.
        self._server.wait_idle(timeout=5)
        self._server.close_connections()
        self._server.server_close()
        self._thread.join(timeout=10)
        self._collector.close()

    def __enter__(self) -> RunningCollector:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_in_thread(config: CollectorConfig, *, verbose: bool = False) -> RunningCollector:
    """Starts an emulator in a daemon thread.

    Args:
        config: What to emulate and which faults to inject.
        verbose: Log one INFO line per request (method, path, status, item count; never
            headers) to the logger ``moesif_beam.runners.emulators.collector``.

    Returns:
        The running emulator. Its socket is already listening, so requests to ``url`` succeed
        at once.

    Raises:
        OSError: If the address cannot be bound.
    """
    collector = _Collector(config)
    try:
        server = _CollectorServer(collector, verbose=verbose)
    except BaseException:
        collector.close()
        raise
    # A short poll interval makes stop() return quickly.
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name=f"moesif-collector:{server.server_address[1]}",
        daemon=True,
    )
    thread.start()
    return RunningCollector(server, thread, collector)
