"""Deterministic generator of WSO2 API Manager analytics events as JSON Lines.

The output imitates what a WSO2 gateway logs for its analytics publishers (Moesif, ELK):
``apim_event_response`` success events and ``apim_event_faulty`` fault events, one JSON object per
line, with the quirks real logs have: timestamps without zero parts, a few with an offset or as
epoch milliseconds, replayed and re-emitted correlationIds and, on request, malformed lines.

Only the standard library is used. The catalogue of APIs, applications, users, IPs and User-Agents
is fixed (built once from a constant seed) and ``seed`` drives every per-event choice, so the same
arguments always give the same bytes. Catalogue values are JSON-encoded once and each event line
is assembled from those fragments, which keeps a million events well under a minute.

Usage::

    python samples/generate_wso2.py --count 1000 --out events.jsonl
    python samples/generate_wso2.py --count 1000000 --out events.jsonl.gz --malformed 50
    python samples/generate_wso2.py --count 10 --out - --seed 1

Benchmarks import it with ``from samples.generate_wso2 import generate``.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import random
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")

START = datetime(2026, 11, 1, tzinfo=UTC)
"""Time of the first event: 2026-11-01T00:00:00Z."""
START_EPOCH_MS = int(START.timestamp() * 1000)
SPAN_MS = 86_400_000
"""Events are spread evenly (with jitter) over one day."""

_POOL_SEED = 20261101
_DUP_WINDOW = 1000  # repeats pick one of the last this many fresh events
_REEMIT_SHARE = 0.15  # share of repeats re-emitted with a new timestamp
_OFFSET_RATE = 0.002
_EPOCH_RATE = 0.002
_WHOLE_SECOND_RATE = 0.004
_WHOLE_MINUTE_RATE = 0.002
_OFFSETS = (("+05:30", 330), ("+05:30", 330), ("-05:00", -300))
_ANONYMOUS_RATE = 0.03
_SANDBOX_RATE = 0.15
_UNKNOWN_IP_RATE = 0.02
_ELK_FAMILY_RATE = 0.1
_CACHE_HIT_RATE = 0.04
_BACKEND_ERROR_RATE = 0.07

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _j(value: object) -> str:
    """Encode one value as compact JSON text."""
    return _ENCODER.encode(value)


def _kv(key: str, value: object) -> str:
    """Encode one ``"key":value`` member."""
    return f"{_j(key)}:{_j(value)}"


def _dumps(value: object) -> bytes:
    return _ENCODER.encode(value).encode()


class _Picker(Generic[T]):
    """Weighted random choice with precomputed cumulative weights."""

    __slots__ = ("_cum", "_items", "_total")

    def __init__(self, weighted: Sequence[tuple[T, float]]) -> None:
        self._items = [item for item, _ in weighted]
        self._cum: list[float] = []
        running = 0.0
        for _, weight in weighted:
            running += weight
            self._cum.append(running)
        self._total = running

    def pick(self, rng: random.Random) -> T:
        """Return one item, chosen with probability proportional to its weight.

        Args:
            rng: The random source.

        Returns:
            The chosen item.
        """
        return self._items[bisect.bisect_right(self._cum, rng.random() * self._total)]


def _one_of(rng: random.Random, items: Sequence[T]) -> T:
    return items[int(rng.random() * len(items))]


# The dataclasses below hold pool values already encoded as JSON fragments.


@dataclass(frozen=True, slots=True)
class _Resource:
    head: str  # "apiMethod":…,"apiResourceTemplate":…
    status: int
    size: int
    cacheable: bool
    completion: bool  # AI resources that return completion tokens
    gateway_urls: tuple[str, ...]  # "x-original-gw-url":… members


@dataclass(frozen=True, slots=True)
class _Api:
    head: str  # "apiCreator":…,"apiVersion":…
    destination: str
    context: str  # "apiContext":… member of properties
    content_type: str  # "responseContentType":… member of properties
    resources: _Picker[_Resource]
    latency_ms: float
    ai: bool


@dataclass(frozen=True, slots=True)
class _App:
    members: str  # "applicationId":…,"applicationName":…,"applicationOwner":…


@dataclass(frozen=True, slots=True)
class _User:
    name: str  # JSON string
    apps: tuple[_App, ...]
    ip: str  # JSON string
    agent: int


@dataclass(frozen=True, slots=True)
class _Fault:
    members: str  # "errorCode":…,"errorMessage":…,"errorType":…
    status: int
    error_type: str
    code: int
    authentication: bool


# (raw header, browser family, OS family)
_AGENTS: tuple[tuple[str, str, str], ...] = (
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/130.0.0.0 Safari/537.36",
        "Chrome",
        "Windows",
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/129.0.0.0 Safari/537.36",
        "Chrome",
        "Mac OS X",
    ),
    (
        "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0",
        "Firefox",
        "Linux",
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6_1) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/18.0 Safari/605.1.15",
        "Safari",
        "Mac OS X",
    ),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_0 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/18.0 Mobile/15E148 Safari/604.1",
        "Mobile Safari",
        "iOS",
    ),
    (
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/130.0.6723.58 Mobile Safari/537.36",
        "Chrome Mobile",
        "Android",
    ),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/130.0.0.0 Safari/537.36 Edg/130.0.2849.56",
        "Edge",
        "Windows",
    ),
    ("PostmanRuntime/7.42.0", "PostmanRuntime", "Other"),
    ("curl/8.5.0", "curl", "Other"),
    ("okhttp/4.12.0", "okhttp", "Android"),
    ("python-requests/2.32.3", "Python Requests", "Other"),
    ("Apache-HttpClient/4.5.14 (Java/17.0.12)", "Apache-HttpClient", "Other"),
    ("Go-http-client/1.1", "Go-http-client", "Other"),
    ("axios/1.7.7", "axios", "Other"),
)

_AGENT_MEMBERS = tuple(
    (_kv("userAgentHeader", raw), f",{_kv('userAgent', family)},{_kv('platform', os_family)}")
    for raw, family, os_family in _AGENTS
)
_AGENT_WEIGHTS = (20, 10, 5, 5, 12, 10, 4, 6, 4, 6, 5, 5, 3, 5)

_FIRST_NAMES = (  # noqa: SIM905
    "alice bob carol dave erin frank grace heidi ivan judy mallory niaj olivia peggy rupert "
    "sybil trent victor walter xavier yvonne zara amir bianca chen dmitri elena fatima giorgio "
    "hana igor jamal kenji lena mateo nadia oscar priya quentin rosa sanjay tomas uma vera "
    "wen yusuf zoltan anika bruno chloe diego emma felix gita hugo isla jonas kofi lucia marco "
    "nora omar paula raj sofia"
).split()

_TENANTS = (("carbon.super", 0.7), ("acme.com", 0.2), ("globex.io", 0.1))

_APP_NAMES = (  # noqa: SIM905
    "DefaultApplication MobileShop PartnerPortal CheckoutService InventorySync ReportingJob "
    "CustomerWeb AdminConsole LoyaltyApp AnalyticsExporter FieldServiceApp KioskClient "
    "SupportDesk BillingWorker SearchFrontend NotificationHub OrderTracker DataPipeline "
    "QA-Automation SandboxPlayground WarehouseScanner PricingEngine ChatAssistant "
    "StoreLocator FleetManager ClaimsPortal HRIntegration MarketingSite PaymentsGateway "
    "TestHarness"
).split()

_APP_OWNERS = {
    "carbon.super": ("admin", "alice", "dave", "grace", "publisher1"),
    "acme.com": ("bob@acme.com", "admin@acme.com"),
    "globex.io": ("carol@globex.io",),
}


def _fault(error_type: str, code: int, message: str, status: int) -> _Fault:
    members = f"{_kv('errorCode', code)},{_kv('errorMessage', message)},"
    members += _kv("errorType", error_type)
    authentication = message == "AUTHENTICATION_FAILURE"
    return _Fault(members, status, error_type, code, authentication)


# errorType/errorCode/errorMessage as WSO2 classifies them; throttling is the most common fault.
_FAULTS = _Picker[_Fault](
    [
        (_fault("THROTTLED", 900800, "API_LEVEL_LIMIT_EXCEEDED", 429), 8),
        (_fault("THROTTLED", 900801, "HARD_LIMIT_EXCEEDED", 429), 3),
        (_fault("THROTTLED", 900802, "RESOURCE_LEVEL_LIMIT_EXCEEDED", 429), 10),
        (_fault("THROTTLED", 900803, "APPLICATION_LEVEL_LIMIT_EXCEEDED", 429), 15),
        (_fault("THROTTLED", 900804, "SUBSCRIPTION_LIMIT_EXCEEDED", 429), 12),
        (_fault("THROTTLED", 900805, "BLOCKED", 429), 2),
        (_fault("THROTTLED", 900806, "CUSTOM_POLICY_LIMIT_EXCEEDED", 429), 2),
        (_fault("THROTTLED", 900807, "BURST_CONTROL_LIMIT_EXCEEDED", 429), 3),
        (_fault("AUTH", 900901, "AUTHENTICATION_FAILURE", 401), 10),
        (_fault("AUTH", 900902, "AUTHENTICATION_FAILURE", 401), 7),
        (_fault("AUTH", 900903, "AUTHENTICATION_FAILURE", 401), 4),
        (_fault("AUTH", 900908, "SUBSCRIPTION_VALIDATION_FAILURE", 403), 4),
        (_fault("TARGET_CONNECTIVITY", 101503, "OTHER", 503), 7),
        (_fault("TARGET_CONNECTIVITY", 101504, "CONNECTION_TIMEOUT", 504), 5),
        (_fault("OTHER", 404, "RESOURCE_NOT_FOUND", 404), 8),
    ]
)

# Backend error responses passed through by the gateway (proxyResponseCode == targetResponseCode).
_BACKEND_ERRORS = _Picker[int](
    [(400, 3), (401, 1), (404, 4), (409, 1), (422, 1), (500, 2), (502, 1), (503, 1)]
)

# Custom properties (from an AnalyticsCustomDataProvider): dotted keys, nested objects, arrays.
_CUSTOM_FLAT = tuple(
    f"{_kv('x.tenant.region', region)},{_kv('client.version', version)}"
    for region in ("eu-west", "us-east", "ap-south", "eu-central")
    for version in ("2.3.1", "2.4.0", "1.9.7", "3.0.0-rc1")
)
_CUSTOM_NESTED = tuple(
    f"{_kv('tags', tags)},{_kv('geo', geo)}"
    for tags in (["beta", "mobile"], ["internal"], ["partner", "gold"], [])
    for geo in (
        {"country": "DE", "city.name": "Berlin"},
        {"country": "DE", "city.name": "München"},
        {"country": "BR", "city.name": "São Paulo"},
        {"country": "IN", "city.name": "Bengaluru"},
        {"country": "US", "city.name": "Austin", "coords": [30.27, -97.74]},
    )
)
_AI_METADATA = _Picker[str](
    [
        (_kv("aiMetadata", {"vendorName": "OpenAI", "vendorVersion": "v1", "model": model}), w)
        for model, w in (("gpt-4o", 0.5), ("gpt-4o-mini", 0.4), ("o3-mini", 0.1))
    ]
)
_COMMON_NAME = _kv("commonName", "N/A")
_COMMON_NAME_MTLS = _kv("commonName", "partner-gw.acme.com")
_SUBTYPE = _kv("subType", "DEFAULT")
_SUBTYPE_LOWER = _kv("subtype", "DEFAULT")
_SUBTYPE_AI = _kv("subtype", "AIAPI")
_FAULT_CONTENT_TYPE = _kv("responseContentType", "application/json; charset=UTF-8")
_ANONYMOUS = _j("anonymous")
_UNKNOWN = _j("UNKNOWN")

# The two examples from WSO2's Moesif integration guide, with the guide's syntax errors
# (a missing comma after "userName" and after "apiResourceTemplate"), flattened to one line.
_SEED_RESPONSE = """{
    "apiCreator": "admin",
    "apiCreatorTenantDomain": "carbon.super",
    "apiId": "43d030dc-427f-4678-98e3-87b7d9882b5f",
    "apiMethod": "GET",
    "apiName": "SampleAPI",
    "apiResourceTemplate": "/*",
    "apiType": "HTTP",
    "apiVersion": "1.0.0",
    "applicationId": "2d6c54b0-7c7d-4b50-83dc-e6ae6f88962e",
    "applicationName": "DefaultApplication",
    "applicationOwner": "admin",
    "backendLatency": 13,
    "correlationId": "79ed20c3-55b1-434a-adf6-eea25e2d09c3",
    "destination": "http://xxx.xxx.xxx.xx:8281/services/sampleAPIBackend",
    "eventType": "response",
    "gatewayType": "SYNAPSE",
    "keyType": "SANDBOX",
    "userName":"admin@carbon.super"
    "proxyResponseCode": 202,
    "regionId": "default",
    "requestMediationLatency": 54,
    "requestTimestamp": "2022-01-20T03:34:36.451Z",
    "responseCacheHit": false,
    "responseLatency": 73,
    "responseMediationLatency": 6,
    "targetResponseCode": 202,
    "userAgent": "Chrome",
    "userIp": "xxx.xx.xx.xx",
    "properties": {
        "commonName": "N/A",
        "responseContentType": "application/json; charset=UTF-8",
        "subType": "DEFAULT",
        "isEgress": false,
        "apiContext": "/api1/2.0.0",
        "responseSize": 133,
        "userName": "admin@carbon.super"
    }
}"""

_SEED_FAULT = """{
    "apiCreator": "admin",
    "apiCreatorTenantDomain": "carbon.super",
    "apiId": "43d030dc-427f-4678-98e3-87b7d9882b5f",
    "apiName": "SampleAPI",
    "apiType": "HTTP",
    "apiVersion": "1.0.0",
    "apiMethod": "GET",
    "apiResourceTemplate": "/publish"
    "applicationId": "0b5ccc91-30e2-4ee5-9355-d1698075c028",
    "applicationName": "SampleApp3",
    "applicationOwner": "admin",
    "correlationId": "ccf2196f-9db8-429b-aaae-98f4c6edf6d7",
    "errorCode": 900803,
    "errorMessage": "APPLICATION_LEVEL_LIMIT_EXCEEDED",
    "errorType": "THROTTLED",
    "eventType": "fault",
    "gatewayType": "SYNAPSE",
    "keyType": "PRODUCTION",
    "proxyResponseCode": 429,
    "regionId": "default",
    "requestTimestamp": "2022-02-01T04:18:48.023Z",
    "responseCacheHit": false,
    "targetResponseCode": -1,
     "properties": {
        "commonName": "N/A",
        "responseContentType": "application/json; charset=UTF-8",
        "subType": "DEFAULT",
        "isEgress": false,
        "apiContext": "/api1/2.0.0",
        "responseSize": 133,
        "userName": "admin@carbon.super"
    }
}"""

MALFORMED_KINDS = (
    "truncated_json",
    "bad_utf8",
    "json_array",
    "plain_text",
    "missing_request_timestamp",
    "string_proxy_response_code",
    "unparseable_timestamp",
    "seed_response_example",
    "seed_fault_example",
)
"""Kinds of malformed lines, used in turn (in a seeded order) when ``malformed`` > 0."""


def _flatten(text: str) -> bytes:
    return " ".join(part.strip() for part in text.splitlines()).encode()


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@cache
def _date_text(day: int) -> str:
    return (START + timedelta(days=day)).strftime("%Y-%m-%d")


def _iso(offset_ms: int, suffix: str = "Z") -> str:
    """Format ``START + offset_ms`` like Java's ``OffsetDateTime.toString()``.

    Java drops a zero millisecond part, and the seconds too when both are zero.
    """
    day, rest = divmod(offset_ms, 86_400_000)
    hour, rest = divmod(rest, 3_600_000)
    minute, rest = divmod(rest, 60_000)
    second, milli = divmod(rest, 1000)
    if milli:
        return f"{_date_text(day)}T{hour:02d}:{minute:02d}:{second:02d}.{milli:03d}{suffix}"
    if second:
        return f"{_date_text(day)}T{hour:02d}:{minute:02d}:{second:02d}{suffix}"
    return f"{_date_text(day)}T{hour:02d}:{minute:02d}{suffix}"


def _random_ip(rng: random.Random) -> str:
    if rng.random() < 0.08:
        return f"2001:db8:{rng.randrange(0x10000):x}::{rng.randrange(0x10000):x}"
    first = rng.choice((10, 31, 49, 81, 93, 103, 141, 172, 185, 203))
    return f"{first}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


# One API: name, context, version, creator, tenant, type, backend, gateway URL, typical backend
# latency (ms), weight, resources (method, template, concrete paths, status, size, weight).
_ApiSpec = tuple[
    str,
    str,
    str,
    str,
    str,
    str,
    str,
    str,
    float,
    float,
    tuple[tuple[str, str, tuple[str, ...], int, int, float], ...],
]
_GW = "https://gw.example.com:8243"
_ORDERS = ("/order/1001", "/order/7f3c2a", "/order/42", "/order/99812")
_PETS = ("/pet/1", "/pet/12", "/pet/10042")
_ITEMS = ("/items/SKU-1042", "/items/SKU-77", "/items/SKU-9001")
_PAYMENTS = ("/payments/pay_8sJ2k", "/payments/pay_Q1x9Z")
_API_SPECS: tuple[_ApiSpec, ...] = (
    (
        "PizzaShackAPI",
        "/pizzashack/1.0.0",
        "1.0.0",
        "admin",
        "carbon.super",
        "HTTP",
        "https://localhost:9443/am/sample/pizzashack/v1/api/",
        _GW,
        35,
        25,
        (
            ("GET", "/menu", ("/menu", "/menu?lang=en"), 200, 2400, 30),
            ("POST", "/order", ("/order",), 201, 310, 10),
            ("GET", "/order/{orderId}", _ORDERS, 200, 420, 15),
            ("PUT", "/order/{orderId}", _ORDERS, 200, 420, 3),
            ("DELETE", "/order/{orderId}", _ORDERS, 204, 0, 2),
        ),
    ),
    (
        "SampleAPI",
        "/api1/2.0.0",
        "2.0.0",
        "admin",
        "carbon.super",
        "HTTP",
        "http://10.20.4.17:8281/services/sampleAPIBackend",
        _GW,
        13,
        10,
        (
            ("GET", "/*", ("/status", "/reports/2026/11", "/ping?verbose=1"), 200, 133, 6),
            ("POST", "/*", ("/publish", "/events"), 202, 90, 2),
        ),
    ),
    (
        "SwaggerPetstore",
        "/petstore/1.0.5",
        "1.0.5",
        "publisher1",
        "carbon.super",
        "HTTP",
        "https://petstore3.swagger.io/api/v3",
        _GW,
        120,
        15,
        (
            ("GET", "/pet/findByStatus", ("/pet/findByStatus?status=sold",), 200, 5200, 8),
            ("GET", "/pet/{petId}", _PETS, 200, 380, 10),
            ("POST", "/pet", ("/pet",), 200, 380, 2),
            ("PUT", "/pet", ("/pet",), 200, 380, 1),
            ("DELETE", "/pet/{petId}", _PETS, 200, 0, 1),
            ("GET", "/store/inventory", ("/store/inventory",), 200, 160, 3),
        ),
    ),
    (
        "InventoryAPI",
        "/t/acme.com/inventory/1.2.0",
        "1.2.0",
        "bob@acme.com",
        "acme.com",
        "HTTP",
        "http://inventory.acme.internal:8080/v1",
        "https://api.acme.com",
        60,
        15,
        (
            ("GET", "/items", ("/items?page=1", "/items?page=2&size=50"), 200, 8800, 8),
            ("GET", "/items/{itemId}", _ITEMS, 200, 640, 12),
            ("POST", "/items", ("/items",), 201, 640, 2),
            ("PATCH", "/items/{itemId}", _ITEMS, 200, 640, 3),
        ),
    ),
    (
        "PaymentsAPI",
        "/t/globex.io/payments/3.0.0",
        "3.0.0",
        "carol@globex.io",
        "globex.io",
        "HTTP",
        "https://payments.globex.internal/api/v3",
        "https://api.globex.io",
        180,
        10,
        (
            ("POST", "/payments", ("/payments",), 201, 520, 6),
            ("GET", "/payments/{paymentId}", _PAYMENTS, 200, 520, 8),
            ("POST", "/refunds", ("/refunds",), 201, 300, 1),
        ),
    ),
    (
        "StarWarsAPI",
        "/swapi/1.0.0",
        "1.0.0",
        "alice",
        "carbon.super",
        "GRAPHQL",
        "https://swapi-graphql.netlify.app/.netlify/functions/index",
        _GW,
        90,
        8,
        (
            # GraphQL: the template is the sorted, comma-joined operation names.
            ("POST", "hero", ("",), 200, 900, 5),
            ("POST", "allFilms,hero", ("",), 200, 3100, 2),
            ("POST", "search", ("",), 200, 1500, 2),
        ),
    ),
    (
        "PhoneVerification",
        "/phoneverify/1.0.0",
        "1.0.0",
        "admin",
        "carbon.super",
        "SOAP",
        "http://ws.cdyne.com/phoneverify/phoneverify.asmx",
        _GW,
        240,
        5,
        (("POST", "/*", ("",), 200, 1100, 1),),
    ),
    (
        "OpenAIChatAPI",
        "/openai/1.0.0",
        "1.0.0",
        "grace",
        "carbon.super",
        "HTTP",
        "https://api.openai.com/v1",
        _GW,
        1400,
        12,
        (
            ("POST", "/chat/completions", ("/chat/completions",), 200, 1800, 8),
            ("POST", "/embeddings", ("/embeddings",), 200, 12000, 2),
        ),
    ),
)


def _build_api(spec: _ApiSpec, api_id: str) -> _Api:
    name, context, version, creator, tenant, api_type, backend, gw, latency, _, resources = spec
    head = ",".join(
        (
            _kv("apiCreator", creator),
            _kv("apiCreatorTenantDomain", tenant),
            _kv("apiId", api_id),
            _kv("apiName", name),
            _kv("apiType", api_type),
            _kv("apiVersion", version),
        )
    )
    media_type = "text/xml" if api_type == "SOAP" else "application/json"
    picker = _Picker(
        [
            (
                _Resource(
                    head=f"{_kv('apiMethod', method)},{_kv('apiResourceTemplate', template)}",
                    status=status,
                    size=size,
                    cacheable=method == "GET",
                    completion=template.startswith("/chat"),
                    gateway_urls=tuple(
                        _kv("x-original-gw-url", f"{gw}{context}{path}") for path in paths
                    ),
                ),
                weight,
            )
            for method, template, paths, status, size, weight in resources
        ]
    )
    return _Api(
        head=head,
        destination=_kv("destination", backend),
        context=_kv("apiContext", context),
        content_type=_kv("responseContentType", f"{media_type}; charset=UTF-8"),
        resources=picker,
        latency_ms=latency,
        ai=name.startswith("OpenAI"),
    )


class _Catalog:
    """Fixed pools of APIs, applications, users and client addresses."""

    def __init__(self) -> None:
        rng = random.Random(_POOL_SEED)
        self.apis = _Picker([(_build_api(spec, _uuid(rng)), spec[9]) for spec in _API_SPECS])
        apps_by_tenant: dict[str, list[_App]] = {tenant: [] for tenant, _ in _TENANTS}
        tenant_picker = _Picker(_TENANTS)
        for index, name in enumerate(_APP_NAMES):
            tenant = "carbon.super" if index < 2 else tenant_picker.pick(rng)
            owner = "admin" if index == 0 else rng.choice(_APP_OWNERS[tenant])
            members = f"{_kv('applicationId', _uuid(rng))},{_kv('applicationName', name)},"
            apps_by_tenant[tenant].append(_App(members + _kv("applicationOwner", owner)))
        self.shared_ips = tuple(_j(_random_ip(rng)) for _ in range(300))
        users: list[tuple[_User, float]] = []
        names = ["admin"] + [f"{n}{tail}" for tail in ("", ".k", ".m", ".r") for n in _FIRST_NAMES]
        for tenant, share in _TENANTS:
            for name in names[: round(200 * share)]:
                apps = tuple(rng.sample(apps_by_tenant[tenant], k=rng.choice((1, 1, 2))))
                agent = rng.choices(range(len(_AGENTS)), weights=_AGENT_WEIGHTS)[0]
                user = _User(_j(f"{name}@{tenant}"), apps, _j(_random_ip(rng)), agent)
                # A few heavy users, a long tail of light ones.
                users.append((user, 1.0 / (len(users) % 37 + 1) ** 0.7))
        self.users = _Picker(users)
        self.anonymous_app = _App(
            f"{_kv('applicationId', 'anonymous')},{_kv('applicationName', 'anonymous')},"
            + _kv("applicationOwner", "anonymous")
        )


@cache
def _catalog() -> _Catalog:
    return _Catalog()


def _event_line(catalog: _Catalog, rng: random.Random, timestamp: str, fault: bool) -> bytes:
    """Build one event line.

    Args:
        catalog: The pools to draw from.
        rng: The random source.
        timestamp: JSON text of ``requestTimestamp`` (a quoted string or an integer).
        fault: Whether to build an ``apim_event_faulty`` event instead of a success event.

    Returns:
        The compact JSON line.
    """
    api = catalog.apis.pick(rng)
    resource = api.resources.pick(rng)
    user = catalog.users.pick(rng)
    roll = rng.random()
    if roll < _ANONYMOUS_RATE and not fault:
        user_name, app, key_type = _ANONYMOUS, catalog.anonymous_app, "PRODUCTION"
    else:
        user_name = user.name
        app = user.apps[0] if len(user.apps) == 1 or roll < 0.6 else user.apps[1]
        key_type = "SANDBOX" if rng.random() < _SANDBOX_RATE else "PRODUCTION"
    roll = rng.random()
    if roll < _UNKNOWN_IP_RATE:
        ip = _UNKNOWN
    elif roll < 0.1:
        ip = _one_of(rng, catalog.shared_ips)
    else:
        ip = user.ip
    agent_header, agent_family = _AGENT_MEMBERS[
        user.agent if rng.random() < 0.9 else int(rng.random() * len(_AGENT_MEMBERS))
    ]
    cid = _uuid(rng)
    common_name = _COMMON_NAME if rng.random() < 0.97 else _COMMON_NAME_MTLS
    # subType as in WSO2's docs; some gateways spell it subtype, as AI APIs do.
    subtype = _SUBTYPE_LOWER if rng.random() < 0.05 else _SUBTYPE
    if api.ai:
        subtype = _SUBTYPE_AI

    if fault:
        kind = _FAULTS.pick(rng)
        if kind.authentication:
            # No valid credentials: the gateway cannot tell the application or the user.
            app, key_type, user_name = catalog.anonymous_app, "UNKNOWN", _ANONYMOUS
        latency = ""
        if rng.random() < 0.3:
            if kind.code == 101504:
                value = 60_000 + int(rng.random() * 400)
            elif kind.error_type == "TARGET_CONNECTIVITY":
                value = 2 + int(rng.expovariate(0.05))
            else:
                value = 1 + int(rng.expovariate(0.5))
            latency = f',"responseLatency":{value}'
        size = 120 + int(rng.random() * 60)
        return (
            f"{{{api.head},{resource.head},{app.members},"
            f'"correlationId":"{cid}",{kind.members},"eventType":"fault","gatewayType":"SYNAPSE",'
            f'"keyType":"{key_type}","proxyResponseCode":{kind.status},"regionId":"default",'
            f'"requestTimestamp":{timestamp},"responseCacheHit":false,"targetResponseCode":-1,'
            f'{agent_header},"userIp":{ip}{latency},"properties":{{{api.context},'
            f'"userName":{user_name},{common_name},{subtype},"isEgress":false,'
            f'{_FAULT_CONTENT_TYPE},"responseSize":{size}}}}}'
        ).encode()

    cache_hit = resource.cacheable and rng.random() < _CACHE_HIT_RATE
    if not cache_hit and rng.random() < _BACKEND_ERROR_RATE:
        status = _BACKEND_ERRORS.pick(rng)
        size = 40 + int(rng.random() * 200)
    else:
        status = resource.status
        size = int(resource.size * (0.5 + rng.random())) if resource.size else 0
    request_mediation = 1 + int(rng.expovariate(0.25))
    if cache_hit:
        backend = response_mediation = 0
    else:
        backend = max(1, int(rng.lognormvariate(0.0, 0.6) * api.latency_ms))
        response_mediation = int(rng.expovariate(0.4))
    total = backend + request_mediation + response_mediation + int(rng.random() * 4)

    extras = ""
    if size or status != 204:
        extras += f",{api.content_type}"
    extras += f',"responseSize":{size}'
    if api.ai:
        prompt = 20 + int(rng.expovariate(1 / 400))
        completion = 5 + int(rng.expovariate(1 / 250)) if resource.completion else 0
        extras += (
            f",{_AI_METADATA.pick(rng)},"
            f'"aiTokenUsage":{{"promptTokens":{prompt},"completionTokens":{completion},'
            f'"totalTokens":{prompt + completion}}}'
        )
    roll = rng.random()
    if roll < 0.15:
        extras += f",{_one_of(rng, _CUSTOM_FLAT)}"
    elif roll > 0.95:
        extras += f",{_one_of(rng, _CUSTOM_NESTED)}"
    if rng.random() < 0.1:
        extras += f",{_one_of(rng, resource.gateway_urls)}"
    family = agent_family if rng.random() < _ELK_FAMILY_RATE else ""
    return (
        f"{{{api.head},{resource.head},{app.members},"
        f'"backendLatency":{backend},"correlationId":"{cid}",{api.destination},'
        f'"eventType":"response","gatewayType":"SYNAPSE","keyType":"{key_type}",'
        f'"userName":{user_name},"proxyResponseCode":{status},"regionId":"default",'
        f'"requestMediationLatency":{request_mediation},"requestTimestamp":{timestamp},'
        f'"responseCacheHit":{"true" if cache_hit else "false"},"responseLatency":{total},'
        f'"responseMediationLatency":{response_mediation},"targetResponseCode":{status},'
        f'{agent_header},"userIp":{ip}{family},"properties":{{{api.context},'
        f'"userName":{user_name},{common_name},{subtype},"isEgress":false{extras}}}}}'
    ).encode()


def _timestamp(rng: random.Random, offset_ms: int, previous_ms: int) -> tuple[str, int]:
    """Pick ``requestTimestamp`` for a time slot.

    Args:
        rng: The random source.
        offset_ms: Milliseconds since ``START`` for this slot.
        previous_ms: The previous event's time, so deliberate roundings stay non-decreasing.

    Returns:
        The JSON text of the timestamp and the (possibly rounded down) offset it encodes.
    """
    roll = rng.random()
    if roll < _OFFSET_RATE:
        suffix, minutes = _one_of(rng, _OFFSETS)
        return f'"{_iso(offset_ms + minutes * 60_000, suffix)}"', offset_ms
    roll -= _OFFSET_RATE
    if roll < _EPOCH_RATE:
        return str(START_EPOCH_MS + offset_ms), offset_ms
    roll -= _EPOCH_RATE
    # Deliberate whole minutes/seconds (WSO2 then drops the zero parts), only where rounding
    # down cannot move the time before the previous event's.
    if roll < _WHOLE_MINUTE_RATE and offset_ms // 60_000 > previous_ms // 60_000:
        offset_ms -= offset_ms % 60_000
    elif roll < _WHOLE_SECOND_RATE and offset_ms // 1000 > previous_ms // 1000:
        offset_ms -= offset_ms % 1000
    return f'"{_iso(offset_ms)}"', offset_ms


def _events(rng: random.Random, count: int, fault_rate: float, dup_rate: float) -> Iterator[bytes]:
    catalog = _catalog()
    step = SPAN_MS / max(count, 1)
    recent: list[tuple[bytes, bytes]] = []  # (line, its "requestTimestamp" member)
    previous_ms = -1
    for index in range(count):
        offset_ms = 0 if index == 0 else int((index + rng.random()) * step)
        if recent and rng.random() < dup_rate:
            line, stamp = _one_of(rng, recent)
            if rng.random() < _REEMIT_SHARE:
                timestamp, previous_ms = _timestamp(rng, offset_ms, previous_ms)
                line = line.replace(stamp, f'"requestTimestamp":{timestamp}'.encode(), 1)
            yield line
            continue
        timestamp, previous_ms = _timestamp(rng, offset_ms, previous_ms)
        line = _event_line(catalog, rng, timestamp, rng.random() < fault_rate)
        entry = (line, f'"requestTimestamp":{timestamp}'.encode())
        if len(recent) < _DUP_WINDOW:
            recent.append(entry)
        else:
            recent[index % _DUP_WINDOW] = entry
        yield line


def _malformed_line(kind: str, rng: random.Random, offset_ms: int) -> bytes:
    if kind == "seed_response_example":
        return _flatten(_SEED_RESPONSE)
    if kind == "seed_fault_example":
        return _flatten(_SEED_FAULT)
    if kind == "plain_text":
        moment = START + timedelta(milliseconds=offset_ms)
        stamp = f"{moment:%Y-%m-%d %H:%M:%S},{offset_ms % 1000:03d}"
        return (
            f"[{stamp}]  WARN {{AnalyticsEventPublisher}} - Analytics event queue is full, "
            "dropping event"
        ).encode()
    line = _event_line(_catalog(), rng, f'"{_iso(offset_ms)}"', rng.random() < 0.2)
    if kind == "truncated_json":
        return line[: len(line) // 2 + int(rng.random() * len(line) / 3)]
    event = json.loads(line)
    if kind == "bad_utf8":
        event["properties"]["userName"] = "@@BAD@@"
        return _dumps(event).replace(b"@@BAD@@", b"al\xff\xfeice@carbon.super")
    if kind == "json_array":
        return _dumps([event])
    if kind == "missing_request_timestamp":
        del event["requestTimestamp"]
    elif kind == "string_proxy_response_code":
        event["proxyResponseCode"] = "abc"
    elif kind == "unparseable_timestamp":
        event["requestTimestamp"] = "yesterday"
    else:
        msg = f"unknown malformed kind: {kind}"
        raise ValueError(msg)
    return _dumps(event)


def generate(
    count: int,
    seed: int = 42,
    fault_rate: float = 0.05,
    dup_rate: float = 0.02,
    malformed: int = 0,
) -> Iterator[bytes]:
    """Yield WSO2 analytics log lines (compact JSON, UTF-8, without the trailing newline).

    ``count`` lines are events: fresh success and fault events plus, at ``dup_rate``, repeats of
    a recent line (mostly exact replays, some re-emitted with a new ``requestTimestamp``).
    ``malformed`` broken lines come on top, spread through the output. They use their own random
    stream, so dropping them leaves exactly the output of ``malformed=0``.

    Args:
        count: Number of event lines (repeats included, malformed lines not).
        seed: Seed for all per-event randomness.
        fault_rate: Share of fault events.
        dup_rate: Share of lines that repeat an earlier correlationId.
        malformed: Number of extra malformed lines.

    Yields:
        One line per event, as bytes.

    Raises:
        ValueError: If a count is negative or a rate is outside [0, 1].
    """
    if count < 0 or malformed < 0:
        msg = "count and malformed must not be negative"
        raise ValueError(msg)
    if not (0.0 <= fault_rate <= 1.0 and 0.0 <= dup_rate <= 1.0):
        msg = "fault_rate and dup_rate must be within [0, 1]"
        raise ValueError(msg)
    events = _events(random.Random(seed), count, fault_rate, dup_rate)
    if not malformed:
        yield from events
        return
    bad_rng = random.Random(f"{seed}:malformed")
    total = count + malformed
    positions = sorted(bad_rng.sample(range(total), malformed))
    kinds = list(MALFORMED_KINDS)
    bad_rng.shuffle(kinds)
    written = 0
    for number, position in enumerate(positions):
        for _ in range(position - written):
            yield next(events)
        offset_ms = int((position + bad_rng.random()) * SPAN_MS / total)
        yield _malformed_line(kinds[number % len(kinds)], bad_rng, offset_ms)
        written = position + 1
    yield from events


def _well_formed(line: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    stamp = event.get("requestTimestamp")
    if isinstance(stamp, str):
        try:
            datetime.fromisoformat(stamp)
        except ValueError:
            return None
    elif not isinstance(stamp, int) or isinstance(stamp, bool):
        return None
    if not isinstance(event.get("correlationId"), str) or not isinstance(
        event.get("apiMethod"), str
    ):
        return None
    code = event.get("proxyResponseCode")
    if not isinstance(code, int) or isinstance(code, bool):
        return None
    return event


def summarize(lines: Iterable[bytes]) -> dict[str, Any]:
    """Count what a generated file holds.

    A line is an event when it is a JSON object with string ``correlationId`` and ``apiMethod``,
    an integer ``proxyResponseCode`` and a ``requestTimestamp`` that is epoch milliseconds or
    ISO-8601; every other line is malformed. Success/fault counts cover the first line of each
    correlationId; later lines with a seen id count as repeats.

    Args:
        lines: Lines without their newline.

    Returns:
        Counts by category, as a JSON-ready dict.
    """
    stats: dict[str, Any] = {
        "lines": 0,
        "events": 0,
        "malformed": 0,
        "unique_ids": 0,
        "repeated_ids": 0,
        "exact_repeats": 0,
        "reemitted": 0,
        "success": 0,
        "backend_errors": 0,
        "faults": 0,
        "faults_by_type": {},
        "faults_by_code": {},
        "timestamps": {"millis": 0, "no_millis": 0, "no_seconds": 0, "offset": 0, "epoch_ms": 0},
    }
    seen: dict[str, bytes] = {}
    for line in lines:
        stats["lines"] += 1
        event = _well_formed(line)
        if event is None:
            stats["malformed"] += 1
            continue
        stats["events"] += 1
        cid = event["correlationId"]
        if cid in seen:
            stats["repeated_ids"] += 1
            stats["exact_repeats" if seen[cid] == line else "reemitted"] += 1
            continue
        seen[cid] = line
        if event.get("eventType") == "fault":
            stats["faults"] += 1
            by_type, by_code = stats["faults_by_type"], stats["faults_by_code"]
            by_type[event["errorType"]] = by_type.get(event["errorType"], 0) + 1
            code = str(event["errorCode"])
            by_code[code] = by_code.get(code, 0) + 1
        else:
            stats["success"] += 1
            stats["backend_errors"] += event["proxyResponseCode"] >= 400
        stamp = event["requestTimestamp"]
        styles = stats["timestamps"]
        if isinstance(stamp, int):
            styles["epoch_ms"] += 1
        elif not stamp.endswith("Z"):
            styles["offset"] += 1
        elif "." in stamp:
            styles["millis"] += 1
        elif stamp.count(":") == 2:
            styles["no_millis"] += 1
        else:
            styles["no_seconds"] += 1
    stats["unique_ids"] = len(seen)
    for key in ("faults_by_type", "faults_by_code"):
        stats[key] = dict(sorted(stats[key].items()))
    return stats


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generate WSO2 API Manager analytics events as JSON Lines."
    )
    parser.add_argument("--count", type=int, required=True, help="number of event lines")
    parser.add_argument("--out", required=True, help="output path, '-' for stdout")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--fault_rate", type=float, default=0.05)
    parser.add_argument("--dup_rate", type=float, default=0.02)
    parser.add_argument("--malformed", type=int, default=0, help="extra malformed lines")
    parser.add_argument("--gzip", action="store_true", help="gzip the output (implied by .gz)")
    parser.add_argument(
        "--stats", action="store_true", help="print summarize() of the output to stderr"
    )
    return parser.parse_args(argv)


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> object: ...


def _write(lines: Iterable[bytes], sink: _Sink, compress: bool) -> None:
    if compress:
        # No file name and mtime 0 in the header, so the same input gives the same bytes.
        with gzip.GzipFile(filename="", mode="wb", fileobj=sink, compresslevel=3, mtime=0) as gz:
            _write(lines, gz, compress=False)
        return
    batch: list[bytes] = []
    for line in lines:
        batch.append(line)
        if len(batch) == 4096:
            batch.append(b"")
            sink.write(b"\n".join(batch))
            batch = []
    if batch:
        batch.append(b"")
        sink.write(b"\n".join(batch))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line interface.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The process exit code.
    """
    args = _parse_args(argv)
    lines: Iterable[bytes] = generate(
        args.count, args.seed, args.fault_rate, args.dup_rate, args.malformed
    )
    if args.stats:
        lines = list(lines)
    compress = args.gzip or args.out.endswith(".gz")
    if args.out == "-":
        _write(lines, sys.stdout.buffer, compress)
        sys.stdout.buffer.flush()
    else:
        with Path(args.out).open("wb") as sink:
            _write(lines, sink, compress)
    if args.stats:
        sys.stderr.write(json.dumps(summarize(lines), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
