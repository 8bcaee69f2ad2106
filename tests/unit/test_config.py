from __future__ import annotations

from pathlib import Path

import pytest

from annstream.config import load_config
from annstream.errors import ConfigError


def test_config_defaults_file_env_and_overrides_in_that_order(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('[kafka]\nbootstrap_servers = "file:1"\n[index]\nnprobe = 8\n')
    env = {"ANNSTREAM_INDEX__NPROBE": "16", "ANNSTREAM_KAFKA__CLIENT": "security.protocol=SSL"}
    cfg = load_config(path, env=env, overrides={"index": {"nlist": 64}})
    assert cfg.kafka.bootstrap_servers == "file:1"
    assert cfg.index.nprobe == 16
    assert cfg.index.nlist == 64
    assert cfg.kafka.client == {"security.protocol": "SSL"}


def test_config_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text("[index]\nnprobes = 8\n")
    with pytest.raises(ConfigError, match=r"unknown setting index\.nprobes"):
        load_config(path, env={})


def test_config_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"environment: index\.nprobe: expected int"):
        load_config(env={"ANNSTREAM_INDEX__NPROBE": "many"})


def test_config_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", env={})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_event_skew_s", "0"),
        ("max_event_skew_s", "-600"),
        ("max_event_skew_s", "nan"),
        ("max_message_bytes", "999"),
    ],
)
def test_kafka_limits_out_of_range_are_refused_naming_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"kafka.{key}"):
        load_config(env={f"ANNSTREAM_KAFKA__{key.upper()}": value})


def test_the_event_time_bound_can_be_turned_off() -> None:
    cfg = load_config(env={"ANNSTREAM_KAFKA__MAX_EVENT_SKEW_S": "inf"})
    assert cfg.kafka.max_event_skew_s == float("inf")
