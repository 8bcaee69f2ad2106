"""IdMap against a Python dict, through growth, tombstones, shrinking and compaction."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from annstream.idmap import IdMap

ops = st.lists(
    st.tuples(st.sampled_from(["put", "remove", "compact"]), st.integers(0, 400)),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), width=st.sampled_from([0, 1, 2]), steps=ops)
def test_idmap_matches_a_dict(seed: int, width: int, steps: list[tuple[str, int]]) -> None:
    rng = np.random.default_rng(seed)
    m, ref = IdMap(width), {}
    for op, n in steps:
        ids = np.unique(
            rng.integers(-(2**62), 2**62, n // 4).tolist() + rng.integers(0, 500, n).tolist()
        )
        if op == "put":
            vals = rng.integers(-5, 5, (len(ids), width))
            added = m.put(ids, vals)
            assert added == len(set(ids.tolist()) - set(ref))
            ref.update({int(i): v.tolist() for i, v in zip(ids, vals, strict=True)})
        elif op == "remove":
            found, old = m.remove(ids)
            assert found.tolist() == [int(i) in ref for i in ids]
            for i, f, v in zip(ids.tolist(), found, old, strict=True):
                if f:
                    assert ref.pop(i) == v.tolist()
        else:
            m.compact()
        assert len(m) == len(ref)
        assert m.capacity == 0 or len(m) <= 0.7 * m.capacity
        q = np.concatenate([ids, rng.integers(0, 600, 50)])
        found, vals = m.get(q, default=-9)
        for i, f, v in zip(q.tolist(), found, vals, strict=True):
            assert f == (i in ref)
            assert v.tolist() == (ref[i] if f else [-9] * width)
        assert m.contains(q).tolist() == found.tolist()
    keys, vals = m.items()
    assert keys.tolist() == sorted(ref) and m.ids().tolist() == sorted(ref)
    assert [v.tolist() for v in vals] == [ref[k] for k in sorted(ref)]


def test_idmap_refuses_the_reserved_ids_and_sizes_compactly() -> None:
    m = IdMap(0)
    with pytest.raises(ValueError, match="reserved"):
        m.put(np.array([np.iinfo(np.int64).min]))
    m.put(np.arange(100_000))
    m.compact()
    assert m.nbytes <= 100_000 * 8 / 0.7 + 64
    m.remove(np.arange(99_000))
    assert m.capacity < 10_000
