"""`moesif-beam actions` and the shared metadata schema, end to end through the real command."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.helpers import assert_nothing_lost, read_batches, read_dead_letters

pytestmark = pytest.mark.integration

APP_ID = "actions-app-7d1e"


def _action(tid: str, day: int, metadata: dict, name: str = "Processed Payment") -> bytes:
    return json.dumps(
        {
            "action_name": name,
            "transaction_id": tid,
            "request": {"time": f"2026-11-{day:02d}T04:45:42.914Z", "uri": "https://app.example"},
            "company_id": "12345",
            "metadata": metadata,
        }
    ).encode()


def _files_run(tmp_path: Path, inputs: str, out: str, *extra: str, pipeline: str = "actions"):
    return run_cli(
        [pipeline, "--input", inputs, "--output_dir", str(tmp_path / out), *extra],
        metrics=tmp_path / f"{out}-metrics.json",
    )


def _outcome(out_dir: Path, pipeline: str = "actions") -> dict[str, str]:
    """transaction id -> 'sent' or the dead-letter reason (and field)."""
    outcome = {
        event["transaction_id"]: "sent"
        for batch in read_batches(str(out_dir / pipeline))
        for event in batch
    }
    for dead in read_dead_letters(str(out_dir / "dead_letter")):
        outcome[dead["transaction_id"] or dead["source"]] = f"{dead['reason']}:{dead['field']}"
    return outcome


def test_actions_reach_the_collector_and_the_seed_conflict_is_caught(tmp_path, start_collector):
    collector = start_collector(application_id=APP_ID)
    lines = [
        _action(
            "a3765025-46ec-45dd-bc83-b136c8d1d257",
            1,
            {
                "some_string": "I am a string",
                "some_int": 77,
                "some_object": {"some_sub_field": "some_value"},
            },
        ),
        _action(
            "f47ac10b-58cc-4372-a567-0e02b2c3d479",
            2,
            {"some_int": 77, "some_object": {"some_string": 23, "some_sub_field": "x"}},
        ),
        _action(
            "0b6c1f4e-7f0e-4c59-9a43-9d1c3a1f2e11",
            3,
            {"so.me_str.ing": "I am a string", "some.int": 77.23},
        ),
        b"[" + _action("batch-1", 4, {"amount": 1.5}) + b"," + _action("batch-2", 4, {}) + b"]",
        b'{"request": {"time": "2026-11-05T00:00:00Z"}}',  # no action_name
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    run = run_cli(
        [
            "actions",
            "--input",
            str(tmp_path / "in.jsonl"),
            "--moesif_base_url",
            collector.url,
            "--output_dir",
            str(tmp_path / "out"),
        ],
        app_id=APP_ID,
        metrics=tmp_path / "metrics.json",
    )
    assert run.returncode == 0, run.stderr
    metrics = run.metrics
    assert_nothing_lost(metrics)
    assert (metrics["read"], metrics["sent"], metrics["type_conflicts"], metrics["invalid"]) == (
        6,
        4,
        1,
        1,
    )
    stored = {action["transaction_id"]: action for action in collector.records("actions")}
    assert set(stored) == {
        "a3765025-46ec-45dd-bc83-b136c8d1d257",
        "0b6c1f4e-7f0e-4c59-9a43-9d1c3a1f2e11",
        "batch-1",
        "batch-2",
    }
    assert stored["0b6c1f4e-7f0e-4c59-9a43-9d1c3a1f2e11"]["metadata"] == {
        "so_me_str_ing": "I am a string",
        "some_int": 77.23,
    }
    assert collector.stats()["requests"]["/v1/actions/batch"] == {"201": 1}
    dead = {d["reason"]: d for d in read_dead_letters(str(tmp_path / "out" / "dead_letter"))}
    conflict = dead["type_conflict"]
    assert (conflict["field"], conflict["expected_type"], conflict["actual_type"]) == (
        "some_string",
        "string",
        "number",
    )
    assert conflict["transaction_id"] == "f47ac10b-58cc-4372-a567-0e02b2c3d479"
    assert conflict["payload"] == lines[1]
    assert dead["invalid_record"]["field"] == "action_name"


def test_the_schema_persists_across_runs_and_is_shared_by_both_pipelines(tmp_path):
    (tmp_path / "first.jsonl").write_bytes(_action("first", 1, {"plan": "pro", "seats": 3}))
    first = _files_run(tmp_path, str(tmp_path / "first.jsonl"), "out")
    assert first.returncode == 0, first.stderr
    store = json.loads((tmp_path / "out" / "metadata_schema.json").read_text())
    assert store["fields"] == {"plan": "string", "seats": "number"}

    # A later run, even of records older than the first run's, must obey the stored types.
    (tmp_path / "second.jsonl").write_bytes(
        _action("second", 1, {"plan": 2}) + b"\n" + _action("third", 2, {"plan": "team"})
    )
    second = _files_run(tmp_path, str(tmp_path / "second.jsonl"), "out")
    assert second.returncode == 0, second.stderr
    assert_nothing_lost(second.metrics)
    assert _outcome(tmp_path / "out") == {
        "first": "sent",
        "second": "type_conflict:plan",
        "third": "sent",
    }

    # The events pipeline shares the store: a WSO2 property named "seats" must be a number.
    event = json.loads(
        (Path(__file__).resolve().parents[2] / "samples" / "wso2_sample.jsonl")
        .read_bytes()
        .splitlines()[1]
    )
    event["properties"]["seats"] = "many"
    (tmp_path / "events.jsonl").write_text(json.dumps(event) + "\n")
    events_run = _files_run(tmp_path, str(tmp_path / "events.jsonl"), "out", pipeline="events")
    assert events_run.returncode == 0, events_run.stderr
    assert events_run.metrics["type_conflicts"] == 1
    assert_nothing_lost(events_run.metrics)


def _conflicting_actions(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    keys = ["plan", "seats", "region", "flags", "trial", "score"]
    values = ["text", 7, 2.5, True, {"nested": 1}, ["a"], None]
    lines = []
    for i in range(count):
        metadata = {key: rng.choice(values) for key in rng.sample(keys, 3)}
        if rng.random() < 0.3:
            metadata["inner"] = {rng.choice(keys): rng.choice(values)}
        lines.append(_action(f"tx-{i:05d}", rng.randint(1, 20), metadata))
    lines += lines[:15]  # replayed lines
    return lines


def test_same_answer_whatever_the_order_and_the_number_of_workers(tmp_path):
    lines = _conflicting_actions(400, seed=3)
    (tmp_path / "ordered").mkdir()
    (tmp_path / "ordered" / "all.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    shuffled = list(lines)
    random.Random(9).shuffle(shuffled)
    (tmp_path / "shuffled").mkdir()
    half = len(shuffled) // 2
    (tmp_path / "shuffled" / "part-1.jsonl").write_bytes(b"\n".join(shuffled[:half]) + b"\n")
    (tmp_path / "shuffled" / "part-2.jsonl").write_bytes(b"\n".join(shuffled[half:]) + b"\n")

    runs = {
        "ordered": _files_run(tmp_path, str(tmp_path / "ordered" / "*.jsonl"), "o1"),
        "shuffled": _files_run(tmp_path, str(tmp_path / "shuffled" / "*.jsonl"), "o2"),
        "two-workers": _files_run(
            tmp_path,
            str(tmp_path / "shuffled" / "*.jsonl"),
            "o3",
            "--direct_num_workers",
            "2",
            "--direct_running_mode",
            "multi_processing",
        ),
    }
    for name, run in runs.items():
        assert run.returncode == 0, (name, run.stderr)
        assert_nothing_lost(run.metrics)
        assert run.metrics["duplicates"] == 15
    outcomes = [_outcome(tmp_path / out) for out in ("o1", "o2", "o3")]
    assert outcomes[0] == outcomes[1] == outcomes[2]
    conflicts = sum(1 for v in outcomes[0].values() if v.startswith("type_conflict"))
    assert 0 < conflicts < 400  # the data really exercises the rule
    schemas = [
        json.loads((tmp_path / o / "metadata_schema.json").read_text())["fields"]
        for o in ("o1", "o2", "o3")
    ]
    assert schemas[0] == schemas[1] == schemas[2]


def test_schema_show_and_seed(tmp_path):
    types = tmp_path / "types.json"
    types.write_text('{"amount": "number", "currency": "string"}')
    store = str(tmp_path / "schema.json")
    seeded = run_cli(["schema", "seed", str(types), "--types", "--schema_store", store])
    assert seeded.returncode == 0, seeded.stderr
    assert "seeded 2 new keys" in seeded.stderr
    (tmp_path / "in.jsonl").write_bytes(
        _action("x", 1, {"amount": "12.00"}) + b"\n" + _action("y", 1, {"amount": 12})
    )
    run = _files_run(tmp_path, str(tmp_path / "in.jsonl"), "out", "--schema_store", store)
    assert run.returncode == 0, run.stderr
    assert _outcome(tmp_path / "out") == {"x": "type_conflict:amount", "y": "sent"}
    shown = run_cli(["schema", "show", "--schema_store", store])
    assert json.loads(shown.stdout)["fields"] == {"amount": "number", "currency": "string"}
    bad = run_cli(["schema", "show", "--schema_store", store, "--schema_scope", "path"])
    assert bad.returncode == 2 and "tracks keys by name" in bad.stderr


def test_a_conflict_only_moesif_knows_about_is_isolated_by_bisection(tmp_path, start_collector):
    # The organization's schema already says "plan" is a string (another app sent it); this
    # run's own schema store is empty, so only the collector can refuse the record.
    collector = start_collector(application_id=APP_ID)
    collector.seed_schema({"plan": "string"})
    lines = [_action(f"ok-{i}", 1, {"seats": i}) for i in range(9)]
    lines.insert(4, _action("bad", 1, {"plan": 3}))
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    run = run_cli(
        [
            "actions",
            "--input",
            str(tmp_path / "in.jsonl"),
            "--moesif_base_url",
            collector.url,
            "--output_dir",
            str(tmp_path / "out"),
        ],
        app_id=APP_ID,
        metrics=tmp_path / "metrics.json",
    )
    assert run.returncode == 0, run.stderr
    assert_nothing_lost(run.metrics)
    assert (run.metrics["sent"], run.metrics["collector_rejected"]) == (9, 1)
    dead = read_dead_letters(str(tmp_path / "out" / "dead_letter"))
    assert [(d["reason"], d["transaction_id"]) for d in dead] == [("collector_rejected", "bad")]
    assert "metadata type conflict" in dead[0]["detail"]
    assert collector.stats()["type_conflicts"] >= 1
    assert len(collector.records("actions")) == 9
