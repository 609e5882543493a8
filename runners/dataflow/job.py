"""A Dataflow run built and written down, not submitted: ``--dry_run=True``.

Beam's DataflowRunner with ``--dry_run=True`` applies Dataflow's overrides and builds the
job, then returns before it creates a client: nothing is staged, nothing is sent, no
credentials are read. It does not write ``--dataflow_job_file`` then (Beam writes it only
while submitting), so this module does, with what a submission would have sent: the job
request (its environment completed as Beam completes it, offline) and the portable
pipeline Beam would stage as ``pipeline.pb``, where every transform is named.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    DebugOptions,
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
    TestOptions,
)
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from google.protobuf import json_format

from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.runners.options import UsageError

__all__ = ["dry_run_requested", "job_document", "run_dry"]

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_STAGED_PIPELINE = "pipeline.pb"


def dry_run_requested(beam_args: list[str]) -> tuple[bool, list[str]]:
    """Whether ``--dry_run`` asks for a dry run, and the Beam flags to run with.

    Beam declares ``--dry_run`` without a type, so ``--dry_run=False`` is the string
    ``"False"``, which Beam takes as true: a false value is removed here instead.

    Raises:
        UsageError: a value that is neither true nor false, or a dry run on a runner other
            than Dataflow (which would run the pipeline for real).
    """
    value = PipelineOptions(beam_args).view_as(TestOptions).dry_run
    text = str(value).strip().lower()
    if value is False or text in _FALSE:
        kept = [a for i, a in enumerate(beam_args) if not _is_dry_run_arg(beam_args, i)]
        return False, kept
    if text not in _TRUE:
        msg = f"--dry_run takes True or False, got {value!r}"
        raise UsageError(msg)
    runner = str(PipelineOptions(beam_args).view_as(StandardOptions).runner or "")
    if runner.rsplit(".", 1)[-1].lower() not in ("dataflowrunner", "testdataflowrunner"):
        msg = (
            "--dry_run=True builds a Dataflow job without submitting it; it needs "
            "--runner DataflowRunner (or --profile dataflow)"
        )
        raise UsageError(msg)
    job_file = PipelineOptions(beam_args).view_as(DebugOptions).dataflow_job_file
    if job_file and "://" in job_file:
        msg = f"--dataflow_job_file {job_file}: a dry run writes a local file (no network)"
        raise UsageError(msg)
    return True, list(beam_args)


def _is_dry_run_arg(args: list[str], index: int) -> bool:
    arg = args[index]
    if arg.startswith("--dry_run="):
        return True
    if arg == "--dry_run":
        return True
    return index > 0 and args[index - 1] == "--dry_run"


def _staged_names(pipeline: beam_runner_api_pb2.Pipeline) -> list[str]:
    """The files a submission would stage for the workers (the --setup_file sdist...)."""
    names: list[str] = []
    for _, environment in sorted(pipeline.components.environments.items()):
        for dependency in environment.dependencies:
            if dependency.role_urn == common_urns.artifact_roles.STAGING_TO.urn:
                payload = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(
                    dependency.role_payload
                )
                name = payload.staged_name
            else:
                file_payload = beam_runner_api_pb2.ArtifactFilePayload.FromString(
                    dependency.type_payload
                )
                name = os.path.basename(file_payload.path)
            if name not in names:
                names.append(name)
    return names


def job_document(job: Any) -> dict[str, Any]:
    """What a submission of Beam's built ``job`` would send, as one JSON document.

    Beam completes the job's environment (worker pool, SDK container, pipeline options,
    experiments) while staging; this does the same offline, listing the staged files by
    name instead of uploading them.

    Returns:
        ``job``: the Dataflow job request, as Beam writes it to ``--dataflow_job_file`` on a
        real submission; ``pipeline``: the portable pipeline Beam would stage as
        ``pipeline.pb``; ``staged``: the files it would stage (not staged in a dry run).
    """
    from apache_beam.runners.dataflow.internal import apiclient  # noqa: PLC0415 - the extra

    options = job.options
    apiclient.DataflowApplicationClient._apply_sdk_environment_overrides(
        job.proto_pipeline, {}, options
    )
    staged = _staged_names(job.proto_pipeline)
    serialized = job.proto_pipeline.SerializeToString()
    staging = options.view_as(GoogleCloudOptions).staging_location.rstrip("/")
    job.proto.environment = apiclient.Environment(
        packages=staged,
        options=options,
        environment_version=apiclient._FNAPI_ENVIRONMENT_MAJOR_VERSION,
        proto_pipeline_staged_url=f"{staging}/{_STAGED_PIPELINE}",
        proto_pipeline=job.proto_pipeline,
        pipeline_proto_hash=hashlib.sha256(serialized).hexdigest(),
    ).proto
    return {
        "dryRun": True,
        "job": json.loads(job.json()),
        "pipeline": json_format.MessageToDict(job.proto_pipeline),
        "staged": [*staged, _STAGED_PIPELINE],
    }


def run_dry(
    build: Callable[[PipelineConfig, PipelineOptions, Mapping[str, str]], beam.Pipeline],
    config: PipelineConfig,
    options: PipelineOptions,
    out: TextIO = sys.stdout,
) -> int:
    """Build the Dataflow job of ``config``, write ``--dataflow_job_file``; return 0.

    The graph is built with an empty stored metadata schema (the store is not read: it
    may be on gs://); a real submission reads it at launch and seeds the graph with it.
    """
    try:
        pipeline = build(config, options, {})
    except ValueError as exc:  # Beam's own checks of the options (a malformed project id)
        raise UsageError(" ".join(str(exc).split())) from None
    result: Any = pipeline.run()  # a dry run's result carries the built job
    document = job_document(result.job)
    transforms = document["pipeline"]["components"]["transforms"].values()
    groupings = sum(
        1
        for t in transforms
        if t.get("spec", {}).get("urn") == common_urns.primitives.GROUP_BY_KEY.urn
    )
    job_file = options.view_as(DebugOptions).dataflow_job_file
    if job_file:
        with open(job_file, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2, sort_keys=True)
            handle.write("\n")
    kind = "streaming" if options.view_as(StandardOptions).streaming else "batch"
    print(
        f"moesif-beam {config.pipeline}: dry run: Dataflow {kind} job "
        f"{document['job'].get('name', '?')} built offline ({len(transforms)} transforms, "
        f"{groupings} GroupByKeys); nothing was staged or submitted"
        + (f" -> {job_file}" if job_file else ""),
        file=out,
        flush=True,
    )
    return 0
