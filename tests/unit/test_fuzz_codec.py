"""Property tests of the decoders on hostile input: random bytes, random framing, truncations,
bit flips, unknown schema ids, wrong dimensions, NaN/inf, negative ids and event times,
oversized and null messages.

Decoding must never raise; every message is either decoded or rejected with a reason; valid
messages mixed in come out exactly as encoded, in order; the ad decoder's numpy batch parser
and its fastavro fallback agree on everything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annstream.codec import AdCodec, EngagementCodec
from annstream.events import OP_DELETE, OP_UPSERT, AdBatch, EngagementBatch, Rejection
from annstream.schemas import HEADER_SIZE, LocalSchemaRegistry, frame

DIM = 8
MAX_BYTES = 512
REGISTRY = LocalSchemaRegistry()
AD = AdCodec(REGISTRY, DIM, max_message_bytes=MAX_BYTES)
AD_SLOW = AdCodec(REGISTRY, DIM, max_message_bytes=MAX_BYTES)
AD_SLOW._parse_fast = False
ENG = EngagementCodec(REGISTRY, DIM, max_message_bytes=MAX_BYTES)
AD_WIDE = AdCodec(REGISTRY, DIM + 3)
ENG_WIDE = EngagementCodec(REGISTRY, DIM + 3)
KNOWN_IDS = {AD.schema_id, ENG.schema_id}
FUZZ = settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

messages_st = st.lists(st.one_of(st.none(), st.binary(max_size=80)), max_size=30)


def _ads(seed: int, n: int, dim: int = DIM, deletes: bool = True) -> AdBatch:
    rng = np.random.default_rng(seed)
    share = 0.8 if deletes else 1.0
    ops = np.where(rng.random(n) < share, OP_UPSERT, OP_DELETE).astype("uint8")
    vectors = rng.standard_normal((n, dim)).astype("float32")
    vectors[ops == OP_DELETE] = 0.0
    optional = rng.integers(-(2**40), 2**40, (2, n))
    optional[:, rng.random(n) < 0.5] = -1
    return AdBatch(
        ad_ids=rng.integers(0, 2**62, n),
        ops=ops,
        vectors=vectors,
        event_time_ms=rng.integers(0, 2**45, n),
        advertiser_ids=optional[0],
        campaign_ids=optional[1],
        model_versions=tuple(rng.choice(["", "m1", "modèle-ü"], n).tolist()),
    )


def _engagements(seed: int, n: int, dim: int = DIM) -> EngagementBatch:
    rng = np.random.default_rng(seed)
    has = rng.random(n) < 0.7
    vectors = rng.standard_normal((n, dim)).astype("float32")
    vectors[~has] = 0.0
    return EngagementBatch(
        query_ids=rng.integers(0, 2**62, n),
        item_ids=np.where(rng.random(n) < 0.5, -1, rng.integers(0, 2**40, n)),
        event_types=rng.integers(0, 6, n).astype("uint8"),
        weights=rng.random(n).astype("float32") * 5,
        event_time_ms=rng.integers(0, 2**45, n),
        vectors=vectors,
        has_vector=has,
    )


def _check_partition(n: int, decoded: int, rejected: Sequence[Rejection]) -> None:
    """Every message decoded or rejected (with a reason), none both, none twice."""
    idx = [r.index for r in rejected]
    assert idx == sorted(set(idx)) and all(0 <= i < n for i in idx)
    assert all(isinstance(r.reason, str) and r.reason.strip() for r in rejected)
    assert decoded + len(rejected) == n


def _assert_ads_equal(got: AdBatch, want: AdBatch) -> None:
    for name in ("ad_ids", "ops", "vectors", "event_time_ms", "advertiser_ids", "campaign_ids"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert got.model_versions == (want.model_versions or ("",) * len(want))


def _assert_engagements_equal(got: EngagementBatch, want: EngagementBatch) -> None:
    for name in ("query_ids", "item_ids", "event_types", "weights", "event_time_ms", "vectors"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    np.testing.assert_array_equal(got.has_vector, want.has_vector)


# ---- garbage that can never be a valid event, by construction --------------------------------


@st.composite
def _garbage(draw: st.DrawFn, kind: str) -> bytes | None:
    """One message that must be rejected: `kind` is 'ad' or 'eng'."""
    seed = draw(st.integers(0, 2**32 - 1))
    wide = AD_WIDE.encode(_ads(seed, 1, DIM + 3, deletes=False)) if kind == "ad" else None
    if kind == "eng":
        eng = _engagements(seed, 1, DIM + 3)
        eng.has_vector[:] = True
        wide = ENG_WIDE.encode(eng)
    assert wide is not None
    valid = (AD.encode(_ads(seed, 1)) if kind == "ad" else ENG.encode(_engagements(seed, 1)))[0]
    choice = draw(
        st.sampled_from(["null", "short", "magic", "schema", "trunc", "dim", "big", "id", "time"])
    )
    if choice in ("id", "time"):
        value = -draw(st.integers(1, 2**63))
        one = _ads(seed, 1) if kind == "ad" else _engagements(seed, 1)
        column = "event_time_ms" if choice == "time" else "ad_ids" if kind == "ad" else "query_ids"
        getattr(one, column)[0] = value
        return (AD.encode(one) if isinstance(one, AdBatch) else ENG.encode(one))[0]
    if choice == "null":
        return None
    if choice == "short":
        return draw(st.binary(max_size=HEADER_SIZE))
    if choice == "magic":
        return bytes([draw(st.integers(1, 255))]) + draw(st.binary(min_size=HEADER_SIZE))
    if choice == "schema":
        sid = draw(st.integers(0, 2**31 - 1).filter(lambda i: i not in KNOWN_IDS))
        return frame(sid, draw(st.binary(min_size=1, max_size=60)))
    if choice == "trunc":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if choice == "dim":
        return wide[0]
    return frame(AD.schema_id, draw(st.binary(min_size=MAX_BYTES, max_size=MAX_BYTES + 64)))


def _nan_ad(seed: int) -> bytes:
    ads = _ads(seed, 1, deletes=False)
    ads.vectors[0, seed % DIM] = [np.nan, np.inf, -np.inf][seed % 3]
    return AD.encode(ads)[0]


def _nan_engagement(seed: int) -> bytes:
    eng = _engagements(seed, 1)
    eng.has_vector[:] = True
    eng.vectors[0, seed % DIM] = np.nan
    if seed % 2:
        eng.vectors[0] = 1.0
        eng.weights[0] = [np.nan, -1.0][seed % 4 // 2]
    return ENG.encode(eng)[0]


# ---- properties ------------------------------------------------------------------------------


@FUZZ
@given(messages_st)
def test_random_bytes_never_raise_and_every_message_is_accounted_for(
    messages: list[bytes | None],
) -> None:
    for codec in (AD, AD_SLOW, ENG):
        batch, rejected = codec.decode(messages)
        _check_partition(len(messages), len(batch), rejected)


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(KNOWN_IDS)), st.binary(min_size=1, max_size=120)),
        max_size=30,
    )
)
def test_randomly_framed_payloads_of_known_schemas_never_raise(
    framed: list[tuple[int, bytes]],
) -> None:
    messages: list[bytes | None] = [frame(sid, payload) for sid, payload in framed]
    got, got_rejected = AD.decode(messages)
    want, want_rejected = AD_SLOW.decode(messages)
    _check_partition(len(messages), len(got), got_rejected)
    assert got_rejected == want_rejected
    _assert_ads_equal(got, want)
    batch, rejected = ENG.decode(messages)
    _check_partition(len(messages), len(batch), rejected)


@FUZZ
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 12),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 7)), max_size=8),
    st.lists(st.integers(0, 10_000), max_size=4),
)
def test_mutated_valid_ads_decode_the_same_on_both_paths(
    seed: int, n: int, flips: list[tuple[int, int]], cuts: list[int]
) -> None:
    """Bit flips may leave a message valid; whatever the result, the fast path agrees."""
    messages: list[bytes | None] = list(AD.encode(_ads(seed, n)))
    for at, bit in flips:
        i = at % len(messages)
        m = bytearray(messages[i] or b"")
        m[at % len(m)] ^= 1 << bit
        messages[i] = bytes(m)
    for at in cuts:
        i = at % len(messages)
        m = messages[i] or b""
        messages[i] = m[: at % max(1, len(m))]
    got, got_rejected = AD.decode(messages)
    want, want_rejected = AD_SLOW.decode(messages)
    _check_partition(len(messages), len(got), got_rejected)
    assert got_rejected == want_rejected
    _assert_ads_equal(got, want)
    batch, rejected = ENG.decode(messages)
    _check_partition(len(messages), len(batch), rejected)


@FUZZ
@given(st.data(), st.integers(0, 2**32 - 1), st.integers(0, 10), st.integers(0, 2**32 - 1))
def test_valid_ads_among_garbage_decode_exactly_and_only_garbage_is_rejected(
    data: st.DataObject, seed: int, n_good: int, order_seed: int
) -> None:
    good = _ads(seed, n_good)
    bad = data.draw(st.lists(_garbage("ad"), max_size=10))
    bad += [_nan_ad(s) for s in data.draw(st.lists(st.integers(0, 2**16), max_size=3))]
    messages: list[bytes | None] = list(AD.encode(good)) + bad
    order = np.random.default_rng(order_seed).permutation(len(messages))
    messages = [messages[i] for i in order.tolist()]
    bad_at = sorted(np.flatnonzero(order >= n_good).tolist())
    for codec in (AD, AD_SLOW):
        batch, rejected = codec.decode(messages)
        _check_partition(len(messages), len(batch), rejected)
        assert [r.index for r in rejected] == bad_at
        good_order = order[order < n_good]
        _assert_ads_equal(batch, good.take(good_order))
        for r in rejected:
            m = messages[r.index]
            if m is not None and len(m) > MAX_BYTES:
                assert "max_message_bytes" in r.reason


@FUZZ
@given(st.data(), st.integers(0, 2**32 - 1), st.integers(0, 10), st.integers(0, 2**32 - 1))
def test_valid_engagements_among_garbage_decode_exactly_and_only_garbage_is_rejected(
    data: st.DataObject, seed: int, n_good: int, order_seed: int
) -> None:
    good = _engagements(seed, n_good)
    bad = data.draw(st.lists(_garbage("eng"), max_size=10))
    bad += [_nan_engagement(s) for s in data.draw(st.lists(st.integers(0, 2**16), max_size=3))]
    messages: list[bytes | None] = list(ENG.encode(good)) + bad
    order = np.random.default_rng(order_seed).permutation(len(messages))
    messages = [messages[i] for i in order.tolist()]
    batch, rejected = ENG.decode(messages)
    _check_partition(len(messages), len(batch), rejected)
    assert [r.index for r in rejected] == sorted(np.flatnonzero(order >= n_good).tolist())
    _assert_engagements_equal(batch, good.take(order[order < n_good]))


def test_a_valid_ad_over_the_size_limit_is_rejected_with_the_limit_in_the_reason() -> None:
    ads = _ads(1, 2)
    ads = AdBatch(
        ads.ad_ids,
        np.full(2, OP_UPSERT, "uint8"),
        np.ones((2, DIM), "float32"),
        ads.event_time_ms,
        ads.advertiser_ids,
        ads.campaign_ids,
        ("x" * MAX_BYTES, "m1"),
    )
    messages: list[bytes | None] = list(AD.encode(ads))
    for codec in (AD, AD_SLOW):
        batch, rejected = codec.decode(messages)
        assert batch.ad_ids.tolist() == [ads.ad_ids[1]]
        assert len(rejected) == 1 and rejected[0].index == 0
        assert f"over kafka.max_message_bytes ({MAX_BYTES})" in rejected[0].reason
