"""Dataflow, proven offline: the full job is built with no network and no credentials.

Dataflow cannot be reached from here. The command runs in a network namespace of its own
with no interface up but a downed loopback (``unshare -n``), from the virtualenv that has
the ``dataflow`` extra (``make dataflow-venv``: Beam's Google Cloud libraries stay out of
``.venv``). An audit hook also records every name lookup and connection the command's
Python process attempts, so "nothing tried to connect" is checked, not only enforced.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

PYTHON = REPO / ".venv-dataflow" / "bin" / "python"
GCP = ["--project", "my-project", "--region", "us-central1", "--temp_location", "gs://bkt/tmp"]

# Runs the command with an audit hook that writes every network attempt to a file.
_AUDITED = """
import runpy, sys
log = open(sys.argv[1], "a")
def hook(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto"):
        log.write(f"{event} {args!r}\\n"); log.flush()
sys.addaudithook(hook)
sys.argv = ["moesif-beam", *sys.argv[2:]]
runpy.run_module("moesif_beam.runners.cli", run_name="__main__")
"""


def _offline_namespace_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], check=False).returncode == 0


@pytest.fixture(scope="module")
def offline() -> None:
    if not PYTHON.exists():
        pytest.skip("no .venv-dataflow: `make dataflow-venv` installs the dataflow extra")
    if not _offline_namespace_works():
        pytest.skip("`unshare -n` is not permitted here (it needs root or user namespaces)")


def _dry_run(tmp_path: Path, args: list[str]) -> tuple[subprocess.CompletedProcess[str], dict]:
    job_file, attempts = tmp_path / "job.json", tmp_path / "network-attempts.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOOGLE_")}
    env["HOME"] = str(tmp_path)  # no gcloud configuration or credentials to find
    command = [str(PYTHON), "-c", _AUDITED, str(attempts), *args]
    proc = subprocess.run(
        ["unshare", "-n", *command, "--dry_run=True", "--dataflow_job_file", str(job_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not attempts.exists() or attempts.read_text() == "", attempts.read_text()
    return proc, json.loads(job_file.read_text())


def _transforms(document: dict) -> set[str]:
    return {t["uniqueName"] for t in document["pipeline"]["components"]["transforms"].values()}


@pytest.mark.usefixtures("offline")
def test_the_events_job_is_built_offline_from_gs_paths(tmp_path):
    paths = ["--input", "gs://bkt/in/*.jsonl", "--output_dir", "gs://bkt/out"]
    app_id = ["--moesif_application_id", "app-id-12345"]
    proc, document = _dry_run(
        tmp_path, ["events", *paths, "--runner", "DataflowRunner", *GCP, *app_id]
    )
    assert "dry run: Dataflow batch job" in proc.stdout
    assert "nothing was staged or submitted" in proc.stdout
    assert document["dryRun"] is True
    job = document["job"]
    assert job["type"] == "JOB_TYPE_BATCH"
    pool = job["environment"]["workerPools"][0]
    assert pool["workerHarnessContainerImage"].endswith("beam_python3.11_sdk:2.77.0")
    options = job["environment"]["sdkPipelineOptions"]["options"]
    assert options["project"] == "my-project"
    assert options["region"] == "us-central1"
    assert {"ReadFiles", "Normalize", "Dedup", "MetadataSchema", "Deliver", "DeadLetters"} <= (
        _transforms(document)
    )
    assert "app-id-12345" not in json.dumps(document)  # the secret is not an option
    assert "pipeline.pb" in document["staged"]


@pytest.mark.usefixtures("offline")
def test_the_dataflow_profile_ships_the_package_and_builds_a_stream(tmp_path):
    paths = ["--input", "gs://bkt/in/*.jsonl", "--follow", "--output_dir", "gs://bkt/o"]
    proc, document = _dry_run(tmp_path, ["actions", *paths, "--profile", "dataflow", *GCP])
    assert "dry run: Dataflow streaming job" in proc.stdout
    assert document["job"]["type"] == "JOB_TYPE_STREAMING"
    # --setup_file: the package's sdist is built (offline) and would be staged.
    assert "workflow.tar.gz" in document["staged"]
    options = document["job"]["environment"]["sdkPipelineOptions"]["options"]
    assert options["setup_file"] == str(REPO / "setup.py")
    assert {"FollowFiles", "Normalize", "Dedup", "Deliver", "DeadLetters"} <= _transforms(document)
