"""The journal of delivered ids: whole files only, incremental reads, safe compaction."""

from __future__ import annotations

import time

import apache_beam as beam

from moesif_beam.transforms.delivery.journal import (
    DeliveredIds,
    decode_entries,
    encode_entries,
    live_entries,
    shard_of,
)
from moesif_beam.transforms.delivery.sinks import ACKS, WriteBatchFiles
from moesif_beam.transforms.records import Ack, Record

TTL_MS = 60_000
# Journal times are the wall clock: entries are made relative to now.
T0 = int(time.time() * 1000)


def test_entries_round_trip_and_anything_else_is_not_a_journal_file():
    entries = [("a", 1), ("b\n\t\u00e9", 2**40)]
    assert decode_entries(encode_entries(entries)) == entries
    whole = encode_entries(entries)
    assert decode_entries(whole[:-3]) is None  # cut short
    assert decode_entries(b'{"a": 1}') is None
    assert decode_entries(b'[["a", "1"]]') is None
    assert decode_entries(b'[["a", 1.5]]') is None
    assert decode_entries(b'[["a", true]]') is None
    assert decode_entries(b'[["a", 1, 2]]') is None


def test_live_entries_keep_each_id_once_at_its_earliest_time_within_the_ttl():
    entries = [("a", 5_000), ("b", 100_000), ("a", 3_000), ("c", 40_000), ("c", 39_999)]
    # With the clock behind the newest entry (100 s), the newest is "now": what is older
    # than 100 s - 60 s is forgotten.
    assert live_entries(entries, TTL_MS) == {"b": 100_000}
    assert live_entries(entries, 61_000) == {"b": 100_000, "c": 39_999}
    # With the clock ahead, the clock decides: after a long stop, old ids are not live.
    assert live_entries(entries, 61_000, now_ms=100_500) == {"b": 100_000, "c": 39_999}
    assert live_entries(entries, 61_000, now_ms=200_000) == {}
    assert live_entries([], TTL_MS) == {}


def test_shards_match_the_dedup_keys():
    from moesif_beam.transforms.dedup.streaming import _to_shard

    for tid in ("a", "b", "ünï", "x" * 100):
        assert _to_shard((tid, None), 16)[0] == shard_of(tid, 16)  # type: ignore[arg-type]
        assert 0 <= shard_of(tid, 16) < 16


def test_reads_are_incremental_and_ignore_what_is_not_whole(tmp_path):
    directory = tmp_path / "j"
    journal = DeliveredIds(str(directory), TTL_MS)
    assert journal.read() == {}  # no directory yet
    journal.write([("a", T0 + 1), ("b", T0 + 2)])
    journal.write([])  # nothing to write: no file
    assert len(list(directory.glob("*.ids"))) == 1
    reader = DeliveredIds(str(directory), TTL_MS)
    assert reader.read() == {"a": T0 + 1, "b": T0 + 2}
    (directory / "torn.ids").write_bytes(b'[["c", 3')  # not whole: ignored
    (directory / ".x.ids.tmp").write_bytes(b'[["d", 4]]')  # staging: never listed
    journal.write([("a", T0), ("e", T0 + 5)])
    assert reader.read() == {"a": T0, "b": T0 + 2, "e": T0 + 5}
    assert reader.read_shard(shard_of("e", 4), 4)["e"] == T0 + 5
    assert sum(len(reader.read_shard(i, 4)) for i in range(4)) == 3


def test_ids_a_ttl_older_than_now_are_forgotten(tmp_path):
    journal = DeliveredIds(str(tmp_path / "j"), TTL_MS)
    journal.write([("old", T0 - TTL_MS - 5_000), ("new", T0)])
    assert journal.read() == {"new": T0}


def test_compaction_merges_into_one_file_and_drops_the_expired_and_the_torn(tmp_path, monkeypatch):
    # The journal's clock held just after T0: in a full run this test starts seconds after
    # T0 was taken, and id-5 (50 s old at T0) would expire on the way.
    monkeypatch.setattr("moesif_beam.transforms.delivery.journal._now_ms", lambda: T0 + 1)
    directory = tmp_path / "j"
    journal = DeliveredIds(str(directory), TTL_MS)
    for i in range(10):
        journal.write([(f"id-{i}", T0 - i * 10_000)])
    (directory / "torn.ids").write_bytes(b"[")
    assert not journal.compact(min_files=12)
    assert journal.compact(min_files=11)
    assert len(list(directory.glob("*.ids"))) == 1  # one merged file; the torn one removed
    expected = {f"id-{i}": T0 - i * 10_000 for i in range(6)}  # within 60 s of now
    assert DeliveredIds(str(directory), TTL_MS).read() == expected


def test_two_compactions_of_one_journal_lose_nothing(tmp_path):
    directory = str(tmp_path / "j")
    writer = DeliveredIds(directory, TTL_MS)
    for i in range(6):
        writer.write([(f"id-{i}", T0 + i)])
    one, two = DeliveredIds(directory, TTL_MS), DeliveredIds(directory, TTL_MS)
    listing = one._listing()
    assert two.compact(min_files=1)  # the other worker compacts first...
    # ...then this one, with a listing taken before: the files it lists are gone.
    one._listing = lambda: listing  # type: ignore[method-assign]
    one.compact(min_files=1)
    assert DeliveredIds(directory, TTL_MS).read() == {f"id-{i}": T0 + i for i in range(6)}


def test_a_compaction_that_fails_does_not_fail_delivery(tmp_path, caplog):
    journal = DeliveredIds(str(tmp_path / "j"), TTL_MS)
    journal.write([("a", T0)])

    def full_disk(_entries: object) -> None:
        raise OSError(28, "No space left on device")

    journal.write = full_disk  # type: ignore[method-assign]
    with caplog.at_level("WARNING"):
        journal.compact_quietly()  # the default threshold is not reached: nothing to do
        assert not caplog.text
        journal.compact = lambda min_files=1: DeliveredIds.compact(journal, 1)  # type: ignore[method-assign]
        journal.compact_quietly()  # logged, not raised
    assert "could not compact the delivered-ids journal" in caplog.text
    assert DeliveredIds(str(tmp_path / "j"), TTL_MS).read() == {"a": T0}  # nothing deleted


def test_a_stream_journals_its_delivered_ids_before_their_acks_leave(tmp_path):
    journal_dir = str(tmp_path / "delivered")
    sink = WriteBatchFiles("events", str(tmp_path / "batches"), max_events=2)
    fn = sink.in_stream(5.0, journal=(journal_dir, TTL_MS))._do_transform.fn
    fn.setup()
    fn.start_bundle()
    for i, tid in enumerate(("a", "b", "c")):
        value = Record(0, b"{}", b"raw", "s", ack=Ack("t/0", i, i - 1))
        list(fn.process((tid, value)))
    before = int(time.time() * 1000)
    seen_at_first_ack = None
    for out in fn.finish_bundle():
        is_ack = isinstance(out, beam.pvalue.TaggedOutput) and out.tag == ACKS
        if is_ack and seen_at_first_ack is None:
            seen_at_first_ack = dict(DeliveredIds(journal_dir, TTL_MS).read())
    fn.teardown()
    assert seen_at_first_ack is not None
    assert set(seen_at_first_ack) == {"a", "b", "c"}
    # Times are the wall clock when the bundle ended.
    assert {before <= t <= time.time() * 1000 for t in seen_at_first_ack.values()} == {True}


def test_a_read_racing_a_compaction_still_sees_every_id(tmp_path):
    directory = str(tmp_path / "j")
    writer = DeliveredIds(directory, TTL_MS)
    for i in range(4):
        writer.write([(f"id-{i}", T0 + i)])
    reader = DeliveredIds(directory, TTL_MS)
    listing = reader._listing
    calls = []

    def compacted_after_listing() -> list[str]:
        paths = listing()
        if not calls:  # the first listing is stale by the time the files are read
            DeliveredIds(directory, TTL_MS).compact(min_files=1)
        calls.append(paths)
        return paths

    reader._listing = compacted_after_listing  # type: ignore[method-assign]
    assert reader.read() == {f"id-{i}": T0 + i for i in range(4)}
    assert len(calls) == 2  # listed again once files had vanished


def test_the_default_journal_is_scoped_by_destination():
    from moesif_beam.pipelines.config import PipelineConfig
    from moesif_beam.transforms.delivery.transport import Secret

    def journal(**settings: object) -> str:
        config = PipelineConfig(pipeline="events", input_format="wso2", input="x", **settings)
        return config.dedup_journal_dir

    files = journal()
    moesif = journal(application_id=Secret("app-id-123"))
    other = journal(application_id=Secret("app-id-123"), base_url="http://127.0.0.1:9")
    assert len({files, moesif, other}) == 3  # a dry run never speaks for a real destination
    assert files.endswith("/.delivered-ids/events-batch-files")
    assert "app-id-123" not in moesif + other
    assert journal(dedup_journal="/shared/ids") == "/shared/ids"
