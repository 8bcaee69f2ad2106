from __future__ import annotations

from pathlib import Path

import pytest

from annstream.config import (
    HEAD_EXIT_POLICIES,
    INDEX_KINDS,
    METRICS,
    Config,
    load_config,
    validate,
)
from annstream.errors import ConfigError
from annstream.logs import redact_text


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
    with pytest.raises(ConfigError, match=r"environment: expected int for index\.nprobe"):
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


SECRET = "s3cr3t,with=comma"


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"[kafka]\nclient = ['sasl.password={SECRET}']\n",
            "expected a table of settings for kafka.client, got a list",
        ),
        (f"[store]\npassword = ['{SECRET}']\n", "expected a string for store.password, got a list"),
        (
            f"[store]\npassword = {{ x = '{SECRET}' }}\n",
            "expected a string for store.password, got a table",
        ),
        (
            f"[kafka.client]\n'sasl.password' = ['{SECRET}']\n",
            "expected a string, number or boolean for kafka.client.sasl.password, got a list",
        ),
        (f"[index]\nnlist = ['{SECRET}']\n", "expected int for index.nlist, got a list"),
    ],
)
def test_config_type_errors_never_echo_values(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_toml(tmp_path, text), env={})
    assert str(info.value).endswith(expected)
    assert "s3cr3t" not in str(info.value)


def test_config_scalar_type_errors_show_ordinary_values_only() -> None:
    with pytest.raises(ConfigError, match=r"expected int for index\.nprobe, got 'many'$"):
        load_config(env={"ANNSTREAM_INDEX__NPROBE": "many"})
    with pytest.raises(
        ConfigError, match=r"true or false for kafka\.schema_registry_auto_register, got 'maybe'$"
    ):
        load_config(overrides={"kafka": {"schema_registry_auto_register": "maybe"}}, env={})
    with pytest.raises(ConfigError, match=r"expected a string for store\.password, got a bool$"):
        load_config(overrides={"store": {"password": True}}, env={})


def test_config_client_entries_from_their_own_variables_keep_commas(tmp_path: Path) -> None:
    path = _toml(
        tmp_path, '[kafka.client]\n"security.protocol" = "SASL_SSL"\n"sasl.username" = "u"\n'
    )
    env = {
        "ANNSTREAM_KAFKA__CLIENT__SASL_PASSWORD": SECRET,
        "ANNSTREAM_KAFKA__CLIENT__SASL_USERNAME": "svc",
        "ANNSTREAM_KAFKA__CLIENT__ENABLE_SSL_CERTIFICATE_VERIFICATION": "false",
    }
    client = load_config(path, env=env).kafka.client
    assert client == {
        "security.protocol": "SASL_SSL",
        "sasl.username": "svc",
        "sasl.password": SECRET,
        "enable.ssl.certificate.verification": "false",
    }
    # The whole-table variable replaces the file's table; entries still go on top of it.
    env["ANNSTREAM_KAFKA__CLIENT"] = "security.protocol=SSL"
    client = load_config(path, env=env).kafka.client
    assert client["security.protocol"] == "SSL" and "sasl.username" in client


def test_config_comma_separated_client_refuses_a_split_value_without_showing_it() -> None:
    env = {"ANNSTREAM_KAFKA__CLIENT": f"security.protocol=SASL_SSL,sasl.password=ab,tail-{SECRET}"}
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    message = str(info.value)
    assert "tail" not in message and "s3cr3t" not in message
    assert "ANNSTREAM_KAFKA__CLIENT__SASL_PASSWORD" in message


def test_config_comma_separated_client_takes_no_secret() -> None:
    for entry in ("sasl.password=no-comma-here", "sasl.username=key", "ssl.key.pem=x"):
        with pytest.raises(ConfigError) as info:
            load_config(env={"ANNSTREAM_KAFKA__CLIENT": f"security.protocol=SSL,{entry}"})
        key = entry.split("=")[0]
        variable = "ANNSTREAM_KAFKA__CLIENT__" + key.upper().replace(".", "_")
        assert str(info.value).endswith(
            f"cannot carry the secret {key} (a comma in the value "
            f"would split it): pass it as {variable}"
        )
        assert entry.split("=")[1] not in str(info.value)


def test_config_entries_only_for_table_settings() -> None:
    with pytest.raises(ConfigError, match=r"index\.nlist is not a table of settings"):
        load_config(env={"ANNSTREAM_INDEX__NLIST__X": "1"})
    with pytest.raises(ConfigError, match="names no entry"):
        load_config(env={"ANNSTREAM_KAFKA__CLIENT__": "1"})


def test_config_dotted_toml_keys_and_booleans_in_client(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        '[kafka.client]\nsasl.mechanisms = "PLAIN"\nenable.ssl.certificate.verification = false\n'
        '"socket.timeout.ms" = 5000\n',
    )
    assert load_config(path, env={}).kafka.client == {
        "sasl.mechanisms": "PLAIN",
        "enable.ssl.certificate.verification": "false",
        "socket.timeout.ms": "5000",
    }


def test_config_secrets_read_are_masked_in_any_later_message(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        '[store]\nurl = "aerospike://admin:url-pw-1%2C2@db:3000/ns/set"\npassword = "store-pw-9"\n',
    )
    load_config(path, env={"ANNSTREAM_KAFKA__CLIENT__SASL_PASSWORD": "env-pw-7"})
    said = redact_text("login url-pw-1,2 / url-pw-1%2C2 / store-pw-9 / env-pw-7 failed")
    assert said == "login *** / *** / *** / *** failed"


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("index", "metric", "cosinee", "index.metric = 'cosinee': use one of cosine, ip, l2"),
        ("index", "kind", "hnsw", "index.kind = 'hnsw': use one of ivfflat, ivfpq"),
        ("refresh", "k", -5, "refresh.k = -5: must be > 0"),
        ("index", "nlist", 0, "index.nlist = 0: must be > 0"),
        ("index", "nprobe", 2048, "index.nprobe = 2048: must be <= index.nlist (1024)"),
        ("refresh", "nprobe", 2048, "refresh.nprobe = 2048: must be <= index.nlist (1024)"),
        ("refresh", "margin", -1, "refresh.margin = -1: must be >= 0"),
        ("heads", "exit_score", 9.0, "heads.exit_score = 9.0: must be <= heads.enter_score (5)"),
        ("heads", "half_life_s", 0, "heads.half_life_s = 0.0: must be > 0"),
        ("store", "on_head_exit", "drop", "store.on_head_exit = 'drop': use one of expire, delete"),
        (
            "store",
            "ttl_s",
            400_000_000,
            "store.ttl_s = 400000000 is out of range: use -2 (keep), -1 (never)",
        ),
        (
            "store",
            "url",
            "mysql://u:pw-123@h/db",
            "store.url = 'mysql://u:***@h/db': use sqlite:///",
        ),
        ("service", "metrics_port", 70000, "service.metrics_port = 70000: must be 0 (off)"),
        ("service", "log_level", "LOUD", "service.log_level = 'LOUD': use one of DEBUG"),
        ("drift", "recall_drop", 1.5, "drift.recall_drop = 1.5: must be between 0 and 1"),
        ("snapshot", "keep", 0, "snapshot.keep = 0: must be > 0"),
        ("kafka", "ad_topic", "ads topic", "kafka.ad_topic = 'ads topic': a Kafka topic name"),
        ("kafka", "schema_registry_url", "sr:8081", "kafka.schema_registry_url = 'sr:8081': use"),
        ("kafka", "compression_type", "lz5", "kafka.compression_type = 'lz5': use one of none"),
        ("kafka", "topic_partitions", 0, "kafka.topic_partitions = 0: must be -1"),
        ("kafka", "topic_replication", -3, "kafka.topic_replication = -3: must be -1"),
        (
            "kafka",
            "results_topic",
            "annstream.ads",
            "kafka.results_topic = 'annstream.ads': must differ from kafka.ad_topic",
        ),
        (
            "kafka",
            "schema_registry_key_location",
            "/k.pem",
            "kafka.schema_registry_key_location = '/k.pem': needs schema_registry_cert_location",
        ),
    ],
)
def test_config_values_are_checked_at_load(
    section: str, key: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={section: {key: value}})
    assert str(info.value).startswith(message)
    with pytest.raises(ConfigError):
        Config().replace(section, **{key: value})


def test_config_reports_every_bad_value_on_one_line(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[index]\nmetric = "cosinee"\nnlist = 0\n[refresh]\nk = -5\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert "\n" not in message
    for part in ("index.metric = 'cosinee'", "index.nlist = 0", "refresh.k = -5"):
        assert part in message


def test_config_ivfpq_needs_pq_m_dividing_dim() -> None:
    with pytest.raises(ConfigError, match=r"index\.pq_m = 7: must be a positive divisor of"):
        load_config(env={}, overrides={"index": {"kind": "ivfpq", "dim": 64, "pq_m": 7}})
    load_config(env={}, overrides={"index": {"kind": "ivfpq", "dim": 64, "pq_m": 8}})


def test_config_first_training_and_recall_target_settings_are_checked() -> None:
    """Issue 12: index.train_wait_s and index.recall_target (0 = off) are in range, and a
    recall target needs the stored-recall samples it is steered by."""
    cfg = load_config(env={"ANNSTREAM_INDEX__RECALL_TARGET": "0.95"})
    assert cfg.index.recall_target == 0.95 and cfg.index.train_wait_s == 300.0
    with pytest.raises(ConfigError, match=r"index\.train_wait_s = -1\.0: must be >= 0"):
        load_config(env={}, overrides={"index": {"train_wait_s": -1}})
    with pytest.raises(ConfigError, match=r"index\.recall_target = 1\.5: must be between 0 and 1"):
        load_config(env={}, overrides={"index": {"recall_target": 1.5}})
    with pytest.raises(ConfigError, match=r"set service\.recall_every_batches > 0"):
        load_config(
            env={},
            overrides={"index": {"recall_target": 0.9}, "service": {"recall_every_batches": 0}},
        )


def test_config_defaults_and_the_shipped_config_are_valid() -> None:
    assert validate(Config()) == Config()
    load_config(Path(__file__).resolve().parents[2] / "deploy" / "annstream.toml", env={})


def test_config_allowed_values_match_the_code_that_uses_them() -> None:
    from annstream import ann, codec
    from annstream.store import base

    assert METRICS == ann.METRICS == codec.METRICS
    assert INDEX_KINDS == ann.KINDS
    assert HEAD_EXIT_POLICIES == base.HEAD_EXIT_POLICIES
