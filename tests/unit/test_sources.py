from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from annstream.errors import ConfigError
from annstream.events import OP_DELETE, AdBatch
from producers.publish import TokenBucket, id_keys
from producers.replay import _Pacer
from producers.sources import (
    MIXTURE_VERSION,
    SourceError,
    avro_file_kind,
    clustered_vectors,
    glove_vectors,
    read_ads,
    read_engagements,
    synthetic_ads,
    synthetic_engagements,
    write_avro_file,
    zipf_probabilities,
)

DIM = 8
T0 = 1_700_000_000_000


def _ads(n: int = 7, seed: int = 0) -> AdBatch:
    rng = np.random.default_rng(seed)
    return AdBatch.upserts(
        np.arange(n) + 10,
        rng.standard_normal((n, DIM)),
        T0 + np.arange(n),
        campaign_ids=np.arange(n) % 2,
        model_version="m1",
    )


def _concat(batches: list[AdBatch]) -> AdBatch:
    return AdBatch(
        ad_ids=np.concatenate([b.ad_ids for b in batches]),
        ops=np.concatenate([b.ops for b in batches]),
        vectors=np.concatenate([b.vectors for b in batches]),
        event_time_ms=np.concatenate([b.event_time_ms for b in batches]),
        advertiser_ids=np.concatenate([b.advertiser_ids for b in batches]),
        campaign_ids=np.concatenate([b.campaign_ids for b in batches]),
        model_versions=sum((b.model_versions or ("",) * len(b) for b in batches), ()),
    )


def test_sources_npy_rows_become_ads_with_ids_from_id_start(tmp_path: Path) -> None:
    vectors = np.random.default_rng(1).standard_normal((5, DIM)).astype("float32")
    np.save(tmp_path / "v.npy", vectors)
    batches = list(read_ads(tmp_path / "v.npy", DIM, batch_size=2, id_start=100, event_time_ms=T0))
    assert [len(b) for b in batches] == [2, 2, 1]
    got = _concat(batches)
    np.testing.assert_array_equal(got.ad_ids, np.arange(100, 105))
    np.testing.assert_array_equal(got.vectors, vectors)
    assert (got.event_time_ms == T0).all()


def test_sources_npz_keeps_ids_times_and_ops(tmp_path: Path) -> None:
    ads = _ads()
    ops = np.zeros(len(ads), "uint8")
    ops[3] = OP_DELETE
    np.savez(
        tmp_path / "a.npz",
        ad_ids=ads.ad_ids,
        vectors=ads.vectors,
        event_time_ms=ads.event_time_ms,
        campaign_ids=ads.campaign_ids,
        ops=ops,
    )
    got = _concat(list(read_ads(tmp_path / "a.npz", DIM)))
    np.testing.assert_array_equal(got.ad_ids, ads.ad_ids)
    np.testing.assert_array_equal(got.event_time_ms, ads.event_time_ms)
    np.testing.assert_array_equal(got.campaign_ids, ads.campaign_ids)
    np.testing.assert_array_equal(got.ops, ops)


def test_sources_avro_file_round_trip(tmp_path: Path) -> None:
    ads = _concat([_ads(7), AdBatch.deletes(np.array([10]), DIM, T0 + 99)])
    path = tmp_path / "ads.avro"
    assert write_avro_file(path, [ads.take(np.arange(4)), ads.take(np.arange(4, 8))]) == 8
    assert avro_file_kind(path) == "ads"
    got = _concat(list(read_ads(path, DIM, batch_size=3)))
    for name in ("ad_ids", "ops", "vectors", "event_time_ms", "advertiser_ids", "campaign_ids"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ads, name), err_msg=name)
    assert got.model_versions == ("m1",) * 7 + ("",)


def test_sources_engagement_avro_round_trip(tmp_path: Path) -> None:
    events = next(synthetic_engagements(50, queries=20, dim=DIM, ads=5, seed=3))
    path = tmp_path / "eng.avro"
    write_avro_file(path, [events])
    assert avro_file_kind(path) == "engagements"
    (got,) = list(read_engagements(path))
    for name in ("query_ids", "item_ids", "event_types", "weights", "event_time_ms", "vectors"):
        np.testing.assert_array_equal(getattr(got, name), getattr(events, name), err_msg=name)
    assert got.has_vector.all()


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("missing.npy", None, "file not found"),
        ("ads.csv", "text", "unknown file extension '.csv'"),
        ("wide.npy", "wide", "dimension 9, the index expects 8"),
        ("bad.npz", "mismatch", "ids and vectors must have the same length"),
        ("noids.npz", "noids", "no 'ad_ids'"),
    ],
)
def test_sources_bad_inputs_are_rejected_with_a_reason(
    tmp_path: Path, name: str, make: str | None, message: str
) -> None:
    path = tmp_path / name
    if make == "text":
        path.write_text("id,vector\n")
    elif make == "wide":
        np.save(path, np.ones((3, DIM + 1), "float32"))
    elif make == "mismatch":
        np.savez(path, ad_ids=np.arange(4), vectors=np.ones((3, DIM), "float32"))
    elif make == "noids":
        np.savez(path, vectors=np.ones((3, DIM), "float32"))
    with pytest.raises(SourceError, match=message):
        read_ads(path, DIM)


def test_sources_avro_wrong_dimension_and_wrong_kind(tmp_path: Path) -> None:
    path = tmp_path / "ads.avro"
    write_avro_file(path, [_ads(3)])
    with pytest.raises(SourceError, match=r"record 0 has an embedding of 8 floats, expected dim"):
        list(read_ads(path, DIM + 4))
    with pytest.raises(SourceError, match="holds ads, not engagements"):
        read_engagements(path)


def test_sources_parquet_needs_pyarrow_or_reads(tmp_path: Path) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "a.parquet").write_bytes(b"PAR1")
        with pytest.raises(ConfigError, match="pip install pyarrow"):
            read_ads(tmp_path / "a.parquet", DIM)
        return
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    ads = _ads(4)
    table = pa.table(
        {
            "ad_id": ads.ad_ids,
            "embedding": [list(map(float, v)) for v in ads.vectors],
            "event_time": ads.event_time_ms,
        }
    )
    pq.write_table(table, tmp_path / "a.parquet")
    got = _concat(list(read_ads(tmp_path / "a.parquet", DIM)))
    np.testing.assert_array_equal(got.ad_ids, ads.ad_ids)
    np.testing.assert_allclose(got.vectors, ads.vectors)
    np.testing.assert_array_equal(got.event_time_ms, ads.event_time_ms)


def test_sources_synthetic_engagements_follow_zipf_and_are_seeded() -> None:
    a = next(synthetic_engagements(20_000, queries=1_000, dim=DIM, seed=7, batch_size=20_000))
    b = next(synthetic_engagements(20_000, queries=1_000, dim=DIM, seed=7, batch_size=20_000))
    np.testing.assert_array_equal(a.query_ids, b.query_ids)
    _, counts = np.unique(a.query_ids, return_counts=True)
    counts.sort()
    top, median = counts[-1], np.median(counts)
    p = zipf_probabilities(1_000, 1.1)
    assert top > 0.5 * p[0] * 20_000
    assert top > 20 * median
    # every event of one query carries that query's vector
    first = a.query_ids == a.query_ids[0]
    assert (a.vectors[first] == a.vectors[0]).all()


def test_sources_synthetic_glove_ads_and_queries_use_disjoint_rows() -> None:
    pool = glove_vectors()
    assert pool.shape == (400_000, 50)
    ads = next(synthetic_ads(200, seed=1, queries=300))
    events = next(synthetic_engagements(500, seed=1, queries=300))
    assert ads.vectors.flags.c_contiguous and ads.vectors.dtype == np.float32
    assert ads.dim == 50 and events.dim == 50
    ad_rows = {v.tobytes() for v in ads.vectors}
    assert not ad_rows & {v.tobytes() for v in events.vectors}
    assert np.any(ads.vectors != 0, axis=1).all()


def test_publish_keys_are_big_endian_int64() -> None:
    assert id_keys(np.array([1, -1, 2**40])) == [
        (1).to_bytes(8, "big"),
        (-1).to_bytes(8, "big", signed=True),
        (2**40).to_bytes(8, "big"),
    ]


def test_publish_token_bucket_paces_by_rate_not_per_message() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    bucket = TokenBucket(1_000, clock=lambda: now[0], sleep=sleep)
    granted = 0
    while granted < 5_000:
        granted += bucket.grant(5_000 - granted)
    assert 4.8 <= now[0] <= 5.0


def test_publish_token_bucket_waits_for_a_minimum_grant() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    bucket = TokenBucket(1_000, clock=lambda: now[0], sleep=sleep)
    assert bucket.grant(100) == 100  # the initial burst
    assert bucket.grant(50, minimum=5) == 5 and now[0] == pytest.approx(0.005)
    assert bucket.grant(3, minimum=5) == 3  # never waits for more than it wants
    assert bucket.grant(10_000, minimum=10_000) == 100  # nor for more than the burst


def test_replay_pacer_spaces_events_by_event_time_over_speed() -> None:
    pacer = _Pacer(speed=2.0, clock=lambda: 100.0)
    due = pacer.due(np.array([T0, T0 + 1_000, T0 + 500, T0 + 4_000]))
    assert due is not None
    np.testing.assert_allclose(due, [100.0, 100.5, 100.5, 102.0])
    assert _Pacer(speed=0).due(np.array([T0, T0 + 1])) is None


def test_ad_churn_re_embeds_with_vectors_the_catalogue_does_not_have() -> None:
    from producers.stream import ad_churn

    for kwargs in ({"dim": 8}, {"pool": np.random.default_rng(5).random((500, 8), "float32")}):
        catalogue = next(synthetic_ads(50, seed=3, queries=10, batch_size=50, **kwargs))
        churn = next(ad_churn(50, 50, seed=3, queries=10, batch_size=50, **kwargs))
        same = (churn.vectors[:, None, :] == catalogue.vectors[None, :, :]).all(axis=2)
        assert not same.any(), "a re-embedding reused a catalogue vector: no real change"


# --- bring-your-own files: ops names, deletes without vectors, ids, event times ------------


def test_sources_npz_ops_as_names_or_codes(tmp_path: Path) -> None:
    ads = _ads(4)
    names = np.array(["upsert", "DELETE", " Upsert ", "delete"])
    np.savez(tmp_path / "names.npz", ad_ids=ads.ad_ids, vectors=ads.vectors, ops=names)
    np.savez(tmp_path / "codes.npz", ad_ids=ads.ad_ids, vectors=ads.vectors, ops=[0, 1, 0, 1])
    for name in ("names.npz", "codes.npz"):
        got = _concat(list(read_ads(tmp_path / name, DIM)))
        assert got.ops.tolist() == [0, OP_DELETE, 0, OP_DELETE], name


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        (np.array(["upsert", "remove"]), "'ops' row 1 is 'remove'; use 'upsert' or 'delete'"),
        (np.array([0, 7]), "'ops' row 1 is 7; use 0 (upsert) or 1 (delete)"),
        (np.array([0.0, 1.0]), "'ops' is float64"),
    ],
)
def test_sources_npz_bad_ops_are_named(tmp_path: Path, ops: np.ndarray, message: str) -> None:
    np.savez(tmp_path / "a.npz", ad_ids=[1, 2], vectors=np.ones((2, DIM), "float32"), ops=ops)
    with pytest.raises(SourceError, match=re.escape(message)):
        read_ads(tmp_path / "a.npz", DIM)


def test_sources_delete_only_npz_needs_no_vectors(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", ad_ids=np.array([5, 6, 7]), ops=np.array(["delete"] * 3))
    got = _concat(list(read_ads(tmp_path / "d.npz", DIM, event_time_ms=T0)))
    assert got.ad_ids.tolist() == [5, 6, 7] and (got.ops == OP_DELETE).all()
    assert got.vectors.shape == (3, DIM) and not got.vectors.any()
    np.savez(tmp_path / "mixed.npz", ad_ids=np.array([5, 6]), ops=np.array(["delete", "upsert"]))
    with pytest.raises(SourceError, match="row 1 is an upsert but the file has no 'vectors'"):
        read_ads(tmp_path / "mixed.npz", DIM)
    np.savez(tmp_path / "noops.npz", ad_ids=np.array([5, 6]))
    with pytest.raises(SourceError, match="no 'ops' to say these are deletes"):
        read_ads(tmp_path / "noops.npz", DIM)
    with pytest.raises(SourceError, match="pass --dim"):
        read_ads(tmp_path / "d.npz")


def test_sources_ids_from_a_separate_array(tmp_path: Path) -> None:
    vectors = np.random.default_rng(4).standard_normal((3, DIM)).astype("float32")
    np.save(tmp_path / "v.npy", vectors)
    ids = np.array([70, 71, 99])
    ads = _concat(list(read_ads(tmp_path / "v.npy", DIM, ids=ids)))
    assert ads.ad_ids.tolist() == [70, 71, 99]
    (eng,) = list(read_engagements(tmp_path / "v.npy", DIM, ids=ids))
    assert eng.query_ids.tolist() == [70, 71, 99] and eng.has_vector.all()
    np.testing.assert_array_equal(eng.vectors, vectors)
    np.savez(tmp_path / "e.npz", ids=ids, vectors=vectors)
    (eng,) = list(read_engagements(tmp_path / "e.npz", DIM))
    assert eng.query_ids.tolist() == [70, 71, 99]
    with pytest.raises(SourceError, match="has its own 'ids' array; drop --ids"):
        read_engagements(tmp_path / "e.npz", DIM, ids=ids)
    with pytest.raises(SourceError, match="ids and vectors must have the same length"):
        read_ads(tmp_path / "v.npy", DIM, ids=ids[:2])
    with pytest.raises(SourceError, match="integer ids"):
        read_ads(tmp_path / "v.npy", DIM, ids=ids.astype("float64"))


def test_sources_engagement_types_by_name_in_any_case(tmp_path: Path) -> None:
    np.savez(tmp_path / "e.npz", query_ids=[1, 2], event_types=np.array(["click", "Save"]))
    (eng,) = list(read_engagements(tmp_path / "e.npz", DIM))
    assert eng.event_types.tolist() == [2, 3]


def test_sources_event_time_columns_are_kept_or_reported_missing(tmp_path: Path) -> None:
    from producers.sources import has_event_times

    vectors = np.ones((2, DIM), "float32")
    np.save(tmp_path / "v.npy", vectors)
    np.savez(tmp_path / "plain.npz", ad_ids=[1, 2], vectors=vectors)
    when = np.array(["2024-06-01T00:00:00.250", "2024-06-01T00:00:01"], dtype="datetime64[ms]")
    np.savez(tmp_path / "timed.npz", ad_ids=[1, 2], vectors=vectors, event_time_ms=when)
    write_avro_file(tmp_path / "a.avro", [_ads(2)])
    assert not has_event_times(tmp_path / "v.npy")
    assert not has_event_times(tmp_path / "plain.npz")
    assert has_event_times(tmp_path / "timed.npz")
    assert has_event_times(tmp_path / "a.avro")
    got = _concat(list(read_ads(tmp_path / "timed.npz", DIM)))
    assert got.event_time_ms.tolist() == [1_717_200_000_250, 1_717_200_001_000]


# --- synthetic vectors with neighbourhood structure ----------------------------------------


def _ivf_recall(ads: np.ndarray, queries: np.ndarray, k: int, nlist: int, nprobe: int) -> float:
    """recall@k of a Faiss IVFFlat against numpy brute force (cosine)."""
    import faiss

    xb = ads / np.linalg.norm(ads, axis=1, keepdims=True)
    xq = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argsort(-(xq @ xb.T), axis=1)[:, :k]
    quantizer = faiss.IndexFlatIP(xb.shape[1])
    ivf = faiss.IndexIVFFlat(quantizer, xb.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(xb)
    ivf.add(xb)
    ivf.nprobe = nprobe
    _, found = ivf.search(xq, k)
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


@pytest.mark.parametrize("dim", [384, 768])
def test_sources_synthetic_vectors_have_neighbourhoods_ivf_can_find(dim: int) -> None:
    ads = next(synthetic_ads(6_000, dim=dim, seed=1, queries=300, batch_size=6_000))
    events = next(synthetic_engagements(3_000, queries=300, dim=dim, seed=1, batch_size=3_000))
    queries = np.unique(events.vectors, axis=0)
    assert ads.model_versions[0] == MIXTURE_VERSION and ads.vectors.dtype == np.float32
    clustered = _ivf_recall(ads.vectors, queries, k=20, nlist=64, nprobe=16)
    rng = np.random.default_rng(1)
    gaussian = _ivf_recall(
        rng.standard_normal(ads.vectors.shape, dtype="float32"),
        rng.standard_normal(queries.shape, dtype="float32"),
        k=20,
        nlist=64,
        nprobe=16,
    )
    assert clustered >= 0.88, clustered
    assert gaussian < 0.5, gaussian  # what plain Gaussian vectors gave: no structure to find


def test_sources_clustered_vectors_are_seeded_and_work_at_any_dim() -> None:
    a = clustered_vectors(50, 384, np.random.default_rng(3))
    b = clustered_vectors(50, 384, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, clustered_vectors(50, 384, np.random.default_rng(4)))
    for dim in (1, 2, 16, 50, 1536):
        x = clustered_vectors(10, dim, np.random.default_rng(0))
        assert x.shape == (10, dim) and np.isfinite(x).all()
    with pytest.raises(ValueError, match="dim > 0"):
        clustered_vectors(10, 0, np.random.default_rng(0))
