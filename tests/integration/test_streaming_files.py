"""`--follow`: a streaming run over files, picking up each new file once it has settled."""

from __future__ import annotations

import os
import time

import pytest

from tests.helpers import assert_nothing_lost
from tests.integration.test_kafka_pipeline import (
    APP_ID,
    _delivery_args,
    _stored_ids,
)
from tests.streams import StreamingRun, wait_for, wso2_event

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prism_runner")]


def test_follow_picks_up_new_files_and_drains(tmp_path, start_collector):
    collector = start_collector(application_id=APP_ID)
    incoming = tmp_path / "incoming"
    incoming.mkdir()

    def ship(name: str, tids: list[str]) -> None:
        # Write elsewhere, then rename: a file appears whole, as log shippers do it.
        staged = tmp_path / f"{name}.partial"
        staged.write_bytes(b"\n".join(wso2_event(t) for t in tids) + b"\n")
        old = time.time() - 10
        os.utime(staged, (old, old))
        staged.rename(incoming / f"{name}.jsonl")

    ship("first", ["f-1", "f-2"])
    stream = StreamingRun(
        tmp_path,
        "follow",
        [
            "--input",
            str(incoming / "*.jsonl"),
            "--follow",
            "--follow_interval",
            "1",
            *_delivery_args(collector, tmp_path),
        ],
        APP_ID,
    )
    try:
        wait_for(lambda: {"f-1", "f-2"} <= _stored_ids(collector), 120, "the first file")
        ship("second", ["s-1", "s-2", "s-3"])
        wait_for(lambda: {"s-1", "s-2", "s-3"} <= _stored_ids(collector), 60, "a new file")
    finally:
        metrics = stream.drain()
    assert_nothing_lost(metrics)
    assert (metrics["read"], metrics["sent"]) == (5, 5)
