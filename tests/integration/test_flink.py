"""Bounded runs on Flink give what the default runner gives: records, dead letters, counters.

The runs go through the real command, as a user's would: ``--runner FlinkRunner
--flink_master [local] --parallelism 2`` starts moesif-beam's own Flink job server (Beam's
runner 2.62.0 from Maven Central, an embedded Flink 1.19) and LOOPBACK workers, and the
default runner's run of the same input is the reference. Records are compared as multisets
(Flink batches them differently), dead letters by their content, counters by value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, CliRun
from tests.helpers import assert_nothing_lost, read_dead_letters
from tests.kafka_support import committed, produce
from tests.processes import ListeningSampler, is_loopback

pytestmark = [pytest.mark.integration, pytest.mark.flink]

APP_ID = "flink-app-id-5e8a"
SAMPLES = REPO / "samples"
FLINK_LOCAL = ["--runner", "FlinkRunner", "--flink_master", "[local]", "--parallelism", "2"]
# Counters that depend on how records are grouped into batches, not on what is delivered.
_BATCHING = {"batches", "bytes_sent"}


def _run(args: list[str], metrics: Path) -> tuple[CliRun, set[tuple[int, str, int]]]:
    """The command in a subprocess, with every socket its process tree listens on."""
    env = {k: v for k, v in os.environ.items() if k != "MOESIF_APPLICATION_ID"}
    env["MOESIF_APPLICATION_ID"] = APP_ID
    proc = subprocess.Popen(
        [sys.executable, "-m", "moesif_beam.runners.cli", *args, "--metrics_out", str(metrics)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = ListeningSampler(proc)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    seen = sampler.stop()
    loaded = json.loads(metrics.read_text()) if metrics.exists() else {}
    return CliRun(proc.returncode, out, err, loaded), seen


def _delivered(collector: Any, kind: str) -> Counter[str]:
    return Counter(json.dumps(record, sort_keys=True) for record in collector.records(kind))


def _dead(out: Path) -> Counter[str]:
    letters = read_dead_letters(str(out / "dead_letter"))
    for letter in letters:
        letter.pop("failed_at", None)  # when, not what
        letter["payload"] = letter["payload"].hex()
    return Counter(json.dumps(letter, sort_keys=True, default=str) for letter in letters)


def _files(sample: str) -> Callable[[str], list[str]]:
    """The same input file for both runs."""
    return lambda _name: ["--input", str(SAMPLES / sample)]


def _compare(
    tmp_path: Path,
    start_collector: Any,
    pipeline: str,
    source: Callable[[str], list[str]],
    flink_flags: list[str] = FLINK_LOCAL,
) -> dict[str, Any]:
    """Run ``pipeline`` on the default runner and on Flink; both must agree.

    ``source`` gives each run (``"default"``, ``"flink"``) its input flags.
    """
    results = {}
    for name, runner_flags in (("default", []), ("flink", flink_flags)):
        collector = start_collector(application_id=APP_ID)
        out = tmp_path / name
        args = [pipeline, *source(name), "--output_dir", str(out)]
        args += ["--moesif_base_url", collector.url, *runner_flags]
        run, listening = _run(args, tmp_path / f"{name}-metrics.json")
        assert run.returncode == 0, run.stderr[-3000:]
        assert_nothing_lost(run.metrics)
        results[name] = (run, listening, _delivered(collector, pipeline), _dead(out))
    base, flink = results["default"], results["flink"]
    assert flink[2] == base[2], "Flink delivered other records"
    assert flink[3] == base[3], "Flink wrote other dead letters"
    counters = {k: v for k, v in base[0].metrics.items() if isinstance(v, int)}
    for key, value in counters.items():
        if key not in _BATCHING:
            assert flink[0].metrics[key] == value, (key, flink[0].metrics[key], value)
    # The job server, embedded Flink and LOOPBACK workers listen on loopback only.
    seen = flink[1]
    assert seen, "no listening socket was seen during the Flink run"
    assert all(is_loopback(address) for _, address, _ in seen), seen
    return {"default": base, "flink": flink}


@pytest.mark.usefixtures("flink_jobserver")
def test_events_on_flink_local_match_the_default_runner(tmp_path, start_collector):
    runs = _compare(tmp_path, start_collector, "events", _files("wso2_sample.jsonl"))
    metrics = runs["flink"][0].metrics
    assert (metrics["read"], metrics["sent"], metrics["duplicates"]) == (4012, 3927, 73)
    assert metrics["dead_letters"] == 12


@pytest.mark.usefixtures("flink_jobserver")
def test_actions_on_flink_local_match_the_default_runner(tmp_path, start_collector):
    runs = _compare(tmp_path, start_collector, "actions", _files("actions_moesif.jsonl"))
    metrics = runs["flink"][0].metrics
    assert metrics["read"] > 0
    assert metrics["sent"] > 0


def test_events_on_a_flink_local_cluster_match_the_default_runner(
    tmp_path, start_collector, flink_local
):
    flags = ["--runner", "FlinkRunner", "--flink_master", f"127.0.0.1:{flink_local}"]
    runs = _compare(
        tmp_path,
        start_collector,
        "events",
        _files("wso2_sample.jsonl"),
        [*flags, "--parallelism", "2"],
    )
    metrics = runs["flink"][0].metrics
    assert (metrics["read"], metrics["sent"], metrics["duplicates"]) == (4012, 3927, 73)


def test_actions_on_a_flink_local_cluster_match_the_default_runner(
    tmp_path, start_collector, flink_local
):
    flags = ["--runner", "FlinkRunner", "--flink_master", f"127.0.0.1:{flink_local}"]
    runs = _compare(
        tmp_path,
        start_collector,
        "actions",
        _files("actions_moesif.jsonl"),
        [*flags, "--parallelism", "2"],
    )
    metrics = runs["flink"][0].metrics
    assert metrics["read"] > 0
    assert metrics["sent"] > 0


# Truncated JSON and bytes that are not UTF-8: each dead-lettered with its topic/partition@offset.
_POISON = [b'{"truncated": ', b"\xff\xfe not utf-8 at all"]


@pytest.mark.kafka
@pytest.mark.usefixtures("flink_jobserver")
@pytest.mark.parametrize("engine", ["[local]", "flink-local"])
def test_a_kafka_backfill_on_flink_matches_the_default_runner(
    request, engine, tmp_path, start_collector, kafka_broker, kafka_topic
):
    flink_flags = FLINK_LOCAL
    if engine == "flink-local":
        port = request.getfixturevalue("flink_local")
        flink_flags = ["--runner", "FlinkRunner", "--flink_master", f"127.0.0.1:{port}"]
        flink_flags += ["--parallelism", "2"]
    lines = (SAMPLES / "wso2_sample.jsonl").read_bytes().splitlines()
    values = [line for line in lines if line.strip()] + _POISON
    topic = kafka_topic(partitions=2)
    bootstrap = kafka_broker.bootstrap_servers
    produce(bootstrap, topic, values, partitions=2)

    def source(name: str) -> list[str]:
        return [
            "--source",
            "kafka",
            "--kafka_bootstrap_servers",
            bootstrap,
            "--kafka_topic",
            topic,
            "--kafka_group_id",
            f"flink-backfill-{name}",
            "--kafka_stop",
            "now",
        ]

    runs = _compare(tmp_path, start_collector, "events", source, flink_flags)
    metrics = runs["flink"][0].metrics
    assert metrics["read"] == len(values)
    assert metrics["dead_letters"] == 12 + len(_POISON)
    letters = read_dead_letters(str(tmp_path / "flink" / "dead_letter"))
    assert {bytes(d["payload"]) for d in letters} >= set(_POISON)
    assert all(d["source"].startswith(f"{topic}/") and "@" in d["source"] for d in letters)
    # Both runs committed each partition's end to their own group, and only that.
    half = (len(values) + 1) // 2
    expected = [half, len(values) - half]
    assert committed(bootstrap, "flink-backfill-default", topic, 2) == expected
    assert committed(bootstrap, "flink-backfill-flink", topic, 2) == expected
