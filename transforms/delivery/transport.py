"""Talking to the collector safely: the secret, TLS, redirects and the preflight check.

The application id is a :class:`Secret`; no request that carries it follows a redirect,
and a TLS failure is a configuration error, never a retry.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import urllib.parse
from collections.abc import Iterator

import requests

from moesif_beam import __version__
from moesif_beam.transforms.common.errors import CollectorConfigError

_LOG = logging.getLogger(__name__)

__all__ = [
    "MIN_SECRET_LENGTH",
    "NotConnected",
    "Secret",
    "batch_url",
    "check_ca_bundle",
    "delivery_unknown",
    "preflight",
    "redirect_host",
    "tls_failure",
]


# The shortest application id accepted. A shorter secret is too easy to find in ordinary
# text: scrubbing it would mangle messages, and not scrubbing it would leak it.
MIN_SECRET_LENGTH = 8


# Characters that continue a token: the secret is scrubbed only where it is not part of a
# longer word, so an id "mark" never turns "marker" into "***er".
_WORD_CHARS = "A-Za-z0-9_-"


class Secret:
    """A string that never shows itself in reprs, logs, display data or error messages."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret, for the one place that must send it."""
        return self._value

    def scrub(self, text: str) -> str:
        """Replace every whole-token occurrence of the secret in ``text`` with ``***``.

        A whole token is one not preceded or followed by a letter, digit, ``_`` or ``-``.
        This is the one scrubber: the sink's error details and the CLI's failure report
        both use it.
        """
        if not self._value:
            return text
        pattern = rf"(?<![{_WORD_CHARS}]){re.escape(self._value)}(?![{_WORD_CHARS}])"
        return re.sub(pattern, "***", text)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


_USER_AGENT = f"moesif-beam/{__version__}"


class NotConnected(ConnectionError):
    """No connection to the collector could be made, so nothing was sent."""


def batch_url(base_url: str, kind: str) -> str:
    """The batch endpoint for ``kind`` under a collector base URL (``/v1`` suffix tolerated)."""
    base = base_url.rstrip("/")
    base = base.removesuffix("/v1")
    return f"{base}/v1/{kind}/batch"


def check_ca_bundle(path: str) -> None:
    """Refuse a ``--ca_bundle`` that is not a readable file of PEM certificates.

    Raises:
        ValueError: naming the path and what is wrong with it, in one line.
    """
    if not os.path.isfile(path):
        msg = f"--ca_bundle {path}: no such file"
        raise ValueError(msg)
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        msg = f"--ca_bundle {path}: not a readable PEM file of CA certificates ({exc})"
        raise ValueError(msg) from None


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).hostname or "?"


def redirect_host(location: str | None, url: str) -> str:
    """The host a redirect's ``Location`` points to (a relative one stays on ``url``'s host).

    Only the host is ever shown: a Location may carry anything, the id included.
    """
    if not location:
        return "(no Location header)"
    return _host(urllib.parse.urljoin(url, location.strip()))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: causes, contexts, urllib3's ``reason``, first arguments."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for inner in (
            current.__cause__,
            current.__context__,
            getattr(current, "reason", None),
            *current.args,
        ):
            if isinstance(inner, BaseException):
                pending.append(inner)


def tls_failure(exc: BaseException) -> bool:
    """Whether a request failed on TLS itself: a certificate, hostname or protocol problem.

    Those are configuration errors: retrying the same handshake gets the same answer. A TLS
    connection cut off mid-handshake (EOF, reset) is only a dropped connection, retried.
    """
    if not isinstance(exc, requests.exceptions.SSLError):
        return False
    return not any(
        isinstance(inner, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError)
        for inner in _chain(exc)
    )


def delivery_unknown(exc: BaseException) -> bool:
    """Whether a request that got no answer may have been delivered all the same.

    A read timeout or a connection lost after the body went out leaves the outcome unknown
    (the collector may have stored the batch); a refused or timed-out connect does not.
    """
    if isinstance(exc, requests.exceptions.ConnectTimeout | requests.exceptions.SSLError):
        return False
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError):
        return not any(
            isinstance(inner, NotConnected)
            or type(inner).__name__ in ("NewConnectionError", "NameResolutionError")
            for inner in _chain(exc)
        )
    return False


def _tls_message(url: str, exc: BaseException, application_id: Secret) -> str:
    reason = next(
        (str(inner) for inner in _chain(exc) if isinstance(inner, ssl.SSLError)), type(exc).__name__
    )
    return application_id.scrub(
        f"{CollectorConfigError.MARKER}: TLS failure talking to {_host(url)}: {reason[:200]}. "
        "Check --moesif_base_url, or trust a private CA with --ca_bundle PATH."
    )


def _redirect_message(url: str, status: int, location: str | None) -> str:
    return (
        f"{CollectorConfigError.MARKER}: HTTP {status} from {url}: a redirect to "
        f"{redirect_host(location, url)}; moesif-beam never follows redirects with the "
        "application id. Set --moesif_base_url to the collector's own URL."
    )


def preflight(
    base_url: str,
    application_id: Secret,
    timeout: float = 10.0,
    *,
    ca_bundle: str | None = None,
) -> None:
    """Check the application id against the collector before any data moves.

    ``GET /v1/config`` is the read Moesif's own SDKs make with the same header. A 401 or
    403, a redirect (never followed: it would carry the id to another host) or a TLS
    failure raises :class:`CollectorConfigError` so the run never starts; an unreachable
    collector only logs a warning, since the sink's retries may still get through.
    """
    url = f"{base_url.rstrip('/').removesuffix('/v1')}/v1/config"
    try:
        response = requests.get(
            url,
            headers={"X-Moesif-Application-Id": application_id.reveal(), "User-Agent": _USER_AGENT},
            timeout=timeout,
            allow_redirects=False,
            verify=ca_bundle or True,
        )
    except requests.RequestException as exc:
        if tls_failure(exc):
            raise CollectorConfigError(_tls_message(url, exc, application_id)) from None
        _LOG.warning("collector preflight: no answer from %s (%s)", url, type(exc).__name__)
        return
    if response.status_code in (401, 403):
        msg = (
            f"{CollectorConfigError.MARKER}: HTTP {response.status_code} from {url}: the Moesif "
            "application id was refused; check --moesif_application_id or "
            "MOESIF_APPLICATION_ID. Nothing was sent."
        )
        raise CollectorConfigError(msg)
    if 300 <= response.status_code < 400:
        location = response.headers.get("Location")
        raise CollectorConfigError(_redirect_message(url, response.status_code, location))
