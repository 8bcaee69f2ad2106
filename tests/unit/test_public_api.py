"""Every library module declares __all__, and every name in it exists (py.typed public API)."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import annstream

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(annstream.__path__, "annstream.")
    if not m.name.endswith("__main__") and ".cli." not in m.name
)


@pytest.mark.parametrize("name", MODULES)
def test_module_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"


def test_top_level_api_is_pinned() -> None:
    assert sorted(annstream.__all__) == sorted(
        [
            "AnnstreamError",
            "BrokerError",
            "Config",
            "ConfigError",
            "IndexStateError",
            "InvalidEventError",
            "NeighbourReader",
            "SchemaError",
            "ServingResult",
            "SnapshotError",
            "StoreConfigError",
            "StoreError",
            "StoreUnavailableError",
            "__version__",
            "load_config",
            "open_store",
        ]
    )


def test_embedding_api_serves_lookups_from_the_top_level(tmp_path: Path) -> None:
    """What the README shows: read stored lists with names from `annstream` alone."""
    import subprocess
    import sys

    code = (
        "import sys, annstream\n"
        "assert 'annstream.serving' not in sys.modules  # import annstream stays light\n"
        "from annstream import NeighbourReader, ServingResult, load_config, open_store\n"
        f"cfg = load_config(env={{}}, overrides={{'store': {{'url': 'sqlite:///{tmp_path}/n.db'}}}})\n"
        "store = open_store(cfg.store.url, cfg.store)\n"
        "result = NeighbourReader(store, k=5).lookup([1, 2])\n"
        "assert isinstance(result, ServingResult) and not result.found.any()\n"
        "store.close()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
