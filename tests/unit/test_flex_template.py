"""The Flex Template's metadata documents every flag of the command, and stays in sync."""

from __future__ import annotations

import importlib.util
import json

import pytest

from moesif_beam.runners import cli
from moesif_beam.runners.dataflow import flex_template
from moesif_beam.runners.dataflow.job import dry_run_requested
from moesif_beam.runners.options import UsageError, check_beam_args


def test_metadata_json_is_what_the_parser_generates():
    kept = flex_template.METADATA_FILE.read_text(encoding="utf-8")
    assert kept == flex_template.render(), (
        "runners/dataflow/metadata.json is out of date: run "
        "python -m moesif_beam.runners.dataflow.flex_template --write"
    )


def test_every_flag_of_both_pipelines_is_a_documented_parameter():
    parameters = {p["name"]: p for p in json.loads(flex_template.render())["parameters"]}
    parser = cli._parser()
    for pipeline in ("events", "actions"):
        args = parser.parse_args([pipeline, "--input", "x"])
        for action in args.parser._actions:
            if action.option_strings and action.dest != "help":
                name = action.option_strings[0][2:]
                assert name in parameters, name
                assert parameters[name]["helpText"], name
    assert parameters["pipeline"]["isOptional"] is False
    assert parameters["format"]["regexes"] == [
        "^(apigee|auto|aws|azure|envoy|kong|moesif|nginx|segment|tyk|wso2)$"
    ]
    assert parameters["follow"]["regexes"] == ["^(true|false)$"]


def test_the_launchers_arguments_become_the_command_line():
    argv = flex_template.template_argv(
        ["--pipeline=actions", "--input=gs://b/*.jsonl", "--follow=true", "--fork_workers=false"]
    )
    assert argv == ["actions", "--input=gs://b/*.jsonl", "--follow", "--profile=dataflow"]
    own = flex_template.template_argv(["--pipeline=events", "--runner=DataflowRunner"])
    assert own == ["events", "--runner=DataflowRunner"]
    with pytest.raises(ValueError, match="--pipeline must be one of events, actions"):
        flex_template.template_argv(["--input=x"])
    with pytest.raises(ValueError, match="--follow takes true or false"):
        flex_template.template_argv(["--pipeline=events", "--follow=yes please"])


def test_dry_run_false_is_false_although_beam_reads_it_as_a_string():
    assert dry_run_requested(["--dry_run=False", "--runner=X"]) == (False, ["--runner=X"])
    assert dry_run_requested(["--dry_run", "false"]) == (False, [])
    with pytest.raises(UsageError, match="--dry_run takes True or False"):
        dry_run_requested(["--dry_run=maybe"])


def _has_dataflow_extra() -> bool:
    try:
        return importlib.util.find_spec("google.cloud.dataflow") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(_has_dataflow_extra(), reason="the dataflow extra is installed here")
def test_dataflow_without_its_extra_is_one_line_naming_the_extra():
    with pytest.raises(UsageError) as raised:
        check_beam_args(["--runner", "DataflowRunner"])
    assert str(raised.value) == (
        "--runner DataflowRunner cannot be used here: it needs Beam's Google Cloud libraries; "
        "install them with: pip install 'moesif-beam[dataflow]'"
    )
