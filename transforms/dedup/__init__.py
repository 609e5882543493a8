"""Deduplication by transaction id: exact in bounded runs, within a TTL in streams."""

from moesif_beam.transforms.dedup.bounded import DedupByTransactionId
from moesif_beam.transforms.dedup.streaming import DedupAndCheckInProcess, DedupInStream

__all__ = ["DedupAndCheckInProcess", "DedupByTransactionId", "DedupInStream"]
