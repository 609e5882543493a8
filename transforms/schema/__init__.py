"""Moesif's metadata rules: dots in keys become ``_``, and the first JSON type seen wins.

* :mod:`.keys`: the key rule (pure);
* :mod:`.rule`: signatures and the type rule (pure);
* :mod:`.store`: the persisted schema, shared across runs and pipelines;
* :mod:`.bounded`: the rule enforced in a bounded run;
* :mod:`.streaming`: the rule enforced in a stream, and the store kept up to date.
"""

from moesif_beam.transforms.schema.bounded import (
    EnforceMetadataSchema,
    InProcessSchema,
    SchemaChecked,
    conflict_letter,
)
from moesif_beam.transforms.schema.keys import MAX_DEPTH, sanitize_keys
from moesif_beam.transforms.schema.rule import (
    NO_TIME,
    SCOPES,
    Signature,
    SignatureMemo,
    find_conflict,
    merge_schema,
    signature,
    signature_id,
    type_name,
    types_of,
)
from moesif_beam.transforms.schema.store import load_schema, save_schema, seed_pairs
from moesif_beam.transforms.schema.streaming import (
    EnforceMetadataSchemaInStream,
    PersistSchemaInStream,
)

__all__ = [
    "MAX_DEPTH",
    "NO_TIME",
    "SCOPES",
    "EnforceMetadataSchema",
    "EnforceMetadataSchemaInStream",
    "InProcessSchema",
    "PersistSchemaInStream",
    "SchemaChecked",
    "Signature",
    "SignatureMemo",
    "conflict_letter",
    "find_conflict",
    "load_schema",
    "merge_schema",
    "sanitize_keys",
    "save_schema",
    "seed_pairs",
    "signature",
    "signature_id",
    "type_name",
    "types_of",
]
