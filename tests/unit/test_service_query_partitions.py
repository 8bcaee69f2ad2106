from __future__ import annotations

import numpy as np

from annstream.config import HeadsConfig
from annstream.heads import HeadQueryTracker
from consumers.service import RefresherService


def test_query_partition_map_forgets_evicted_queries() -> None:
    service = object.__new__(RefresherService)  # only the map and the tracker are involved
    service.tracker = HeadQueryTracker(HeadsConfig(max_tracked=100), 2)
    ids = np.arange(100, dtype="int64")
    service.tracker.observe(ids, np.ones(100, "float32"), np.zeros(100, "int64"))
    service._query_partition = {q: q % 3 for q in range(5000)}
    service._prune_query_partitions()
    assert service._query_partition == {q: q % 3 for q in range(100)}
    small = {q: 0 for q in range(50)}
    service._query_partition = dict(small)
    service._prune_query_partitions()
    assert service._query_partition == small  # under the threshold nothing is scanned
