"""One API call as each gateway writes it down: the records behind generate_gateways.py.

Each builder takes the generator's random source and a :class:`Call` and returns the
record that gateway (or its log shipper) writes for it, per the project's gateway reference.
Only the standard library is used.
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

FORMATS = ("kong", "aws", "tyk", "azure", "apigee", "envoy", "nginx")
START_MS = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp() * 1000)
SPAN_MS = 6 * 3_600_000  # six hours of traffic
BAD_KINDS = ("not_json", "missing_field", "wrong_type", "foreign")

HOSTS = ("api.acme.io", "api.globex.com", "pay.initech.net")
ROUTES = (
    ("GET", "/v1/orders/{id}", "orders"),
    ("POST", "/v1/orders", "orders"),
    ("GET", "/v1/customers/{id}", "customers"),
    ("PUT", "/v1/customers/{id}", "customers"),
    ("GET", "/v2/catalog", "catalog"),
    ("DELETE", "/v1/carts/{id}", "carts"),
    ("POST", "/v1/payments", "payments"),
)
STATUSES = (200,) * 12 + (201, 204, 304, 400, 401, 403, 404, 429, 500, 502, 503)
AGENTS = ("curl/8.5.0", "okhttp/4.12.0", "python-requests/2.32.3", "Mozilla/5.0", "grpc-go/1.64")
USERS = tuple(f"u_{n:04d}" for n in range(1, 41))
COMPANIES = ("acme-corp", "globex", "initech", "umbrella", "hooli")
APPS = ("acme-mobile", "acme-web", "globex-partner", "initech-batch")


@dataclass
class Call:
    """One API call, before a gateway writes it down."""

    seq: int
    start_ms: int
    method: str
    host: str
    path: str
    query: str
    route: str
    status: int
    latency_ms: int
    upstream_ms: int
    ip: str
    proxy_ip: str
    agent: str
    user: str | None
    company: str
    app: str
    api_key: str
    jwt: str | None
    body: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return self.path + (f"?{self.query}" if self.query else "")

    def hex_id(self, rng: random.Random) -> str:
        return f"{rng.getrandbits(128):032x}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _jwt(rng: random.Random, user: str) -> str:
    header = _b64url(b'{"alg":"RS256","typ":"JWT"}')
    claims = {"sub": user, "iss": "https://auth.acme.io", "iat": 1793491200, "scope": "orders"}
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    return f"{header}.{payload}.{_b64url(rng.randbytes(32))}"


def make_call(rng: random.Random, seq: int, start_ms: int) -> Call:
    method, template, route = rng.choice(ROUTES)
    path = template.replace("{id}", str(rng.randint(1, 99_999)))
    status = rng.choice(STATUSES)
    latency = max(1, int(rng.lognormvariate(4.0, 0.7)))
    user = rng.choice(USERS) if rng.random() < 0.85 else None
    body = None
    if method in ("POST", "PUT"):
        body = {"item": rng.randint(1, 500), "quantity": rng.randint(1, 9), "note": "sample"}
    return Call(
        seq=seq,
        start_ms=start_ms,
        method=method,
        host=rng.choice(HOSTS),
        path=path,
        query=rng.choice(("", "", "expand=items", "page=2&limit=50")),
        route=route,
        status=status,
        latency_ms=latency,
        upstream_ms=max(0, latency - rng.randint(1, 6)),
        ip=f"203.0.113.{rng.randint(1, 254)}",
        proxy_ip=f"10.0.{rng.randint(0, 9)}.{rng.randint(1, 254)}",
        agent=rng.choice(AGENTS),
        user=user,
        company=rng.choice(COMPANIES),
        app=rng.choice(APPS),
        api_key=f"key_{rng.getrandbits(64):016x}",
        jwt=_jwt(rng, user) if user and rng.random() < 0.5 else None,
        body=body,
    )


def iso(ms: int, digits: int = 3) -> str:
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{ms % 1000:03d}".ljust(digits, "0")
    return f"{text}.{fraction}Z"


def _clf(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%d/%b/%Y:%H:%M:%S +0000")


def _auth_headers(call: Call) -> dict[str, str]:
    headers = {}
    if call.jwt:
        headers["authorization"] = f"Bearer {call.jwt}"
    if call.seq % 3 == 0:
        headers["x-api-key"] = call.api_key
    return headers


# -- one record per format ----------------------------------------------------------------


def _with_query(call: Call, extra: str) -> tuple[str, str]:
    """``(query, path + query)`` of ``call`` with ``extra`` parameters added."""
    query = "&".join(part for part in (call.query, extra) if part)
    return query, f"{call.path}?{query}"


def kong(rng: random.Random, call: Call) -> dict[str, Any]:
    request_id = call.hex_id(rng)
    consumer = None
    if call.user:
        consumer = {"id": str(uuid.UUID(int=rng.getrandbits(128))), "username": call.app}
        if call.seq % 4:
            consumer["custom_id"] = call.user
    query, target = call.query, call.target
    if call.seq % 3 == 1:  # key-auth with key_in_query: the key is in the URL Kong logs
        query, target = _with_query(call, f"apikey={call.api_key}")
    record: dict[str, Any] = {
        "request": {
            "id": request_id,
            "method": call.method,
            "uri": target,
            "url": f"https://{call.host}:443{target}",
            "querystring": dict(p.split("=") for p in query.split("&")) if query else {},
            "size": rng.randint(200, 900),
            "headers": {"host": call.host, "user-agent": call.agent, **_auth_headers(call)},
        },
        "response": {
            "status": call.status,
            "size": rng.randint(100, 4000),
            "headers": {"content-type": "application/json", "x-kong-request-id": request_id},
        },
        "latencies": {
            "kong": call.latency_ms - call.upstream_ms,
            "proxy": call.upstream_ms,
            "request": call.latency_ms,
            "receive": 0,
        },
        "tries": [{"ip": call.proxy_ip, "port": 8080, "balancer_start": call.start_ms}],
        "client_ip": call.ip,
        "started_at": call.start_ms,
        "upstream_uri": target,
        "upstream_status": str(call.status),
        "source": "upstream" if call.status < 500 else "kong",
        "route": {"id": f"route-{call.route}", "name": call.route, "paths": [f"/{call.route}"]},
        "service": {"id": f"svc-{call.route}", "name": f"{call.route}-svc", "host": "upstream"},
        "workspace": "ws-default",
        "workspace_name": "default",
    }
    if consumer:
        record["consumer"] = consumer
        record["authenticated_entity"] = {"id": f"cred-{call.seq}", "consumer_id": consumer["id"]}
    return record


def aws(rng: random.Random, call: Call) -> dict[str, Any]:
    stage = "prod"
    return {
        "apiId": "a1b2c3d4e5",
        "requestId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "extendedRequestId": _b64url(rng.randbytes(12)) + "=",
        "requestTime": _clf(call.start_ms),
        "requestTimeEpoch": str(call.start_ms) if call.seq % 7 else "-",
        "protocol": "HTTP/1.1",
        "httpMethod": call.method,
        "resourcePath": f"/{call.route}/{{id}}",
        "path": f"/{stage}{call.path}",
        "requestHostHeader": call.host,
        "requestUserAgentHeader": call.agent,
        "ip": call.ip,
        "status": str(call.status),
        "responseLength": str(rng.randint(0, 5000)),
        "durationMs": str(call.latency_ms),
        "integrationLatency": str(call.upstream_ms),
        "apiKeyId": f"k{call.seq % 17:05d}" if call.seq % 2 else "-",
        "apiKey": call.api_key if call.seq % 2 else "-",
        "principalId": call.user or "-",
        "companyId": call.company,
        "caller": "-",
        "user": "-",
        "cognitoIdentityId": "-",
    }


def _raw_http(start: str, headers: dict[str, str], body: dict[str, Any] | None) -> str:
    payload = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if payload:
        head += f"Content-Length: {len(payload)}\r\n"
    message = f"{start}\r\n{head}\r\n".encode() + payload
    return base64.b64encode(message).decode("ascii")


def tyk(rng: random.Random, call: Call) -> dict[str, Any]:
    moment = datetime.fromtimestamp(call.start_ms / 1000, tz=UTC)
    record: dict[str, Any] = {
        "method": call.method,
        "host": call.host,
        "path": call.path.removeprefix("/v1").removeprefix("/v2"),
        "raw_path": call.path,
        "content_length": len(json.dumps(call.body)) if call.body else 0,
        "user_agent": call.agent,
        "day": moment.day,
        "month": moment.month,
        "year": moment.year,
        "hour": moment.hour,
        "response_code": call.status,
        "api_key": f"{rng.getrandbits(96):024x}",
        "timestamp": iso(call.start_ms),
        "api_version": "v2" if call.path.startswith("/v2") else "v1",
        "api_name": call.route.title(),
        "api_id": f"{call.route}-api",
        "org_id": "5e9d9544a1dcd60001d0ed20",
        "oauth_id": "",
        "request_time": call.latency_ms,
        "ip_address": call.ip,
        "latency": {"total": call.latency_ms, "upstream": call.upstream_ms},
        "network": {"open_connections": 0, "closed_connections": 0, "bytes_in": 300},
        "tags": [f"key-{call.route}", "org-5e9d"],
        "alias": call.user or "",
        "track_path": True,
    }
    if call.seq % 2 == 0:  # detailed recording on for this API
        request_headers = {"Host": call.host, "User-Agent": call.agent}
        request_headers.update({k.title(): v for k, v in _auth_headers(call).items()})
        start = f"{call.method} {call.target} HTTP/1.1"
        record["raw_request"] = _raw_http(start, request_headers, call.body)
        response_body = {"ok": call.status < 400, "id": call.seq}
        record["raw_response"] = _raw_http(
            f"HTTP/1.1 {call.status} X",
            {"Content-Type": "application/json", "Set-Cookie": f"sid={call.seq:08x}"},
            response_body,
        )
    return record


def azure(rng: random.Random, call: Call) -> dict[str, Any]:
    props = {
        "method": call.method,
        "url": f"https://acme-apim.azure-api.net{call.target}",
        "responseCode": call.status,
        "responseSize": rng.randint(100, 4000),
        "backendResponseCode": call.status,
        "backendTime": call.upstream_ms,
        "clientTime": call.latency_ms - call.upstream_ms,
        "cache": "none",
        "apiId": call.route,
        "operationId": f"{call.method.lower()}-{call.route}",
        "productId": "gold" if call.seq % 3 else "starter",
        "userId": call.user,
        "apimSubscriptionId": f"sub-{call.company}",
        "clientProtocol": "HTTP/1.1",
        "isRequestSuccess": call.status < 400,
    }
    if call.seq % 4 == 0:
        props["requestHeaders"] = {
            "User-Agent": call.agent,
            "Ocp-Apim-Subscription-Key": call.api_key,
            **_auth_headers(call),
        }
        # the backend's side: what APIM forwarded (the key too) and what came back
        props["backendRequestHeaders"] = {
            "Ocp-Apim-Subscription-Key": call.api_key,
            "X-Forwarded-For": call.ip,
            **_auth_headers(call),
        }
        props["backendResponseHeaders"] = (
            f"Content-Type: application/json\r\nSet-Cookie: sid={call.api_key}"
        )
    elif call.seq % 4 == 2:  # the key in the query, as APIM also accepts it
        _, target = _with_query(call, f"subscription-key={call.api_key}")
        props["url"] = f"https://acme-apim.azure-api.net{target}"
        props["backendUrl"] = f"https://backend.acme.io{target}"
    record = {
        "time": iso(call.start_ms, 7),
        "resourceId": "/SUBSCRIPTIONS/0000/RESOURCEGROUPS/RG/PROVIDERS/"
        "MICROSOFT.APIMANAGEMENT/SERVICE/ACME-APIM",
        "category": "GatewayLogs",
        "operationName": "Microsoft.ApiManagement/GatewayLogs",
        "durationMs": call.latency_ms,
        "callerIpAddress": call.ip,
        "correlationId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "location": "East US",
        "properties": {k: v for k, v in props.items() if v is not None},
    }
    if call.seq % 5 == 0:  # the Log Analytics table's spelling
        record["properties"] = {k[0].upper() + k[1:]: v for k, v in record["properties"].items()}
    return record


def apigee(rng: random.Random, call: Call) -> dict[str, Any]:
    record = {
        "messageid": f"rrt-{rng.getrandbits(40):010x}-{call.seq}-1",
        "proxy": f"{call.route}-v1",
        "rev": str(rng.randint(1, 9)),
        "env": "prod",
        "org": "acme",
        "verb": call.method,
        "host": call.host,
        "uri": call.target,
        "client_ip": call.ip,
        "status": call.status,
        "req_start": call.start_ms,
        "resp_end": call.start_ms + call.latency_ms,
        "target_ms": call.upstream_ms,
        "client_id": f"{rng.getrandbits(48):012x}",
        "app": call.app,
        "developer_email": f"{call.user}@{call.company}.io" if call.user else "",
        "product": f"{call.route}-gold",
    }
    if call.seq % 2:
        return {
            "insertId": f"{rng.getrandbits(48):012x}",
            "timestamp": iso(call.start_ms + call.latency_ms),
            "logName": "projects/acme/logs/apigee",
            "resource": {"type": "api", "labels": {"project_id": "acme"}},
            "jsonPayload": record,
        }
    return record


def envoy(rng: random.Random, call: Call) -> dict[str, Any]:
    return {
        "start_time": iso(call.start_ms),
        "method": call.method,
        "path": call.target,
        "protocol": "HTTP/2" if call.seq % 2 else "HTTP/1.1",
        "response_code": call.status,
        "response_flags": "-" if call.status < 500 else "UF",
        "bytes_received": len(json.dumps(call.body)) if call.body else 0,
        "bytes_sent": rng.randint(0, 4000),
        "duration": call.latency_ms,
        "upstream_service_time": str(call.upstream_ms),
        "x_forwarded_for": call.ip if call.seq % 5 else None,
        "user_agent": call.agent,
        "request_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "authority": call.host,
        "upstream_host": f"{call.proxy_ip}:8080",
        "upstream_cluster": f"outbound|8080||{call.route}.default.svc.cluster.local",
        "route_name": call.route,
        "downstream_remote_address": f"{call.ip}:{rng.randint(1024, 65535)}",
        "x_user_id": call.user or "-",
    }


def nginx(rng: random.Random, call: Call) -> dict[str, Any]:
    auth = _auth_headers(call)
    target = call.target
    if call.seq % 5 == 2:
        target = _with_query(call, f"api_key={call.api_key}")[1]
    return {
        "msec": f"{call.start_ms // 1000}.{call.start_ms % 1000:03d}",
        "request_id": call.hex_id(rng),
        "remote_addr": call.proxy_ip,
        "remote_user": "-",
        "http_x_forwarded_for": f"{call.ip}, {call.proxy_ip}" if call.seq % 4 else "-",
        "request_method": call.method,
        "scheme": "https",
        "host": call.host,
        "request_uri": target,
        "request_line": f"{call.method} {target} HTTP/1.1",
        "server_protocol": "HTTP/1.1",
        "status": str(call.status),
        "body_bytes_sent": str(rng.randint(0, 5000)),
        "request_time": f"{call.latency_ms / 1000:.3f}",
        "upstream_response_time": f"{call.upstream_ms / 1000:.3f}",
        "upstream_addr": f"{call.proxy_ip}:8080",
        "http_user_agent": call.agent,
        "http_referer": "-",
        "http_authorization": auth.get("authorization", "-"),
        "http_x_api_key": auth.get("x-api-key", "-"),
        "request_body": json.dumps(call.body, separators=(",", ":")) if call.body else "-",
    }


BUILDERS: dict[str, Callable[[random.Random, Call], dict[str, Any]]] = {
    "kong": kong,
    "aws": aws,
    "tyk": tyk,
    "azure": azure,
    "apigee": apigee,
    "envoy": envoy,
    "nginx": nginx,
}
# The field a "missing_field" bad line lacks, and a "wrong_type" one spoils.
REQUIRED = {
    "kong": ("started_at", ("response", "status")),
    "aws": ("httpMethod", ("status",)),
    "tyk": ("timestamp", ("response_code",)),
    "azure": ("time", ("properties",)),
    "apigee": ("req_start", ("status",)),
    "envoy": ("start_time", ("response_code",)),
    "nginx": ("request_method", ("status",)),
}
