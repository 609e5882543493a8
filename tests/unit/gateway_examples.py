"""The reference's example record for each gateway (shared/reference/gateways.md), as lines."""

from __future__ import annotations

KONG = (
    b'{"request":{"id":"2f6946328ffc4946b8c9120704a4a155","method":"POST","uri":"/v1/orders?x=1",'
    b'"url":"https://api.acme.io:443/v1/orders?x=1","querystring":{"x":"1"},"size":412,'
    b'"headers":{"host":"api.acme.io","user-agent":"curl/8.5","content-type":"application/json"}},'
    b'"response":{"status":201,"size":310,'
    b'"headers":{"x-kong-request-id":"2f6946328ffc4946b8c9120704a4a155"}},'
    b'"latencies":{"kong":2,"proxy":88,"request":93,"receive":1},"client_ip":"203.0.113.9",'
    b'"started_at":1751284800123,"upstream_uri":"/orders?x=1","upstream_status":"201",'
    b'"source":"upstream","route":{"id":"0f1a","name":"orders"},'
    b'"service":{"id":"fb4e","name":"orders-svc"},'
    b'"consumer":{"id":"c9d1","username":"acme-app","custom_id":"u_8812"},'
    b'"authenticated_entity":{"id":"cred-77","consumer_id":"c9d1"},"workspace_name":"default"}'
)
AWS = (
    b'{"apiId":"a1b2c3d4e5","requestId":"7d3f9c1e-2b4a-4c8e-9f10-3a5b6c7d8e9f",'
    b'"extendedRequestId":"Kx9qHFr2IAMEbCw=","requestTime":"30/Jun/2026:12:00:00 +0000",'
    b'"requestTimeEpoch":"1782820800000","protocol":"HTTP/1.1","httpMethod":"GET",'
    b'"resourcePath":"/orders/{id}","path":"/prod/orders/42","requestHostHeader":"api.acme.io",'
    b'"requestUserAgentHeader":"okhttp/4.12","ip":"203.0.113.9","status":"200",'
    b'"responseLength":"512","durationMs":"87","apiKeyId":"k2m4n6","principalId":"u_8812",'
    b'"companyId":"acme-corp","caller":"-","user":"-"}'
)
TYK = (
    b'{"timestamp":"2026-06-30T12:00:00.123Z","method":"POST","host":"api.acme.io",'
    b'"path":"/orders","raw_path":"/orders","response_code":201,"api_key":"5f3a",'
    b'"api_version":"v1","api_name":"Orders","api_id":"b7e1","org_id":"5e9d","oauth_id":"",'
    b'"alias":"u_8812","request_time_ms":93,"ip_address":"203.0.113.9","user_agent":"curl/8.5",'
    b'"content_length":42,'
    b'"raw_request":"UE9TVCAvb3JkZXJzIEhUVFAvMS4xDQpIb3N0OiBhcGkuYWNtZS5pbw0KDQp7fQ=="}'
)
AZURE = (
    b'{"records":[{"time":"2026-06-30T12:00:00.1230000Z",'
    b'"resourceId":"/SUBSCRIPTIONS/X/PROVIDERS/MICROSOFT.APIMANAGEMENT/SERVICE/ACME-APIM",'
    b'"category":"GatewayLogs","operationName":"Microsoft.ApiManagement/GatewayLogs",'
    b'"durationMs":91,"callerIpAddress":"203.0.113.9",'
    b'"correlationId":"3c2f7a1e-8d4b-4b7e-a0f2-5e6d7c8b9a01","location":"East US",'
    b'"properties":{"method":"GET","url":"https://acme-apim.azure-api.net/orders/42",'
    b'"responseCode":200,"responseSize":812,"backendResponseCode":200,"backendTime":71,'
    b'"clientTime":5,"cache":"none","apiId":"orders","operationId":"get-order",'
    b'"productId":"gold","userId":"u_8812","apimSubscriptionId":"sub-acme-01",'
    b'"clientProtocol":"HTTP/1.1"}}]}'
)
APIGEE = (
    b'{"messageid":"rrt-0b1c2d3e4f-12345-1","proxy":"orders-v1","rev":"7","env":"prod",'
    b'"org":"acme","verb":"GET","host":"api.acme.io","uri":"/v1/orders/42?expand=items",'
    b'"client_ip":"203.0.113.9","status":200,"req_start":1782820800123,'
    b'"resp_end":1782820800214,"target_ms":71,"client_id":"Ab12Cd34","app":"acme-mobile",'
    b'"developer_email":"ana@acme.io","product":"orders-gold"}'
)
APIGEE_ENTRY = (
    b'{"insertId":"1x2y3z","timestamp":"2026-06-30T12:00:00.300Z","logName":"projects/acme/logs/a",'
    b'"resource":{"type":"api"},"jsonPayload":' + APIGEE + b"}"
)
ENVOY = (
    b'{"start_time":"2026-06-30T12:00:00.123Z","method":"POST","path":"/v1/orders",'
    b'"protocol":"HTTP/2","response_code":201,"response_flags":"-","bytes_received":42,'
    b'"bytes_sent":310,"duration":93,"upstream_service_time":"88",'
    b'"x_forwarded_for":"203.0.113.9","user_agent":"grpc-go/1.64",'
    b'"request_id":"9b1d7f3a-52c4-4c8e-8a1f-0e2d3c4b5a69","authority":"api.acme.io",'
    b'"upstream_host":"10.0.3.17:8080","upstream_cluster":"outbound|8080||orders",'
    b'"route_name":"orders"}'
)
NGINX = (
    b'{"msec":"1782820800.123","request_id":"4f9c2b7e1a3d5f60718293a4b5c6d7e8",'
    b'"remote_addr":"10.0.0.5","http_x_forwarded_for":"203.0.113.9","request_method":"GET",'
    b'"scheme":"https","host":"api.acme.io","request_uri":"/v1/orders/42?expand=items",'
    b'"status":"200","body_bytes_sent":"812","request_time":"0.093",'
    b'"upstream_response_time":"0.088","upstream_addr":"10.0.3.17:8080",'
    b'"http_user_agent":"curl/8.5","http_x_api_key":"key_3f9a"}'
)

EXAMPLES = {
    "kong": KONG,
    "aws": AWS,
    "tyk": TYK,
    "azure": AZURE,
    "apigee": APIGEE_ENTRY,
    "envoy": ENVOY,
    "nginx": NGINX,
}
