"""The actions pipeline: action streams to Moesif's ``/v1/actions/batch``."""

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
    """Wire the actions pipeline (formats: ``moesif``, ``segment``); see :func:`build_delivery`."""
    if config.pipeline != "actions":
        msg = f"the actions pipeline needs an actions config, got {config.pipeline!r}"
        raise ValueError(msg)
    return build_delivery(config, options, stored_schema or {})
