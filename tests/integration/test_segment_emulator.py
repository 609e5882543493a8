"""The Segment Tracking API emulator checks what Segment checks, over real HTTP."""

from __future__ import annotations

import gzip
import json

import pytest
import requests

from moesif_beam.runners.emulators.segment import (
    BATCH_LIMIT_BYTES,
    CALL_LIMIT_BYTES,
    SegmentConfig,
    start_in_thread,
)

pytestmark = pytest.mark.integration

KEY = "emulator-wk-2b7c"


def _identify(message_id: str, **traits: object) -> dict:
    return {"type": "identify", "userId": "u1", "messageId": message_id, "traits": traits}


def test_auth_limits_dedup_and_inspection():
    with start_in_thread(SegmentConfig(write_key=KEY)) as segment:
        url = f"{segment.url}/v1/batch"
        body = {"batch": [_identify("m1")], "context": {"ip": "1.2.3.4"}}
        assert requests.post(url, json=body, timeout=10).status_code == 401
        assert requests.post(url, json=body, auth=("other-key", ""), timeout=10).status_code == 401
        ok = requests.post(url, json=body, auth=(KEY, ""), timeout=10)
        assert (ok.status_code, ok.json()) == (200, {"success": True})
        assert KEY not in ok.text
        # The same messageId again is dropped, as Segment's dedup does; gzip is accepted.
        again = gzip.compress(json.dumps(body).encode())
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        assert (
            requests.post(url, data=again, headers=headers, auth=(KEY, ""), timeout=10).status_code
            == 200
        )
        big_call = {"batch": [_identify("m2", blob="x" * CALL_LIMIT_BYTES)]}
        assert requests.post(url, json=big_call, auth=(KEY, ""), timeout=10).status_code == 400
        many = {"batch": [_identify(f"n{i}", blob="y" * 20_000) for i in range(30)]}
        assert len(json.dumps(many)) > BATCH_LIMIT_BYTES
        assert requests.post(url, json=many, auth=(KEY, ""), timeout=10).status_code == 400
        bad = requests.post(url, data=b"{not json", auth=(KEY, ""), timeout=10)
        assert bad.status_code == 400
        anonymous = {"batch": [{"type": "identify", "messageId": "m3"}]}
        assert requests.post(url, json=anonymous, auth=(KEY, ""), timeout=10).status_code == 400
        single = requests.post(
            f"{segment.url}/v1/group",
            json={"groupId": "c1", "anonymousId": "a1", "messageId": "g1"},
            auth=(KEY, ""),
            timeout=10,
        )
        assert single.status_code == 200
        (identify,) = segment.messages("identify")
        assert identify["context"] == {"ip": "1.2.3.4"}  # the batch's context, merged
        assert segment.messages("group")[0]["groupId"] == "c1"
        stats = requests.get(f"{segment.url}/_emulator/stats", timeout=10).json()
        assert (stats["messages"], stats["duplicates"]) == (2, 1)
        assert stats["requests"]["/v1/batch 401"] == 2
        requests.post(f"{segment.url}/_emulator/reset", timeout=10)
        assert segment.messages() == []
