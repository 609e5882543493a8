"""Delivery: batching, the Collector API over HTTP (or batch files), retries and transport.

* :mod:`.policy`: what follows one attempt to post a batch (pure functions);
* :mod:`.transport`: the application id as a :class:`Secret`, TLS, redirects, preflight;
* :mod:`.http`: writers that deliver one whole batch over HTTP or to a file;
* :mod:`.sinks`: the batching DoFn and the public sinks :class:`PostToMoesif` and
  :class:`WriteBatchFiles`;
* :mod:`.streaming`: the same delivery in a stream, with acknowledgements.
"""

from moesif_beam.transforms.delivery.http import encode_batch
from moesif_beam.transforms.delivery.policy import (
    Action,
    Decision,
    RetryPolicy,
    classify,
    decide,
    parse_retry_after,
)
from moesif_beam.transforms.delivery.sinks import (
    ACKS,
    BATCH_BYTE_LIMITS,
    MAX_IN_FLIGHT,
    PostToMoesif,
    WriteBatchFiles,
)
from moesif_beam.transforms.delivery.transport import (
    MIN_SECRET_LENGTH,
    Secret,
    batch_url,
    check_ca_bundle,
    delivery_unknown,
    preflight,
    redirect_host,
    tls_failure,
)

__all__ = [
    "ACKS",
    "BATCH_BYTE_LIMITS",
    "MAX_IN_FLIGHT",
    "MIN_SECRET_LENGTH",
    "Action",
    "Decision",
    "PostToMoesif",
    "RetryPolicy",
    "Secret",
    "WriteBatchFiles",
    "batch_url",
    "check_ca_bundle",
    "classify",
    "decide",
    "delivery_unknown",
    "encode_batch",
    "parse_retry_after",
    "preflight",
    "redirect_host",
    "tls_failure",
]
