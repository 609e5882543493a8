"""RangeReader on a real broker: a claimed range's records, gaps and expired offsets."""

from __future__ import annotations

from typing import Any

import pytest

from moesif_beam.transforms.records import Ack
from moesif_beam.transforms.sources.kafka_ranges import (
    KafkaRange,
    RangeReader,
    range_reader_settings,
)
from tests.kafka_support import produce

pytestmark = [pytest.mark.integration, pytest.mark.kafka]


def _reader(bootstrap: str, sticky: bool = True, **extra: Any) -> RangeReader:
    settings = {
        "bootstrap.servers": bootstrap,
        "group.id": "ranges",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        # What a user may set: the reader must not let it move a range's read.
        "auto.offset.reset": "latest",
        **extra,
    }
    return RangeReader(range_reader_settings(settings, sticky))


def _read(reader: RangeReader, topic: str, start: int, end: int) -> tuple[list, list, Any]:
    lines, _, gap = reader.read(KafkaRange(topic, 0, start, end))
    return [line.raw for line in lines], [line.ack for line in lines], gap


def _delete_before(bootstrap: str, topic: str, offset: int) -> None:
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_records([TopicPartition(topic, 0, offset)]).values():
        assert future.result(30).low_watermark == offset


def test_ranges_read_in_turn_give_each_record_once_with_chained_acks(kafka_broker, kafka_topic):
    bootstrap = kafka_broker.bootstrap_servers
    topic = kafka_topic()
    values = [f"v{i}".encode() for i in range(30)]
    produce(bootstrap, topic, values)
    reader = _reader(bootstrap)
    try:
        got, acks, gaps = [], [], []
        for start in range(0, 30, 7):
            raws, range_acks, gap = _read(reader, topic, start, min(start + 7, 30))
            got += raws
            acks += range_acks
            gaps.append(gap)
    finally:
        reader.close()
    assert got == values
    name = f"{topic}/0"
    assert acks == [Ack(name, i, i - 1) for i in range(30)]
    assert gaps == [None] * 5


def test_two_readers_taking_turns_on_one_partition_each_seek(kafka_broker, kafka_topic):
    # Not sticky: a partition's ranges go to whichever reader is free, so a reader's next
    # range does not start where its last one ended.
    bootstrap = kafka_broker.bootstrap_servers
    topic = kafka_topic()
    values = [f"v{i}".encode() for i in range(40)]
    produce(bootstrap, topic, values)
    readers = [_reader(bootstrap, sticky=False), _reader(bootstrap, sticky=False)]
    try:
        got = []
        for n, start in enumerate(range(0, 40, 5)):
            raws, _, gap = _read(readers[n % 2], topic, start, start + 5)
            got += raws
            assert gap is None
    finally:
        for reader in readers:
            reader.close()
    assert got == values


def test_transaction_markers_are_acknowledged_and_the_next_range_reads_on(
    kafka_broker, kafka_topic
):
    from confluent_kafka import Producer

    bootstrap = kafka_broker.bootstrap_servers
    topic = kafka_topic()
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": topic})
    producer.init_transactions(30)
    for batch in ("a", "b"):
        producer.begin_transaction()
        for i in range(3):
            producer.produce(topic, value=f"{batch}{i}".encode(), partition=0)
        producer.commit_transaction(30)
    # Offsets 0-2 and 4-6 hold the records, 3 and 7 the commit markers. The first range
    # ends on a marker: its consumer, asked for one more message, hands over offset 4,
    # which the second range must still get.
    reader = _reader(bootstrap, **{"isolation.level": "read_committed"})
    name = f"{topic}/0"
    try:
        first = _read(reader, topic, 0, 4)
        second = _read(reader, topic, 4, 8)
    finally:
        reader.close()
    assert first == (
        [b"a0", b"a1", b"a2"],
        [Ack(name, i, i - 1) for i in range(3)],
        Ack(name, 3, 2),
    )
    assert second == (
        [b"b0", b"b1", b"b2"],
        [Ack(name, 4, 3), Ack(name, 5, 4), Ack(name, 6, 5)],
        Ack(name, 7, 6),
    )


def test_expired_records_are_passed_and_the_rest_of_the_range_read(kafka_broker, kafka_topic):
    # The range was claimed from offset 0; retention then took offsets 0-3. The read must
    # not wait for them, nor jump to the log's end (the user's "latest"): it reads 4-9,
    # the first record's ack covering the expired offsets.
    bootstrap = kafka_broker.bootstrap_servers
    topic = kafka_topic()
    values = [f"v{i}".encode() for i in range(10)]
    produce(bootstrap, topic, values)
    _delete_before(bootstrap, topic, 4)
    reader = _reader(bootstrap)
    try:
        raws, acks, gap = _read(reader, topic, 0, 10)
    finally:
        reader.close()
    assert raws == values[4:]
    assert acks[0] == Ack(f"{topic}/0", 4, -1)
    assert gap is None


def test_a_range_that_expired_whole_is_one_gap(kafka_broker, kafka_topic):
    bootstrap = kafka_broker.bootstrap_servers
    topic = kafka_topic()
    produce(bootstrap, topic, [f"v{i}".encode() for i in range(10)])
    _delete_before(bootstrap, topic, 10)
    reader = _reader(bootstrap)
    try:
        raws, _, gap = _read(reader, topic, 2, 8)
    finally:
        reader.close()
    assert raws == []
    assert gap == Ack(f"{topic}/0", 7, 1)
