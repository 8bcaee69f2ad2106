from __future__ import annotations

import io
import json
from pathlib import Path

import fastavro
import numpy as np
import pytest

from annstream.codec import DEFAULT_MAX_MESSAGE_BYTES, AdCodec, EngagementCodec
from annstream.config import KafkaConfig
from annstream.errors import InvalidEventError, SchemaError
from annstream.events import OP_DELETE, OP_UPSERT, AdBatch, EngagementBatch
from annstream.schemas import LocalSchemaRegistry, frame, load_schema, schema_dir, unframe

DIM = 8


@pytest.fixture
def registry() -> LocalSchemaRegistry:
    return LocalSchemaRegistry()


def _ads(n: int = 5, seed: int = 0) -> AdBatch:
    rng = np.random.default_rng(seed)
    return AdBatch.upserts(
        np.arange(n) + 100,
        rng.standard_normal((n, DIM)),
        event_time_ms=1_700_000_000_000 + np.arange(n),
        campaign_ids=np.arange(n) % 3,
        model_version="m1",
    )


def _raw_ad(**overrides: object) -> dict[str, object]:
    record: dict[str, object] = {
        "ad_id": 7,
        "op": "UPSERT",
        "embedding": np.ones(DIM, "<f4").tobytes(),
        "dim": DIM,
        "model_version": "",
        "event_time": 1,
        "advertiser_id": None,
        "campaign_id": None,
    }
    record.update(overrides)
    return record


def _encode_raw(schema: object, schema_id: int, record: dict[str, object]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return frame(schema_id, buf.getvalue())


def test_codec_ad_round_trip_keeps_every_column(registry: LocalSchemaRegistry) -> None:
    codec = AdCodec(registry, DIM)
    ads = _ads()
    mixed = AdBatch(
        ad_ids=np.concatenate([ads.ad_ids, [5]]),
        ops=np.concatenate([ads.ops, np.array([OP_DELETE], "uint8")]),
        vectors=np.vstack([ads.vectors, np.zeros((1, DIM), "float32")]),
        event_time_ms=np.concatenate([ads.event_time_ms, [9]]),
        advertiser_ids=np.concatenate([ads.advertiser_ids, [-1]]),
        campaign_ids=np.concatenate([ads.campaign_ids, [-1]]),
        model_versions=(*ads.model_versions, ""),
    )
    decoded, rejected = codec.decode(codec.encode(mixed))
    assert rejected == []
    for name in ("ad_ids", "ops", "vectors", "event_time_ms", "advertiser_ids", "campaign_ids"):
        np.testing.assert_array_equal(getattr(decoded, name), getattr(mixed, name))
    assert decoded.model_versions == mixed.model_versions
    assert decoded.ops[-1] == OP_DELETE and decoded.ops[0] == OP_UPSERT


def test_codec_engagement_round_trip(registry: LocalSchemaRegistry) -> None:
    codec = EngagementCodec(registry, DIM)
    rng = np.random.default_rng(1)
    has = np.array([True, False, True])
    vectors = rng.standard_normal((3, DIM)).astype("float32") * has[:, None]
    batch = EngagementBatch(
        query_ids=np.array([1, 2, 3], "int64"),
        item_ids=np.array([-1, 10, 11], "int64"),
        event_types=np.array([0, 2, 4], "uint8"),
        weights=np.array([1.0, 0.5, 2.0], "float32"),
        event_time_ms=np.array([10, 20, 30], "int64"),
        vectors=vectors.astype("float32"),
        has_vector=has,
    )
    decoded, rejected = codec.decode(codec.encode(batch))
    assert rejected == []
    for name in ("query_ids", "item_ids", "event_types", "weights", "vectors", "has_vector"):
        np.testing.assert_array_equal(getattr(decoded, name), getattr(batch, name))


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (_raw_ad(embedding=np.ones(DIM + 1, "<f4").tobytes(), dim=DIM + 1), "wrong dimension"),
        (_raw_ad(dim=DIM + 2), "wrong dimension: embedding has 8 floats (dim field 10)"),
        (_raw_ad(embedding=b"\x00" * (DIM * 4 - 1)), "not a whole number of float32"),
        (_raw_ad(embedding=np.full(DIM, np.nan, "<f4").tobytes()), "NaN or inf"),
        (_raw_ad(embedding=np.full(DIM, np.inf, "<f4").tobytes()), "NaN or inf"),
        (_raw_ad(embedding=np.zeros(DIM, "<f4").tobytes()), "zero embedding"),
        (_raw_ad(embedding=None, dim=0), "UPSERT without an embedding"),
    ],
)
def test_codec_rejects_bad_ads_with_reason(
    registry: LocalSchemaRegistry, record: dict[str, object], reason: str
) -> None:
    codec = AdCodec(registry, DIM)
    good = codec.encode(_ads(2))
    bad = _encode_raw(load_schema("ad_event.avsc"), 1, record)
    decoded, rejected = codec.decode([good[0], bad, good[1]])
    assert [r.index for r in rejected] == [1]
    assert reason in rejected[0].reason
    np.testing.assert_array_equal(decoded.ad_ids, [100, 101])


def test_codec_zero_vector_is_fine_under_l2(registry: LocalSchemaRegistry) -> None:
    codec = AdCodec(registry, DIM, metric="l2")
    bad = _encode_raw(load_schema("ad_event.avsc"), 1, _raw_ad(embedding=bytes(DIM * 4)))
    decoded, rejected = codec.decode([bad])
    assert rejected == [] and len(decoded) == 1


def test_codec_rejects_framing_errors(registry: LocalSchemaRegistry) -> None:
    codec = AdCodec(registry, DIM)
    msg = codec.encode(_ads(1))[0]
    cases = {
        "truncated message": msg[:4],
        "truncated or corrupt Avro payload": msg[:-5],
        "bad magic byte 1": b"\x01" + msg[1:],
        "unknown schema id 99": frame(99, msg[5:]),
        "trailing bytes": msg + b"\x00\x00",
        "empty message": None,
        "expected annstream.AdEvent": frame(2, msg[5:]),
        "unknown operation": frame(1, b"\x02\x0c"),
    }
    _, rejected = codec.decode(list(cases.values()))
    assert len(rejected) == len(cases)
    for r, expected in zip(rejected, cases, strict=True):
        assert expected in r.reason, (expected, r.reason)


def test_codec_unknown_operation_symbol_from_newer_writer(
    tmp_path: Path, registry: LocalSchemaRegistry
) -> None:
    schema = json.loads((schema_dir() / "ad_event.avsc").read_text())
    schema["fields"][1]["type"]["symbols"].append("ARCHIVE")
    reg = _registry_with(tmp_path, schema)
    msg = _encode_raw(schema, 10, _raw_ad(op="ARCHIVE"))
    _, rejected = AdCodec(reg, DIM).decode([msg])
    assert "ARCHIVE" in rejected[0].reason


def _registry_with(tmp_path: Path, newer: dict[str, object]) -> LocalSchemaRegistry:
    (tmp_path / "ad_event_v2.avsc").write_text(json.dumps(newer))
    doc = json.loads((schema_dir() / "registry.json").read_text())
    for row in doc["schemas"]:
        row["file"] = str(schema_dir() / row["file"])
    doc["schemas"].append(
        {"id": 10, "subject": "annstream.ads-value", "version": 2, "file": "ad_event_v2.avsc"}
    )
    (tmp_path / "registry.json").write_text(json.dumps(doc))
    return LocalSchemaRegistry(tmp_path / "registry.json")


def test_codec_new_optional_field_does_not_break_older_consumer(tmp_path: Path) -> None:
    schema = json.loads((schema_dir() / "ad_event.avsc").read_text())
    schema["fields"].append({"name": "creative_type", "type": ["null", "string"], "default": None})
    newer = _registry_with(tmp_path, schema)
    writer = AdCodec(newer, DIM)
    assert writer.schema_id == 10
    messages = writer.encode(_ads(3))
    assert all(unframe(m)[0] == 10 for m in messages)
    older = AdCodec(LocalSchemaRegistry(tmp_path / "registry.json"), DIM)
    older_v1 = AdCodec(LocalSchemaRegistry(), DIM)
    decoded, rejected = older.decode(messages)
    assert rejected == [] and len(decoded) == 3
    # a reader that does not know id 10 at all dead-letters, naming the id
    _, rejected = older_v1.decode(messages[:1])
    assert "unknown schema id 10" in rejected[0].reason


def test_registry_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="cannot read schema registry file"):
        LocalSchemaRegistry(tmp_path / "missing.json")
    with pytest.raises(SchemaError, match="subject 'nope'"):
        LocalSchemaRegistry().id_for("nope")
    with pytest.raises(InvalidEventError, match="unknown schema id 77"):
        LocalSchemaRegistry().schema(77)


def test_batches_concat_in_order() -> None:
    a, b = _ads(3, seed=1), _ads(2, seed=2)
    both = AdBatch.concat([a, b], DIM)
    np.testing.assert_array_equal(both.vectors, np.vstack([a.vectors, b.vectors]))
    assert both.model_versions == a.model_versions + b.model_versions
    assert len(AdBatch.concat([], DIM)) == 0 and AdBatch.concat([], DIM).dim == DIM
    assert len(EngagementBatch.concat([], DIM)) == 0


# ---- ids and event times (issue 11 items 5 and 11) -------------------------------------------

NOW_MS = 1_800_000_000_000
SKEW_S = 600.0


def _ad_codecs(registry: LocalSchemaRegistry) -> list[AdCodec]:
    """The numpy batch parser and the fastavro path: both must refuse the same events."""
    fast, slow = AdCodec(registry, DIM), AdCodec(registry, DIM)
    slow._parse_fast = False
    assert fast._parse_fast
    return [fast, slow]


def _engagements(query_ids: list[int], event_times: list[int]) -> EngagementBatch:
    n = len(query_ids)
    return EngagementBatch(
        query_ids=np.array(query_ids, "int64"),
        item_ids=np.full(n, -1, "int64"),
        event_types=np.zeros(n, "uint8"),
        weights=np.ones(n, "float32"),
        event_time_ms=np.array(event_times, "int64"),
        vectors=np.zeros((n, DIM), "float32"),
        has_vector=np.zeros(n, bool),
    )


def test_negative_ad_ids_are_refused_on_both_parse_paths(registry: LocalSchemaRegistry) -> None:
    ids = np.array([5, -1, 0, -(2**63), 2**63 - 1, -7])
    ups = AdBatch.upserts(ids, np.ones((len(ids), DIM)), NOW_MS)
    dels = AdBatch.deletes(np.array([-1, 9]), DIM, NOW_MS)
    for codec in _ad_codecs(registry):
        decoded, rejected = codec.decode(codec.encode(ups) + codec.encode(dels))
        assert decoded.ad_ids.tolist() == [5, 0, 2**63 - 1, 9]
        assert [r.index for r in rejected] == [1, 3, 5, 6]
        assert rejected[0].reason.startswith("negative ad id -1: ad ids must be 0 or more")
        assert f"negative ad id {-(2**63)}" in rejected[1].reason
        assert "-1 pads the stored neighbour lists" in rejected[3].reason


def test_negative_query_ids_are_refused(registry: LocalSchemaRegistry) -> None:
    codec = EngagementCodec(registry, DIM)
    decoded, rejected = codec.decode(codec.encode(_engagements([1, -1, 0, -99], [NOW_MS] * 4)))
    assert decoded.query_ids.tolist() == [1, 0]
    assert [(r.index, r.reason.split(":")[0]) for r in rejected] == [
        (1, "negative query id -1"),
        (3, "negative query id -99"),
    ]


@pytest.mark.parametrize(
    ("event_time", "refused"),
    [
        (NOW_MS, None),
        (0, None),
        (NOW_MS - 10 * 365 * 86_400_000, None),
        (NOW_MS + int(SKEW_S * 1000), None),
        (NOW_MS + int(SKEW_S * 1000) + 1, "ahead of the consumer's clock"),
        (NOW_MS + 100 * 365 * 86_400_000, "ahead of the consumer's clock"),
        (NOW_MS * 1000, "microseconds or nanoseconds"),
        (NOW_MS * 1_000_000, "microseconds or nanoseconds"),
        (-1, "negative event time -1 ms"),
        (-(2**63), "negative event time"),
    ],
)
def test_event_times_far_ahead_of_the_consumer_clock_or_negative_are_refused(
    registry: LocalSchemaRegistry, event_time: int, refused: str | None
) -> None:
    ads = AdBatch.upserts(np.array([1, 2, 3]), np.ones((3, DIM)), NOW_MS)
    ads.event_time_ms[1] = event_time
    eng = _engagements([1, 2, 3], [NOW_MS, event_time, NOW_MS])
    eng_codec = EngagementCodec(registry, DIM)
    results = [
        c.decode(c.encode(ads), now_ms=NOW_MS, max_skew_s=SKEW_S) for c in _ad_codecs(registry)
    ]
    results.append(eng_codec.decode(eng_codec.encode(eng), now_ms=NOW_MS, max_skew_s=SKEW_S))
    for batch, rejected in results:
        if refused is None:
            assert rejected == [] and len(batch) == 3
            continue
        assert len(batch) == 2 and [r.index for r in rejected] == [1]
        assert refused in rejected[0].reason
        if event_time > 0:
            assert f"kafka.max_event_skew_s ({SKEW_S:g} s)" in rejected[0].reason
            assert str(event_time) in rejected[0].reason


def test_without_the_consumer_clock_only_negative_event_times_are_refused(
    registry: LocalSchemaRegistry,
) -> None:
    ads = AdBatch.upserts(np.array([1, 2]), np.ones((2, DIM)), NOW_MS * 1000)
    ads.event_time_ms[1] = -5
    for codec in _ad_codecs(registry):
        decoded, rejected = codec.decode(codec.encode(ads))
        assert decoded.ad_ids.tolist() == [1] and [r.index for r in rejected] == [1]


def test_the_default_message_limit_is_librdkafkas_not_a_mebibyte() -> None:
    assert DEFAULT_MAX_MESSAGE_BYTES == KafkaConfig().max_message_bytes == 1_000_000
    assert KafkaConfig().max_event_skew_s == 600.0
