"""moesif-beam runners: the command and its launch, engines/ and emulators/."""

import logging


class _QuietBeamImports(logging.Filter):
    """Drop the one warning Beam logs on import when the GCP extras are absent.

    It is about BigQuery client libraries this project never uses and would otherwise open
    every command's output.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found")


logging.getLogger().addFilter(_QuietBeamImports())
