"""The ``moesif-beam`` console script's entry point.

Its only job is the first second of a run: importing the command (Beam, gRPC, the
metrics client) takes about a second, and a Ctrl-C in that second would otherwise end
with Python's own KeyboardInterrupt traceback. Here it ends with one line and exit 130,
the same as a Ctrl-C later in the run (:func:`moesif_beam.runners.launch.report_interrupt`).
Nothing has been read or sent at that point. This module imports only the standard
library, so it cannot itself be interrupted part-way through a heavy import.
"""

from __future__ import annotations

import sys

# 128 + SIGINT, as a shell reports a job Ctrl-C stopped; the same value as
# moesif_beam.runners.launch.EXIT_INTERRUPTED, which cannot be imported before the catch.
_EXIT_INTERRUPTED = 130


def main() -> int:
    """Import the command and run it; a Ctrl-C during the import is one line and 130."""
    try:
        from moesif_beam.runners import cli  # noqa: PLC0415 - the import is what is guarded
    except KeyboardInterrupt:
        print("moesif-beam: interrupted while starting; nothing was read or sent.", file=sys.stderr)
        return _EXIT_INTERRUPTED
    return cli.main()
