"""Pytest fixtures for tests of the whole service; the workload, oracle, feed and launcher they
use live in bench/harness.py (shared with `annstream bench faults`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from annstream.testing.harness import DIM, ENG_PARTITIONS, Topics

__all__ = ["topics", "training", "training_file"]


@pytest.fixture(scope="module")
def training() -> np.ndarray:
    return np.random.default_rng(99).standard_normal((1_000, DIM)).astype("float32")


@pytest.fixture
def topics(topic_factory: Callable[..., str]) -> Topics:
    return Topics(
        ads=topic_factory("ads", 2),
        engagements=topic_factory("eng", ENG_PARTITIONS),
        dead_letters=topic_factory("dlq"),
        head_state=f"head-state-{uuid.uuid4().hex[:12]}",
    )


@pytest.fixture
def training_file(tmp_path: Path, training: np.ndarray) -> Path:
    path = tmp_path / "training.npy"
    np.save(path, training)
    return path
