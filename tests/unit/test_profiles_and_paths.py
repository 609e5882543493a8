"""Runner profiles (one flag for an engine's options) and local paths on engines elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moesif_beam.runners import cli
from moesif_beam.runners.options import UsageError
from moesif_beam.runners.paths import place_paths, where_workers_run
from moesif_beam.runners.profiles import apply_profile, given_flags, package_setup_file
from tests.conftest import REPO

GCP = ["--project", "p", "--region", "r", "--temp_location", "gs://b/tmp"]


def test_local_is_todays_default_and_adds_nothing():
    assert apply_profile("local", []) == []
    assert apply_profile("local", ["--direct_num_workers=2"]) == ["--direct_num_workers=2"]


def test_flink_local_sets_the_runner_its_master_and_parallelism():
    assert apply_profile("flink-local", []) == [
        "--runner=FlinkRunner",
        "--flink_master=127.0.0.1:8081",
        "--parallelism=2",
    ]


def test_the_users_flags_win_over_the_profiles_in_either_spelling():
    resolved = apply_profile("flink-local", ["--flink_master", "127.0.0.1:9091", "--parallelism=4"])
    assert resolved == [
        "--runner=FlinkRunner",
        "--flink_master",
        "127.0.0.1:9091",
        "--parallelism=4",
    ]


def test_flink_cluster_needs_the_users_master():
    with pytest.raises(UsageError, match=r"^--profile flink-cluster needs --flink_master \("):
        apply_profile("flink-cluster", [])
    assert apply_profile("flink-cluster", ["--flink_master=jm:8081"]) == [
        "--runner=FlinkRunner",
        "--flink_master=jm:8081",
    ]


def test_dataflow_ships_this_package_and_names_every_missing_flag_in_one_line():
    with pytest.raises(UsageError) as raised:
        apply_profile("dataflow", ["--project=p"])
    assert str(raised.value).startswith(
        "--profile dataflow needs --region and --temp_location (for example --project "
    )
    assert "\n" not in str(raised.value)
    resolved = apply_profile("dataflow", GCP)
    assert resolved[:2] == ["--runner=DataflowRunner", f"--setup_file={REPO / 'setup.py'}"]
    assert resolved[2:] == GCP


def test_dataflow_keeps_the_users_setup_file_or_container():
    own = apply_profile("dataflow", [*GCP, "--setup_file=/src/setup.py"])
    assert [a for a in own if "setup_file" in a] == ["--setup_file=/src/setup.py"]
    image = apply_profile("dataflow", [*GCP, "--sdk_container_image=img"])
    assert not [a for a in image if "setup_file" in a]


def test_a_plain_dataflow_runner_needs_the_same_flags():
    with pytest.raises(UsageError, match=r"^--runner DataflowRunner needs --project, --region and"):
        apply_profile("local", ["--runner", "DataflowRunner"])


def test_the_package_setup_file_is_this_checkouts():
    assert package_setup_file() == str(REPO / "setup.py")


def test_given_flags_reads_both_spellings():
    assert given_flags(["--a=1", "--b", "2", "x", "--c"]) == {"a", "b", "c"}


# Paths ------------------------------------------------------------------------------------

PATHS = {"input": "logs/*.jsonl", "output_dir": "out", "dead_letter": "", "metrics_out": "m.json"}


@pytest.mark.parametrize(
    ("beam_args", "where"),
    [
        ([], "local"),
        (["--runner=FnApiRunner"], "local"),
        (["--runner=FlinkRunner", "--flink_master=[local]"], "this-machine"),
        (["--runner=FlinkRunner"], "this-machine"),  # Beam's [auto]: embedded
        (["--runner=FlinkRunner", "--flink_master=127.0.0.1:8081"], "this-machine"),
        (["--runner=FlinkRunner", "--flink_master=http://localhost:8081"], "this-machine"),
        (["--runner=FlinkRunner", "--flink_master=[::1]:8081"], "this-machine"),
        (["--runner=FlinkRunner", "--flink_master=10.1.2.3:8081"], "elsewhere"),
        (["--runner=FlinkRunner", "--flink_master", "jm.example:8081"], "elsewhere"),
        (["--runner=PortableRunner", "--job_endpoint=localhost:8099"], "this-machine"),
        (["--runner=PortableRunner", "--job_endpoint=js:8099"], "elsewhere"),
        (["--runner=PrismRunner"], "this-machine"),
        (["--runner=DataflowRunner"], "elsewhere"),
    ],
)
def test_where_workers_run(beam_args, where):
    assert where_workers_run(beam_args).where == where


def test_local_runners_keep_paths_as_given():
    assert place_paths(PATHS, []) == PATHS


def test_workers_on_this_machine_get_absolute_paths():
    placed = place_paths(PATHS, ["--runner=FlinkRunner", "--flink_master=[local]"])
    cwd = os.getcwd()
    assert placed == {
        "input": f"{cwd}/logs/*.jsonl",
        "output_dir": f"{cwd}/out",
        "dead_letter": "",
        "metrics_out": f"{cwd}/m.json",
    }


def test_urls_are_left_alone_everywhere():
    urls = {"input": "gs://b/in/*.jsonl", "output_dir": "s3://b/out"}
    assert place_paths(urls, ["--runner=DataflowRunner"]) == urls


def test_dataflow_refuses_any_local_path_the_workers_use_in_one_line():
    with pytest.raises(UsageError) as raised:
        place_paths({"input": "logs/*.jsonl"}, ["--runner=DataflowRunner"])
    assert str(raised.value) == (
        "--input logs/*.jsonl is a local path; Dataflow workers cannot read it: use gs://BUCKET/..."
    )
    with pytest.raises(UsageError, match=r"^--output_dir /data/out is a local path"):
        place_paths({"output_dir": "/data/out"}, ["--runner=DataflowRunner"])


def test_a_refused_default_says_so():
    with pytest.raises(UsageError, match=r"^--output_dir ./moesif-out \(the default\) is a local"):
        place_paths(
            {"output_dir": "./moesif-out"},
            ["--runner=DataflowRunner"],
            defaults={"output_dir": "./moesif-out"},
        )


def test_the_launchers_own_files_are_never_refused():
    placed = place_paths({"metrics_out": "m.json"}, ["--runner=DataflowRunner"])
    assert placed == {"metrics_out": str(Path.cwd() / "m.json")}


def test_a_remote_flink_cluster_refuses_relative_paths_and_takes_absolute_ones():
    remote = ["--runner=FlinkRunner", "--flink_master=10.1.2.3:8081"]
    with pytest.raises(UsageError) as raised:
        place_paths({"dead_letter": "dl"}, remote)
    assert str(raised.value) == (
        "--dead_letter dl is a relative local path; the workers of the Flink cluster at "
        "10.1.2.3:8081 cannot write it: use an absolute path on a filesystem they all mount"
    )
    assert place_paths({"dead_letter": "/shared/dl"}, remote) == {"dead_letter": "/shared/dl"}


def test_the_command_refuses_a_local_input_for_dataflow_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:
        remote = ["--runner", "FlinkRunner", "--flink_master", "10.1.2.3:8081"]
        cli.main(["events", "--input", "logs/*.jsonl", "--output_dir", "gs://b/out", *remote])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "moesif-beam events: --input logs/*.jsonl is a relative local path; the workers of the "
        "Flink cluster at 10.1.2.3:8081 cannot read it: use an absolute path on a filesystem "
        "they all mount (see moesif-beam events --help)"
    )


def test_the_command_names_the_missing_dataflow_flags_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["events", "--input", "gs://b/in/*", "--profile", "dataflow", "--project=p"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith(
        "moesif-beam events: --profile dataflow needs --region and --temp_location"
    )


def test_a_dry_run_on_another_runner_is_refused(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["events", "--input", "x.jsonl", "--dry_run=True"])
    assert exited.value.code == 2
    assert "--dry_run=True builds a Dataflow job" in capsys.readouterr().err


def test_flink_runs_give_sdk_workers_unbounded_send_queues():
    # Runner 2.62 drains a bundle's outputs only after the bundle ends; SDK 2.77's bounded
    # send queues then stall any bundle with more output than they hold (measured at 1M
    # events). A data channel made after the call has no limit.
    from apache_beam.runners.worker import data_plane

    from moesif_beam.runners.engines.flink import unbounded_sdk_send_queues

    saved = data_plane._DEFAULT_SEND_QUEUE_MAX_ELEMENTS, data_plane._DEFAULT_SEND_QUEUE_MAX_BYTES
    try:
        assert unbounded_sdk_send_queues()
        channel = data_plane.GrpcClientDataChannel.__new__(data_plane.GrpcClientDataChannel)
        data_plane._GrpcDataChannel.__init__(channel)
        assert (channel._to_send.max_elements, channel._to_send.max_bytes) == (0, 0)
        channel.close()
    finally:
        (
            data_plane._DEFAULT_SEND_QUEUE_MAX_ELEMENTS,
            data_plane._DEFAULT_SEND_QUEUE_MAX_BYTES,
        ) = saved


def test_the_dedup_journal_is_a_worker_path():
    on_this_machine = ["--runner=FlinkRunner", "--flink_master=[local]"]
    placed = place_paths({"dedup_journal": "ids"}, on_this_machine)
    assert placed == {"dedup_journal": f"{os.getcwd()}/ids"}
    with pytest.raises(UsageError, match=r"^--dedup_journal ids is a local path; Dataflow"):
        place_paths({"dedup_journal": "ids"}, ["--runner=DataflowRunner"])


def test_a_flink_local_run_gets_two_workers_per_subtask():
    from moesif_beam.runners.engines.flink import pool_worker_flags

    assert pool_worker_flags(["--parallelism=3"], "127.0.0.1:5") == [
        "--environment_type=EXTERNAL",
        "--environment_config=127.0.0.1:5",
        "--sdk_worker_parallelism=6",
    ]
    assert pool_worker_flags([], "p")[-1] == "--sdk_worker_parallelism=4"
    given = ["--sdk_worker_parallelism", "1"]
    expected = ["--environment_type=EXTERNAL", "--environment_config=p"]
    assert pool_worker_flags(given, "p") == expected
    for odd in ("--parallelism=two", "--parallelism=-1"):  # Beam refuses these itself
        assert pool_worker_flags([odd], "p") == expected
