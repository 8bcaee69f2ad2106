"""AdMetadata: last upsert wins, removals, lookups shaped like neighbour lists, state round trip;
differential against a plain dict replay."""

from __future__ import annotations

import numpy as np
import pytest

from annstream.ad_metadata import NO_ID, AdMetadata
from annstream.events import AdBatch
from consumers.ads import net_changes, net_rows


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype="int64")


def test_update_last_occurrence_wins_and_overwrites() -> None:
    meta = AdMetadata()
    meta.update(_i64(5, 3, 5), _i64(50, 30, 51), _i64(500, 300, 501))
    assert len(meta) == 2
    adv, camp = meta.lookup(_i64(3, 5))
    assert adv.tolist() == [30, 51] and camp.tolist() == [300, 501]
    meta.update(_i64(3, 9), _i64(NO_ID, 90), _i64(301, 900))
    adv, camp = meta.lookup(np.array([[9, 3, 5]]))
    assert adv.tolist() == [[90, NO_ID, 51]] and camp.tolist() == [[900, 301, 501]]
    assert meta.state()["ad_ids"].tolist() == [3, 5, 9]


def test_remove_and_unknown_and_padding_give_no_id() -> None:
    meta = AdMetadata()
    meta.update(_i64(1, 2, 3), _i64(10, 20, 30), _i64(100, 200, 300))
    meta.remove(_i64(2, 2, 7))
    meta.remove(_i64())
    assert len(meta) == 2
    adv, camp = meta.lookup(np.array([[1, 2, -1], [3, 8, -1]], dtype="int64"))
    assert adv.dtype == np.int64 and adv.shape == (2, 3)
    assert adv.tolist() == [[10, NO_ID, NO_ID], [30, NO_ID, NO_ID]]
    assert camp.tolist() == [[100, NO_ID, NO_ID], [300, NO_ID, NO_ID]]


def test_empty_table_and_empty_calls() -> None:
    meta = AdMetadata()
    adv, camp = meta.lookup(np.full((2, 4), -1, dtype="int64"))
    assert (adv == NO_ID).all() and (camp == NO_ID).all() and adv.shape == (2, 4)
    meta.update(_i64(), _i64(), _i64())
    meta.remove(_i64(1))
    assert len(meta) == 0 and meta.memory_bytes() == 0
    assert meta.lookup(np.empty((0, 5), "int64"))[0].shape == (0, 5)


def test_state_round_trip() -> None:
    meta = AdMetadata()
    meta.update(_i64(4, 2, 8), _i64(40, 20, 80), _i64(400, 200, 800))
    back = AdMetadata.from_state(meta.state())
    ids = np.array([[8, 4, 2, 6, -1]])
    for a, b in zip(back.lookup(ids), meta.lookup(ids), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(back) == 3 and 3 * 3 * 8 <= back.memory_bytes() <= 64 * 3 * 8


def test_invalid_input_is_rejected_with_the_name() -> None:
    meta = AdMetadata()
    with pytest.raises(ValueError, match=r"campaign_ids.*2 entries"):
        meta.update(_i64(1, 2), _i64(1, 2), _i64(1))
    with pytest.raises(ValueError, match=r"ad_ids.*integer"):
        meta.update(np.array([1.5]), _i64(1), _i64(1))
    with pytest.raises(ValueError, match="lacks"):
        AdMetadata.from_state({"ad_ids": _i64(1)})
    with pytest.raises(ValueError, match="sorted and unique"):
        AdMetadata.from_state(
            {"ad_ids": _i64(2, 1), "advertiser_ids": _i64(0, 0), "campaign_ids": _i64(0, 0)}
        )


def test_random_batches_match_a_dict_replay() -> None:
    rng = np.random.default_rng(1338)
    meta = AdMetadata()
    plain: dict[int, tuple[int, int]] = {}
    for _ in range(30):
        ids = rng.integers(0, 200, 40)
        adv = rng.integers(-1, 5, 40)
        camp = rng.integers(-1, 50, 40)
        meta.update(ids, adv, camp)
        for i, a, c in zip(ids.tolist(), adv.tolist(), camp.tolist(), strict=True):
            plain[i] = (a, c)
        gone = rng.integers(0, 200, 10)
        meta.remove(gone)
        for i in gone.tolist():
            plain.pop(i, None)
    assert len(meta) == len(plain)
    query = rng.integers(-1, 220, (25, 15))
    adv, camp = meta.lookup(query)
    want = np.array([[plain.get(i, (NO_ID, NO_ID)) for i in row] for row in query.tolist()])
    np.testing.assert_array_equal(adv, want[..., 0])
    np.testing.assert_array_equal(camp, want[..., 1])


def test_net_rows_line_up_metadata_with_the_net_upserts() -> None:
    up = AdBatch.upserts(_i64(1, 2, 3), np.ones((3, 2)), 0, _i64(10, 20, 30), _i64(100, 200, 300))
    again = AdBatch.upserts(_i64(1), np.zeros((1, 2)), 0, _i64(11), _i64(101))
    batch = AdBatch.concat([up, AdBatch.deletes(_i64(2), 2, 0), again], 2)
    rows_up, rows_del = net_rows(batch)
    assert batch.ad_ids[rows_up].tolist() == [3, 1] and batch.ad_ids[rows_del].tolist() == [2]
    meta = AdMetadata()
    meta.update(_i64(2), _i64(20), _i64(200))
    meta.remove(batch.ad_ids[rows_del])
    meta.update(batch.ad_ids[rows_up], batch.advertiser_ids[rows_up], batch.campaign_ids[rows_up])
    assert meta.lookup(_i64(1, 2, 3))[1].tolist() == [101, NO_ID, 300]
    ids, vectors, deleted = net_changes(batch)
    assert ids.tolist() == [1, 3] and vectors[:, 0].tolist() == [0.0, 1.0]
    assert deleted.tolist() == [2]
