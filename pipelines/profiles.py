"""The profiles pipeline: Moesif users and companies from the traffic, and Segment calls.

``files or Kafka -> parse + normalize -> dedup by transaction_id -> per-user and
per-company rollups -> /v1/users/batch, /v1/companies/batch (or batch files) and, with a
write key, Segment identify/group calls``. With ``--format segment`` the input is Segment
identify and group calls, which become user and company upserts directly.

Counting: ``sent`` counts the input records the rollups took in, each once (however many
profiles it feeds), so a completed bounded run satisfies ``read == sent + duplicates +
dead_letters`` as the other pipelines do. What was delivered is counted per output
(``users_sent``, ``companies_sent``, ``segment_sent``), and failed deliveries in
``upsert_dead_letters``; see the README (Profiles).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from moesif_beam.pipelines.common import read_and_normalize
from moesif_beam.pipelines.config import PipelineConfig
from moesif_beam.transforms.common.timefmt import parse_time_ms
from moesif_beam.transforms.deadletters.handler import DeadLetters, verify_dead_letters
from moesif_beam.transforms.deadletters.letters import WriteDeadLetters
from moesif_beam.transforms.deadletters.streaming import WriteDeadLettersInStream
from moesif_beam.transforms.dedup.bounded import DedupByTransactionId
from moesif_beam.transforms.dedup.streaming import DedupInStream
from moesif_beam.transforms.profiles.compute import ComputeProfiles, Touches
from moesif_beam.transforms.profiles.delivery import DeliverProfiles, WriteUpsertDeadLetters
from moesif_beam.transforms.profiles.stream import SegmentCallsInStream, UpdateProfilesInStream
from moesif_beam.transforms.profiles.traits import (
    Profile,
    company_upsert,
    group_call,
    identify_call,
    user_upsert,
)
from moesif_beam.transforms.profiles.upserts import MergeUpserts, SplitUpserts
from moesif_beam.transforms.sources.offsets import CommitOffsets

__all__ = ["build"]


def build(
    config: PipelineConfig, options: PipelineOptions, stored_schema: Mapping[str, str] | None = None
) -> beam.Pipeline:
    """Wire the profiles pipeline for ``config``; the caller runs it.

    ``stored_schema`` is accepted for the launcher's sake and unused: profiles send no
    event metadata, and their own metadata key is written by this pipeline alone.
    """
    del stored_schema
    if config.pipeline != "profiles":
        msg = f"the profiles pipeline got a {config.pipeline!r} config"
        raise ValueError(msg)
    pipeline = beam.Pipeline(options=options)
    rejects = DeadLetters()
    normalized, read = read_and_normalize(pipeline, config, rejects)
    acks: list[beam.PCollection] = []
    if config.streaming:
        unique_out = normalized.records | "Dedup" >> DedupInStream(config.dedup_ttl)
        unique = unique_out.records
        acks.append(unique_out.acks)
    else:
        unique = normalized.records | "Dedup" >> DedupByTransactionId(
            config.spill_dir if config.dedup_spill else None
        )
    letters = (
        _segment_input(config, unique, acks)
        if config.input_format == "segment"
        else _traffic(config, unique, acks)
    )
    _ = letters | "UpsertDeadLetters" >> WriteUpsertDeadLetters(
        config.dead_letter_dir, config.run_id
    )
    if config.streaming:
        acks.append(
            rejects.write(
                "DeadLetters",
                WriteDeadLettersInStream(
                    config.dead_letter_dir, config.pipeline, config.run_id, config.input_format
                ),
            )
        )
        if config.kafka is not None:
            done = tuple(acks) | "Acks" >> beam.Flatten()
            _ = (done, read.partitions) | "CommitOffsets" >> CommitOffsets(config.kafka)
    else:
        rejects.write(
            "DeadLetters",
            WriteDeadLetters(
                config.dead_letter_dir, config.pipeline, config.run_id, config.input_format
            ),
        )
    verify_dead_letters(pipeline)
    return pipeline


def _traffic(
    config: PipelineConfig, unique: beam.PCollection, acks: list[beam.PCollection]
) -> tuple[beam.PCollection, ...]:
    """Rollups of API calls and actions to profiles, and their deliveries' dead letters."""
    if config.streaming:
        touches = unique | "Touches" >> Touches(acks=True)
        acks.append(touches.acks)
        profiles = touches.touches | "Profiles" >> UpdateProfilesInStream(config.profile_interval)
    else:
        profiles = unique | "Profiles" >> ComputeProfiles(config.as_of_ms)
    users = profiles | "Users" >> beam.Filter(lambda p: p.kind == "users")
    companies = profiles | "Companies" >> beam.Filter(lambda p: p.kind == "companies")
    letters = [
        users
        | "UserUpserts" >> beam.Map(lambda p: (p.id, user_upsert(p), p.as_of_ms))
        | "ToUsers" >> _deliver(config, "users"),
        companies
        | "CompanyUpserts" >> beam.Map(lambda p: (p.id, company_upsert(p), p.as_of_ms))
        | "ToCompanies" >> _deliver(config, "companies"),
    ]
    if config.segment_write_key is not None:
        if config.streaming:
            calls = profiles | "SegmentCalls" >> SegmentCallsInStream()
        else:
            calls = (
                {
                    "users": users | "ByCompany" >> beam.Map(_by_company),
                    "companies": companies | "ById" >> beam.Map(lambda p: (p.id, p)),
                }
                | "Join" >> beam.CoGroupByKey()
                | "Calls" >> beam.FlatMap(_calls)
            )
        keyed = calls | "CallItems" >> beam.Map(lambda c: (c["messageId"], c, _as_of(c)))
        letters.append(keyed | "ToSegment" >> _deliver(config, "segment"))
    return tuple(letters)


def _by_company(profile: Profile) -> tuple[str, Profile]:
    company = profile.rollup.company_id
    # Users without a company share the key "": they join no company profile.
    return ("" if company is None else company[2]), profile


def _calls(item: tuple[str, dict[str, Iterable[Profile]]]) -> list[dict[str, Any]]:
    """One identify per user (with its company's traits), one group per company."""
    key, joined = item
    companies = sorted(joined["companies"], key=lambda p: p.as_of_ms)
    company = companies[-1] if key and companies else None
    calls = [group_call(c) for c in companies]
    calls += [identify_call(user, company) for user in joined["users"]]
    return calls


def _as_of(call: dict[str, Any]) -> int:
    return parse_time_ms(call["timestamp"])


def _segment_input(
    config: PipelineConfig, unique: beam.PCollection, acks: list[beam.PCollection]
) -> tuple[beam.PCollection, ...]:
    """``--format segment``: each user's and company's upserts, merged, to Moesif."""
    split = unique | "Upserts" >> SplitUpserts(acks=config.streaming)
    acks.append(split.acks)
    if config.streaming:
        merged = split.upserts | "AsTheyCome" >> beam.MapTuple(lambda key, s: (key[0], s[2], s[0]))
    else:
        merged = (
            split.upserts
            | "Merge" >> MergeUpserts()
            | "Stamp" >> beam.MapTuple(lambda kind, upsert: (kind, upsert, 0))
        )
    letters = []
    for kind, id_field in (("users", "user_id"), ("companies", "company_id")):
        letters.append(
            merged
            | f"Only{kind.title()}" >> beam.Filter(lambda item, k=kind: item[0] == k)
            | f"{kind.title()}Items"
            >> beam.MapTuple(lambda _, upsert, t, f=id_field: (upsert[f], upsert, t))
            | f"To{kind.title()}" >> _deliver(config, kind)
        )
    return tuple(letters)


def _deliver(config: PipelineConfig, output: str) -> DeliverProfiles:
    if output == "segment":
        secret, base_url = config.segment_write_key, config.segment_base_url
    else:
        secret, base_url = config.application_id, config.base_url
    return DeliverProfiles(
        output,
        base_url=base_url,
        secret=secret,
        directory=f"{config.output_dir.rstrip('/')}/{output}",
        max_events=config.batch_max_events,
        max_bytes=config.batch_max_bytes,
        gzip_level=config.gzip_level,
        policy=config.retry,
        timeout=config.http_timeout,
        max_in_flight=config.max_in_flight,
        ca_bundle=config.ca_bundle,
    )
