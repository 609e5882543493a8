"""Dead letters: every reject, with its reason and original bytes, written as Avro."""

from moesif_beam.transforms.deadletters.letters import REASONS, WriteDeadLetters, dead_letter
from moesif_beam.transforms.deadletters.streaming import WriteDeadLettersInStream

__all__ = ["REASONS", "WriteDeadLetters", "WriteDeadLettersInStream", "dead_letter"]
