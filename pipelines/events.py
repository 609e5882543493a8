"""The events pipeline: API-gateway logs to Moesif's ``/v1/events/batch`` (format: wso2).

``build(config, options, stored_schema=None) -> beam.Pipeline``; see
:func:`moesif_beam.pipelines.common.build_delivery` for what it wires and guarantees.
"""

from __future__ import annotations

from moesif_beam.pipelines.common import builder

__all__ = ["build"]

build = builder("events")
