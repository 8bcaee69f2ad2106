"""Store settings a real server would refuse on every write are refused at start-up instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from annstream.cli import main
from annstream.config import StoreConfig, load_config
from annstream.errors import ConfigError


@pytest.mark.parametrize("key", ["ttl_s", "exit_ttl_s"])
@pytest.mark.parametrize("value", [315_360_001, 10**10, -3])
def test_store_ttl_out_of_range_is_a_config_error(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=rf"store\.{key} = {value} .*315360000"):
        load_config(env={f"ANNSTREAM_STORE__{key.upper()}": str(value)})
    with pytest.raises(ConfigError, match=rf"store\.{key}"):
        StoreConfig(**{key: value})


@pytest.mark.parametrize("value", [-2, -1, 0, 1, 315_360_000])
def test_store_ttl_in_range_is_accepted(value: int) -> None:
    cfg = load_config(env={"ANNSTREAM_STORE__TTL_S": str(value)})
    assert cfg.store.ttl_s == value
    assert StoreConfig(exit_ttl_s=value).exit_ttl_s == value


def test_run_with_a_ttl_over_ten_years_exits_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "annstream.toml"
    config.write_text("[store]\nexit_ttl_s = 400000000\n")
    db = tmp_path / "never.db"
    assert main(["run", "--config", str(config), "--store", f"sqlite:///{db}"]) == 2
    err = capsys.readouterr().err
    assert "store.exit_ttl_s = 400000000" in err and "315360000" in err
    assert not db.exists()
