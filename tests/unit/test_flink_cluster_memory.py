"""flink-local's TaskManager size: parsed, bounded, and written into Flink's configuration."""

from __future__ import annotations

import os

import pytest

from moesif_beam.runners.engines.flink_cluster import (
    _config,
    default_taskmanager_mb,
    parse_memory_mb,
)


@pytest.mark.parametrize(
    ("text", "mb"), [("8g", 8192), ("8G", 8192), ("6144m", 6144), ("6144", 6144), ("4gb", 4096)]
)
def test_sizes_are_read_in_mib(text, mb):
    assert parse_memory_mb(text) == mb


@pytest.mark.parametrize("text", ["", "lots", "8 t", "-8g", "2g", "1024m", "8bg", "8gm"])
def test_unusable_sizes_are_refused_naming_the_flag(text):
    with pytest.raises(ValueError, match="--taskmanager_memory"):
        parse_memory_mb(text)


def test_the_default_is_a_third_of_this_machine_within_bounds():
    from moesif_beam.runners.engines.flink_cluster import _memory_mb

    total = _memory_mb()
    assert total is not None
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    assert 0 < total <= physical
    assert default_taskmanager_mb() == max(4096, min(16384, total // 3))


def test_the_configuration_carries_the_size_and_loopback_addresses(tmp_path):
    home = tmp_path / "home"
    (home / "conf").mkdir(parents=True)
    (home / "conf" / "config.yaml").write_text(
        "env:\n  java:\n    opts:\n      all: --add-opens=x\n"
    )
    conf = dict(line.split(": ", 1) for line in _config(8081, tmp_path, home, 6144).splitlines())
    assert conf["taskmanager.memory.process.size"] == "6144m"
    assert conf["taskmanager.memory.managed.fraction"] == "0.25"
    assert conf["rest.port"] == "8081"
    assert conf["env.java.opts.all"] == "--add-opens=x"
    assert {conf[k] for k in conf if k.endswith(("bind-host", "address"))} == {"127.0.0.1"}
