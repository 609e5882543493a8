"""A spilled record's input line, read back from the input file when it is needed.

The bounded dedup spill leaves out the input line of a record whose line can be found
again (``Record.at``: a plain local file, the line's offset in it). Halving what is
spilled saves the copy into the spill and out of it for every record, and only the rare
record that becomes a dead letter after the dedup (a type conflict, a batch the collector
refused, retries given up) needs its line: it is read here, once.
"""

from __future__ import annotations

from moesif_beam.transforms.records import Record
from moesif_beam.transforms.sources.files import MAX_LINE_BYTES

__all__ = ["original_bytes"]


def original_bytes(record: Record) -> tuple[bytes, str]:
    """The input bytes ``record`` came from, and a note for its dead letter's detail.

    The note is empty when the bytes are the record's own (carried, or read back). When
    the line cannot be read again (the input was removed or cut short during the run),
    the bytes are the record as normalized instead, and the note says so: the dead letter
    is still written, with what the run has. A file rewritten in place during the run can
    give another line: the input must stay as it is until the run ends.
    """
    if record.raw or record.at < 0:
        return record.raw, ""
    path = record.source.rpartition(":")[0]
    try:
        with open(path, "rb") as handle:
            handle.seek(record.at)
            line = handle.readline(MAX_LINE_BYTES + 1)
    except OSError as exc:
        return record.body, _fallback(f"{type(exc).__name__}: {exc}")
    line = line.removesuffix(b"\n")
    # The reader gave this offset only to a line with no "\r" that was not blank.
    if not line.strip() or b"\r" in line:
        return record.body, _fallback(f"byte {record.at:,} of {path} is not that line now")
    return line, ""


def _fallback(why: str) -> str:
    return (
        f" (the input line could not be read again, {why}; the payload is the record as normalized)"
    )
