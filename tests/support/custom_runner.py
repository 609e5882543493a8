"""A user's own runner with options of its own, as ``--runner a.module.Runner`` names one.

Beam's FnApiRunner, unchanged, plus an options class that exists only once this module is
imported: moesif-beam must accept its flags when (and because) the runner is chosen.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner


class AuditOptions(PipelineOptions):
    """Options only this runner's module declares."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--audit_label", default="", help="a label for the run's audit")


class AuditedRunner(FnApiRunner):
    """Beam's FnApiRunner under another name."""
