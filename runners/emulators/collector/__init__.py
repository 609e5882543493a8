"""A local emulator of Moesif's Collector API, for tests, benchmarks and offline runs.

Moesif itself cannot be reached from our machines, so the pipeline's HTTP sink is exercised
against this emulator instead. It follows the facts collected in ``docs/design.md``
("Moesif's Collector API, as the emulator follows it") and, where Moesif documents nothing,
the choices in its §7:

* Routes: ``POST /v1/{events,actions,users,companies,subscriptions}`` and their ``/batch``
  variants, ``GET /v1/config`` and ``GET /v1/rules``. Every ``/v1`` route requires a non-empty
  ``X-Moesif-Application-Id`` (401 otherwise); the id is never echoed, printed or logged.
* Bodies: ``Content-Type: application/json``; ``Content-Encoding`` gzip, deflate (zlib-wrapped
  or raw) or identity. Limits: 50,000,000 bytes per request (15,000,000 for
  ``/v1/actions/batch``), compressed or decompressed, and 1,000,000 bytes per event or action;
  over a limit the answer is 413.
* Validation: the required fields and types of §2 of that reference. A batch is all-or-nothing:
  one invalid item rejects the whole request with 400 and ``{"error", "index", "field"}``, and
  nothing from it is stored.
* Metadata of events and actions, Moesif's rules (§5 of that reference and Moesif's "User
  Actions" page), applied after validation:

  - A dot in a key becomes ``_`` at every depth, objects inside arrays included; values are
    untouched. If two keys collide after the change, the later one wins. The converted keys
    are what is type-checked and stored.
  - The first JSON type seen for a key *name* wins, at any depth (``{"a": {"id": 1}}`` and
    ``{"id": "x"}`` name the same key), in one schema shared by events and actions. Types
    are string, number (ints and floats alike), boolean (never a number), object and array;
    null matches any type and establishes none. Only ``metadata`` is checked: not bodies,
    and not the metadata of users, companies or subscriptions.
  - Moesif's docs call such metadata invalid without saying how the API answers; the emulator
    refuses it, so that conflicts surface in tests. Items are checked in order, depth first
    in key order, and each value's type is known to the values after it, in the same item
    or in later items of the same request. The first conflict refuses the whole request with
    400 and ``{"error", "index", "field", "key", "expected_type", "actual_type"}`` (``field``
    is the converted dotted path, e.g. ``metadata.tags.0.id``); it stores nothing and
    teaches no type. A request's new keys enter the schema only when it is accepted, in the
    same transaction as its records, and deciding them is atomic across concurrent requests.
  - The schema persists in ``collector.db`` (table ``metadata_schema``) and is cleared by a
    reset. ``metadata_types="off"`` checks and learns no types but still converts dots.
* Storage: SQLite (``collector.db`` under ``data_dir``, or in memory). Events and actions are
  deduplicated by ``transaction_id`` across batches; users, companies and subscriptions are
  upserts with a recursive merge.
* Faults for retry tests, on ingestion POSTs only: latency, dropped connections and error
  statuses (with ``Retry-After`` for 429/503), deterministic (``latency_first``,
  ``drop_first``, ``fail_first``) or random with a seed. A faulted request stores nothing.
  ``redirect_to`` answers every ``/v1`` request (``GET /v1/config`` too) with a 307 to
  another base URL, for the client's never-follow-a-redirect rule.
* HTTPS with ``tls_cert`` and ``tls_key`` (for the client's certificate checks).
* ``store="count"`` validates, deduplicates and enforces metadata types like SQLite but keeps
  no bodies (its schema lives in memory): for benchmarks. With ``validation="off"`` and
  ``metadata_types="off"`` as well it is the fast count-only mode: a body must still
  authorize, inflate and parse as JSON of the right shape (a list of objects for batches),
  and items are still counted and deduplicated, but fields are not checked.
* Inspection without auth: ``GET /_emulator/stats`` (with ``metadata_schema``,
  ``type_conflicts`` and ``arrival_lag_ms``: how long after its ``request.time`` each
  accepted event or action arrived, which is the produce-to-2xx latency when a producer
  stamps records as it sends them), ``GET /_emulator/records``, ``POST /_emulator/reset``, and
  ``POST /_emulator/schema`` with ``{"key": "type", ...}`` to seed the schema (keys it does
  not know yet are added; it answers with the resulting schema).

Typical use in a test::

    with start_in_thread(CollectorConfig(application_id="app")) as collector:
        post_batches(collector.url)
        assert collector.stats()["records"]["events"] == 10

From the command line: ``moesif-beam collector --port 9500 --data_dir ./collector-data`` or
``python -m moesif_beam.runners.emulators.collector --port 9500 --data_dir ./collector-data``.

The package, by concern: ``config`` (:class:`CollectorConfig`, limits, kinds), ``validation``
(fields and types, pure functions), ``metadata`` (the metadata rules), ``store`` (SQLite or
counts), ``state`` (the emulator independent of HTTP), ``faults`` (the injection schedule,
redirects, TLS), ``body`` (decoding request bodies), ``handler`` (routes and the request
handler), ``server`` (serving in a thread), ``inspection`` (stats, records, ``--inspect``) and
``cli`` (the command line). Its logger is ``moesif_beam.runners.emulators.collector``.
"""

from moesif_beam.runners.emulators.collector.cli import main
from moesif_beam.runners.emulators.collector.config import (
    ACTIONS_BATCH_LIMIT_BYTES,
    BODY_LIMIT_BYTES,
    ITEM_LIMIT_BYTES,
    KINDS,
    CollectorConfig,
)
from moesif_beam.runners.emulators.collector.metadata import METADATA_TYPES, MetadataTypeConflict
from moesif_beam.runners.emulators.collector.server import RunningCollector, start_in_thread
from moesif_beam.runners.emulators.collector.validation import (
    ValidationError,
    parse_iso8601,
    validate_payload,
    validate_record,
)

__all__ = [
    "ACTIONS_BATCH_LIMIT_BYTES",
    "BODY_LIMIT_BYTES",
    "ITEM_LIMIT_BYTES",
    "KINDS",
    "METADATA_TYPES",
    "CollectorConfig",
    "MetadataTypeConflict",
    "RunningCollector",
    "ValidationError",
    "main",
    "parse_iso8601",
    "start_in_thread",
    "validate_payload",
    "validate_record",
]
