"""The events pipeline: API-gateway logs to Moesif's ``/v1/events/batch``."""

from __future__ import annotations

from collections.abc import Mapping

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.common import build_delivery
from pipelines.config import PipelineConfig

__all__ = ["build"]


def build(
    config: PipelineConfig,
    options: PipelineOptions,
    stored_schema: Mapping[str, str] | None = None,
) -> beam.Pipeline:
    """Wire the events pipeline (formats: ``wso2``); see :func:`build_delivery`."""
    if config.pipeline != "events":
        msg = f"the events pipeline needs an events config, got {config.pipeline!r}"
        raise ValueError(msg)
    return build_delivery(config, options, stored_schema or {})
