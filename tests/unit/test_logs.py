"""JSON log lines parse; secrets never reach a handler (messages, args, extras, config dumps)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from annstream.config import Config, KafkaConfig, StoreConfig
from annstream.logs import (
    MASK,
    add_secret,
    configure_logging,
    is_secret_key,
    redact,
    redact_text,
)

SECRET = "hunter2-s3cr3t"


@pytest.fixture(autouse=True)
def _root_level() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = configure_logging("DEBUG", json=True, stream=stream)
    yield stream
    logging.getLogger().removeHandler(handler)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_have_the_fields_and_extras(out: io.StringIO) -> None:
    log = logging.getLogger("annstream.test")
    log.info("batch %d stored", 7, extra={"records": 12, "partition_lag": {"0": 3}})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    first, second = _lines(out)
    assert first["level"] == "INFO" and first["logger"] == "annstream.test"
    assert first["message"] == "batch 7 stored"
    assert first["records"] == 12 and first["partition_lag"] == {"0": 3}
    assert str(first["ts"]).endswith("+00:00")
    assert second["level"] == "ERROR" and "RuntimeError: boom" in str(second["exc"])


def test_secrets_are_masked_in_messages_args_extras_and_exceptions(out: io.StringIO) -> None:
    log = logging.getLogger("annstream.test")
    client = {"sasl.mechanisms": "PLAIN", "sasl.password": SECRET, "ssl.key.password": SECRET}
    log.info("kafka client %s", client)
    log.warning("connect sasl.password=%s token: %s", SECRET, SECRET)
    log.info("store", extra={"password": SECRET, "conf": {"api_key": SECRET, "host": "h"}})
    log.info("url aerospike://admin:%s@db:3000/ns/set", SECRET)
    try:
        raise ValueError(f"bad login password='{SECRET}'")
    except ValueError:
        log.exception("store failed")
    text = out.getvalue()
    assert SECRET not in text
    lines = _lines(out)
    assert "'sasl.mechanisms': 'PLAIN'" in str(lines[0]["message"])
    assert lines[2]["password"] == MASK and lines[2]["conf"] == {"api_key": MASK, "host": "h"}
    assert "admin:***@db:3000" in str(lines[3]["message"])


def test_text_format_is_the_default_and_redacts_too() -> None:
    stream = io.StringIO()
    handler = configure_logging("INFO", stream=stream)
    try:
        logging.getLogger("annstream.test").info("sasl.password=%s", SECRET)
        logging.getLogger("annstream.test").debug("hidden")
    finally:
        logging.getLogger().removeHandler(handler)
    line = stream.getvalue().strip()
    assert line.endswith("INFO annstream.test: sasl.password=***") and "hidden" not in line
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("LOUD")


def test_configure_logging_replaces_only_its_own_handler() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    first = configure_logging("INFO", stream=io.StringIO())
    second = configure_logging("INFO", stream=io.StringIO())
    try:
        assert first not in root.handlers and second in root.handlers
        assert [h for h in root.handlers if h is not second] == before
    finally:
        root.removeHandler(second)


def test_redact_config_dump() -> None:
    cfg = Config(
        kafka=KafkaConfig(client={"sasl.password": SECRET, "security.protocol": "SASL_SSL"}),
        store=StoreConfig(user="u", password=SECRET),
    )
    dump = redact(cfg)
    assert SECRET not in json.dumps(dump)
    assert dump["kafka"]["client"] == {"sasl.password": MASK, "security.protocol": "SASL_SSL"}
    assert dump["store"]["user"] == "u" and dump["store"]["password"] == MASK
    assert redact(Config())["store"]["password"] == ""  # empty stays empty: nothing hidden
    assert is_secret_key("ssl.key.password") and is_secret_key("TOKEN")
    assert not is_secret_key("bootstrap.servers")
    assert redact_text("no secrets here: nprobe=32") == "no secrets here: nprobe=32"


@pytest.mark.parametrize(
    "key",
    [
        "sasl.password",
        "sasl.username",  # a Confluent Cloud API key
        "sasl.oauthbearer.client.secret",
        "sasl.jaas.config",
        "ssl.key.password",
        "ssl.key.pem",
        "ssl.keystore.password",
        "basic.auth.user.info",
        "schema_registry_password",
        "SASL_PASSWORD",
        "password",
    ],
)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)
    assert redact_text(f"{key}=abc,def") == f"{key}=***,def"


@pytest.mark.parametrize(
    "key", ["sasl.mechanisms", "sasl.mechanism", "security.protocol", "ssl.ca.location", "url"]
)
def test_not_secret_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_urls_lose_their_password_and_keep_the_user() -> None:
    assert (
        redact_text("https://key:s%40cret@sr.example:443/x") == "https://key:***@sr.example:443/x"
    )
    assert redact_text("at https://:pw12@sr:8081, not") == "at https://:***@sr:8081, not"
    assert redact_text("https://sr.example:8081/subjects") == "https://sr.example:8081/subjects"


def test_librdkafka_invalid_value_of_a_secret_property_is_masked() -> None:
    secret = 'Invalid value "p4ss" for configuration property "sasl.password"'
    assert redact_text(secret) == 'Invalid value "***" for configuration property "sasl.password"'
    plain = 'Invalid value "SSL2" for configuration property "security.protocol"'
    assert redact_text(plain) == plain


def test_added_secrets_are_masked_in_any_form(out: io.StringIO) -> None:
    add_secret("tail-of-a,comma-pw")
    add_secret("pw")  # too short to mask as a literal: it would mangle ordinary words
    assert redact_text("could not log in as svc with tail-of-a,comma-pw.") == (
        "could not log in as svc with ***."
    )
    assert redact_text("pw is short") == "pw is short"
    logging.getLogger("annstream.test").error("librdkafka said %s", "tail-of-a,comma-pw!")
    assert "comma-pw!" not in out.getvalue() and "***!" in out.getvalue()
