"""Every library module declares __all__, and every name in it exists (py.typed public API)."""

from __future__ import annotations

import importlib
import pkgutil

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
            "SchemaError",
            "SnapshotError",
            "StoreConfigError",
            "StoreError",
            "StoreUnavailableError",
            "__version__",
            "load_config",
        ]
    )
