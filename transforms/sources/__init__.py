"""Sources: files (bounded or followed), Kafka (backfills or streams), offsets and drain."""

from moesif_beam.transforms.sources.files import FollowFiles, ReadLines, match_inputs
from moesif_beam.transforms.sources.kafka import KafkaSourceConfig, ReadKafka, resolve_partitions
from moesif_beam.transforms.sources.offsets import CommitOffsets

__all__ = [
    "CommitOffsets",
    "FollowFiles",
    "KafkaSourceConfig",
    "ReadKafka",
    "ReadLines",
    "match_inputs",
    "resolve_partitions",
]
