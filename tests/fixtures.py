"""Shared test data: WSO2's two documented analytics events, as the docs print them.

The documentation's text has two JSON syntax errors (a missing comma after ``userName`` in
the response event and after ``apiResourceTemplate`` in the fault event). The ``*_AS_PRINTED``
lines keep them; the parsed dicts are the same events with the commas restored.
"""

from __future__ import annotations

import json

RESPONSE_EVENT_AS_PRINTED = b"""{"apiCreator": "admin", "apiCreatorTenantDomain": "carbon.super", "apiId": "43d030dc-427f-4678-98e3-87b7d9882b5f", "apiMethod": "GET", "apiName": "SampleAPI", "apiResourceTemplate": "/*", "apiType": "HTTP", "apiVersion": "1.0.0", "applicationId": "2d6c54b0-7c7d-4b50-83dc-e6ae6f88962e", "applicationName": "DefaultApplication", "applicationOwner": "admin", "backendLatency": 13, "correlationId": "79ed20c3-55b1-434a-adf6-eea25e2d09c3", "destination": "http://xxx.xxx.xxx.xx:8281/services/sampleAPIBackend", "eventType": "response", "gatewayType": "SYNAPSE", "keyType": "SANDBOX", "userName":"admin@carbon.super" "proxyResponseCode": 202, "regionId": "default", "requestMediationLatency": 54, "requestTimestamp": "2022-01-20T03:34:36.451Z", "responseCacheHit": false, "responseLatency": 73, "responseMediationLatency": 6, "targetResponseCode": 202, "userAgent": "Chrome", "userIp": "xxx.xx.xx.xx", "properties": {"commonName": "N/A", "responseContentType": "application/json; charset=UTF-8", "subType": "DEFAULT", "isEgress": false, "apiContext": "/api1/2.0.0", "responseSize": 133, "userName": "admin@carbon.super"}}"""  # noqa: E501

FAULT_EVENT_AS_PRINTED = b"""{"apiCreator": "admin", "apiCreatorTenantDomain": "carbon.super", "apiId": "43d030dc-427f-4678-98e3-87b7d9882b5f", "apiName": "SampleAPI", "apiType": "HTTP", "apiVersion": "1.0.0", "apiMethod": "GET", "apiResourceTemplate": "/publish" "applicationId": "0b5ccc91-30e2-4ee5-9355-d1698075c028", "applicationName": "SampleApp3", "applicationOwner": "admin", "correlationId": "ccf2196f-9db8-429b-aaae-98f4c6edf6d7", "errorCode": 900803, "errorMessage": "APPLICATION_LEVEL_LIMIT_EXCEEDED", "errorType": "THROTTLED", "eventType": "fault", "gatewayType": "SYNAPSE", "keyType": "PRODUCTION", "proxyResponseCode": 429, "regionId": "default", "requestTimestamp": "2022-02-01T04:18:48.023Z", "responseCacheHit": false, "targetResponseCode": -1, "properties": {"commonName": "N/A", "responseContentType": "application/json; charset=UTF-8", "subType": "DEFAULT", "isEgress": false, "apiContext": "/api1/2.0.0", "responseSize": 133, "userName": "admin@carbon.super"}}"""  # noqa: E501

RESPONSE_EVENT_LINE = RESPONSE_EVENT_AS_PRINTED.replace(
    b'"userName":"admin@carbon.super" "proxyResponseCode"',
    b'"userName":"admin@carbon.super", "proxyResponseCode"',
)
FAULT_EVENT_LINE = FAULT_EVENT_AS_PRINTED.replace(
    b'"apiResourceTemplate": "/publish" "applicationId"',
    b'"apiResourceTemplate": "/publish", "applicationId"',
)
RESPONSE_EVENT = json.loads(RESPONSE_EVENT_LINE)
FAULT_EVENT = json.loads(FAULT_EVENT_LINE)


def wso2_line(correlation_id: str, **overrides: object) -> bytes:
    """A valid WSO2 response event line with a given correlationId and field overrides."""
    event = dict(RESPONSE_EVENT, correlationId=correlation_id)
    event.update(overrides)
    return json.dumps(event).encode("utf-8")
