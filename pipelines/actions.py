"""The actions pipeline: action streams to Moesif's ``/v1/actions/batch``.

Formats: ``moesif`` (Collector API action JSON) and ``segment`` (track calls).
``build(config, options, stored_schema=None) -> beam.Pipeline``; see
:func:`moesif_beam.pipelines.common.build_delivery` for what it wires and guarantees.
"""

from __future__ import annotations

from moesif_beam.pipelines.common import builder

__all__ = ["build"]

build = builder("actions")
