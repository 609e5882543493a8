"""The Flink runner's own options, declared so that moesif-beam accepts and checks them.

Beam's Python SDK declares only the Flink options the launcher itself uses (``--flink_master``,
``--parallelism``, ...); the rest (checkpointing, state backend, savepoints) are options of
the Java runner, which the portable runner passes through to the job server. moesif-beam
refuses undeclared flags (a typo must not be ignored), so the ones a streaming user needs
are declared here, with their types, and known exactly when ``--runner FlinkRunner`` is
chosen (this module is imported then). The names are the Java options' in snake case; the
job server maps them back (``checkpointing_interval`` -> ``checkpointingInterval``).
"""

from __future__ import annotations

from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

__all__ = ["FlinkJavaOptions"]


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    msg = f"expected true or false, got {value!r}"
    raise ValueError(msg)


class FlinkJavaOptions(PipelineOptions):
    """Checkpointing, state and savepoint options of Beam's Flink runner (2.62)."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument(
            "--checkpointing_interval",
            type=int,
            help="milliseconds between Flink checkpoints (streaming); off when not given",
        )
        parser.add_argument(
            "--checkpointing_mode",
            choices=["EXACTLY_ONCE", "AT_LEAST_ONCE"],
            help="Flink's checkpointing mode",
        )
        parser.add_argument("--checkpoint_timeout_millis", type=int)
        parser.add_argument("--min_pause_between_checkpoints", type=int)
        parser.add_argument(
            "--externalized_checkpoints_enabled",
            type=_flag,
            nargs="?",
            const=True,
            help="keep checkpoints after the job ends, so a new run can resume from one",
        )
        parser.add_argument(
            "--retain_externalized_checkpoints_on_cancellation",
            type=_flag,
            nargs="?",
            const=True,
        )
        parser.add_argument(
            "--state_backend",
            choices=["rocksdb", "filesystem", "hashmap"],
            help="where Flink keeps Beam state (in memory by default)",
        )
        parser.add_argument(
            "--state_backend_storage_path",
            help="URI for the state backend's checkpoints, e.g. file:///var/lib/moesif-beam/ckpt",
        )
        parser.add_argument(
            "--savepoint_path",
            help="restore the job's state from this savepoint or retained checkpoint",
        )
        parser.add_argument(
            "--allow_non_restored_state",
            type=_flag,
            nargs="?",
            const=True,
        )
        parser.add_argument(
            "--execution_mode_for_batch",
            choices=["PIPELINED", "PIPELINED_FORCED", "BATCH", "BATCH_FORCED"],
            help="how a bounded job's stages exchange data; moesif-beam sets BATCH_FORCED",
        )
        parser.add_argument("--max_bundle_size", type=int)
        parser.add_argument("--max_bundle_time_mills", type=int)
        parser.add_argument("--number_of_execution_retries", type=int)
        parser.add_argument("--execution_retry_delay", type=int)
        parser.add_argument("--auto_watermark_interval", type=int)
        parser.add_argument(
            "--finish_bundle_before_checkpointing",
            type=_flag,
            nargs="?",
            const=True,
        )
