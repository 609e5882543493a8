"""Dead letters: every reject, with its reason and original bytes, written as Avro."""

from moesif_beam.transforms.deadletters.handler import (
    DeadLetters,
    UnconsumedDeadLetters,
    verify_dead_letters,
)
from moesif_beam.transforms.deadletters.letters import (
    DEAD_LETTER,
    REASONS,
    WriteDeadLetters,
    dead_letter,
)
from moesif_beam.transforms.deadletters.streaming import WriteDeadLettersInStream

__all__ = [
    "DEAD_LETTER",
    "REASONS",
    "DeadLetters",
    "UnconsumedDeadLetters",
    "WriteDeadLetters",
    "WriteDeadLettersInStream",
    "dead_letter",
    "verify_dead_letters",
]
