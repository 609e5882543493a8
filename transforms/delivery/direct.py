"""A keep-alive connection straight to the collector, for the sink's batch POSTs.

requests costs about 1.2 ms of CPU a POST on top of the connection's own work (measured
on the benchmark VM of session 18: the sink took 8.5 µs of CPU per event in batches of
500, about 5 µs with this session, 3.8 µs for the reference loop's bare ``http.client``), and a
bounded run's second phase is short of CPU. :class:`DirectSession` posts over
``http.client`` instead, one connection per delivering thread, and answers its caller in
requests' terms: the same response fields and the same exceptions, so the retry, timeout,
TLS and redirect decisions of the sink are unchanged.

It is used only where requests would itself go straight to the collector
(:func:`goes_direct`): no proxy for the URL, no ``~/.netrc`` credentials and no client
certificate. Anything else keeps requests.
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import ssl
import urllib.parse
from collections.abc import Mapping
from typing import Any, NamedTuple

import requests

from moesif_beam.transforms.delivery.transport import NotConnected

__all__ = ["DirectResponse", "DirectSession", "goes_direct"]


class DirectResponse(NamedTuple):
    """The fields of a requests ``Response`` the sink reads."""

    status_code: int
    headers: http.client.HTTPMessage  # .get() is case-insensitive, as requests' is
    text: str


def goes_direct(url: str, settings: Mapping[str, Any], auth: object) -> bool:
    """Whether requests would post to ``url`` straight, with ``settings`` from the environment.

    ``settings`` are what ``_settle_environment`` read (verify, proxies, cert); ``auth`` the
    session's credentials (from ``~/.netrc``). A proxy, credentials or a client certificate
    keep requests, which handles them.
    """
    if auth is not None or settings.get("cert"):
        return False
    proxies = settings.get("proxies") or {}
    return requests.utils.select_proxy(url, proxies) is None


def _tls_context(verify: str | bool) -> ssl.SSLContext:
    """Certificate checks as requests makes them for ``verify``."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    where = requests.utils.DEFAULT_CA_BUNDLE_PATH if verify is True else verify
    # requests takes a directory of hashed certificates as well as a bundle file.
    if os.path.isdir(where):
        return ssl.create_default_context(capath=where)
    return ssl.create_default_context(cafile=where)


def _dropped(sock: socket.socket) -> bool:
    """Whether an idle keep-alive connection was closed by the other side.

    Nothing is due on an idle connection: readable means the peer closed it (or broke the
    protocol), and a new one is made rather than finding out mid-request. urllib3 makes
    the same check before it reuses a pooled connection. ``poll``, not ``select``: a
    worker spilling to many partitions holds file descriptors past ``select``'s 1024.
    """
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _as_requests_error(exc: Exception, *, connecting: bool) -> requests.RequestException:
    """``exc`` as requests raises it: while connecting (nothing sent) or after the request."""
    if isinstance(exc, ssl.SSLError):
        return requests.exceptions.SSLError(exc)
    if isinstance(exc, TimeoutError):
        if connecting:
            return requests.exceptions.ConnectTimeout(exc)
        return requests.exceptions.ReadTimeout(exc)
    if connecting:
        return requests.exceptions.ConnectionError(NotConnected(str(exc)))
    return requests.exceptions.ConnectionError(exc)


class DirectSession:
    """Posts to one collector over one keep-alive connection; requests' interface, in part.

    Not thread-safe: one per delivering thread, as the sink keeps one requests session per
    thread. ``headers`` are sent with every request. Redirects are never followed
    (``http.client`` does not), which is what the sink asks of requests too.

    Failures raise what requests would: ``ConnectTimeout`` or ``ConnectionError`` (wrapping
    :class:`NotConnected`) when no connection was made, ``SSLError`` for TLS,
    ``ReadTimeout`` when the answer did not come in time, and ``ConnectionError`` when the
    connection broke after the request went out. The connection is dropped after any of
    them, and after a response that closes it.
    """

    def __init__(self, url: str, verify: str | bool = True) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            msg = f"not an http(s) URL: {parts.scheme}://{parts.hostname}"
            raise ValueError(msg)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._verify = verify
        self._context: ssl.SSLContext | None = None
        self._connection: http.client.HTTPConnection | None = None
        self.headers: dict[str, str] = {}

    def post(self, url: str, data: bytes, timeout: float, **_: Any) -> DirectResponse:
        """POST ``data`` to ``url``'s path on this session's host; the collector's answer."""
        target = urllib.parse.urlsplit(url)
        path = target.path or "/"
        if target.query:
            path = f"{path}?{target.query}"
        connection = self._connect(timeout)
        try:
            connection.request("POST", path, body=data, headers=self.headers)
            response = connection.getresponse()
            content = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise _as_requests_error(exc, connecting=False) from exc
        if response.will_close:
            self.close()
        return DirectResponse(response.status, response.headers, content.decode("utf-8", "replace"))

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        connection = self._connection
        if connection is not None and connection.sock is not None:
            if not _dropped(connection.sock):
                connection.sock.settimeout(timeout)
                return connection
            self.close()
        if self._tls:
            if self._context is None:
                self._context = _tls_context(self._verify)
            connection = http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._context
            )
        else:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        try:
            connection.connect()
        except OSError as exc:
            connection.close()
            raise _as_requests_error(exc, connecting=True) from exc
        # Headers and body leave without waiting on the peer's delayed ACK.
        if connection.sock is not None:
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connection = connection
        return connection

    def close(self) -> None:
        """Close the connection; the next post makes a new one."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
