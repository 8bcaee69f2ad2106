"""Schema ids from a Confluent Schema Registry through confluent-kafka's SchemaRegistryClient: its
`mock://` client, and a real HTTP(S) registry (annstream.testing.schema_registry) with basic
auth and TLS. Subjects follow the configured topic names; auto-registration can be forbidden;
no message shows a password; Confluent's own Avro serde reads and writes the same bytes."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from annstream.codec import AdCodec, EngagementCodec
from annstream.config import KafkaConfig, load_config
from annstream.errors import SchemaError
from annstream.events import AdBatch, EngagementBatch
from annstream.schemas import (
    AD_SUBJECT,
    ENGAGEMENT_SUBJECT,
    HEAD_STATE_SUBJECT,
    NEIGHBOUR_SUBJECT,
    ConfluentSchemaRegistry,
    LocalSchemaRegistry,
    open_registry,
    schema_dir,
    topic_subjects,
    unframe,
)
from annstream.testing.schema_registry import FakeSchemaRegistry

DIM = 384
PASSWORD = "sr-p4ss,word"
TOPICS = {"ad_topic": "prod.ads.v2", "engagement_topic": "prod.engagements"}


def _ads(n: int = 4) -> AdBatch:
    rng = np.random.default_rng(3)
    return AdBatch.upserts(
        np.arange(n, dtype=np.int64) + 10,
        rng.standard_normal((n, DIM)).astype("float32"),
        event_time_ms=1_700_000_000_000 + np.arange(n),
        campaign_ids=np.arange(n) % 2,
        model_version="m1",
    )


def _engagements(n: int = 3) -> EngagementBatch:
    rng = np.random.default_rng(4)
    return EngagementBatch(
        query_ids=np.arange(n, dtype=np.int64),
        item_ids=np.arange(n, dtype=np.int64) + 10,
        event_types=np.zeros(n, dtype=np.uint8),
        weights=np.ones(n, dtype=np.float32),
        event_time_ms=np.full(n, 1_700_000_000_000, dtype=np.int64),
        vectors=rng.standard_normal((n, DIM)).astype("float32"),
        has_vector=np.ones(n, dtype=bool),
    )


def _avsc(name: str) -> str:
    return (schema_dir() / name).read_text("utf-8")


def _round_trip(registry: object) -> None:
    ads, engagements = _ads(), _engagements()
    ad_codec = AdCodec(registry, DIM)  # type: ignore[arg-type]
    decoded, rejected = ad_codec.decode(ad_codec.encode(ads))
    assert not rejected and np.array_equal(decoded.ad_ids, ads.ad_ids)
    assert np.array_equal(decoded.vectors, ads.vectors)
    codec = EngagementCodec(registry, DIM)  # type: ignore[arg-type]
    got, rejected = codec.decode(codec.encode(engagements))
    assert not rejected and np.array_equal(got.query_ids, engagements.query_ids)


# ---- mock:// -------------------------------------------------------------------------------


def test_subjects_follow_the_configured_topics() -> None:
    kafka = KafkaConfig(**TOPICS, results_topic="prod.neighbours", head_state_topic="prod.hs")
    assert topic_subjects(kafka) == {
        AD_SUBJECT: "prod.ads.v2-value",
        ENGAGEMENT_SUBJECT: "prod.engagements-value",
        NEIGHBOUR_SUBJECT: "prod.neighbours-value",
        HEAD_STATE_SUBJECT: "prod.hs-value",
    }
    assert topic_subjects(KafkaConfig())[NEIGHBOUR_SUBJECT] == "annstream.neighbours-value"


def test_mock_registry_registers_under_topic_subjects() -> None:
    registry = open_registry(KafkaConfig(schema_registry_url="mock://annstream", **TOPICS))
    assert isinstance(registry, ConfluentSchemaRegistry)
    _round_trip(registry)
    client = registry.client
    assert sorted(client.get_subjects()) == ["prod.ads.v2-value", "prod.engagements-value"]
    ad_id = client.get_latest_version("prod.ads.v2-value").schema_id
    assert registry.id_for(AD_SUBJECT) == ad_id


def test_without_auto_registration_a_missing_schema_stops_the_writer() -> None:
    kafka = KafkaConfig(
        schema_registry_url="mock://annstream", schema_registry_auto_register=False, **TOPICS
    )
    registry = ConfluentSchemaRegistry.from_config(kafka)
    with pytest.raises(SchemaError, match=r"no ad_event\.avsc under subject 'prod\.ads\.v2-value'"):
        AdCodec(registry, DIM)
    # Registered ahead (by CI, an operator): found, and nothing new is registered.
    client = registry.client
    expected = client.register_schema("prod.ads.v2-value", Schema(_avsc("ad_event.avsc"), "AVRO"))
    assert AdCodec(registry, DIM).schema_id == expected
    assert client.get_versions("prod.ads.v2-value") == [1]


def test_registry_and_local_file_agree_on_the_bytes() -> None:
    """Only the 4-byte id differs between a registry and the shipped registry file."""
    ads = _ads()
    local = AdCodec(LocalSchemaRegistry(), DIM).encode(ads)
    remote = AdCodec(open_registry("mock://annstream"), DIM).encode(ads)
    assert [bytes(unframe(m)[1]) for m in local] == [bytes(unframe(m)[1]) for m in remote]


def test_confluent_avro_serde_and_annstream_read_each_other() -> None:
    """A Java/Connect-style writer (Confluent's AvroSerializer) and reader (AvroDeserializer)."""
    registry = open_registry(KafkaConfig(schema_registry_url="mock://annstream", **TOPICS))
    assert isinstance(registry, ConfluentSchemaRegistry)
    ads = _ads(2)
    context = SerializationContext("prod.ads.v2", MessageField.VALUE)
    ours = AdCodec(registry, DIM).encode(ads)
    reader = AvroDeserializer(registry.client)
    record = reader(ours[0], context)
    assert record["ad_id"] == 10 and record["op"] == "UPSERT"
    assert np.array_equal(np.frombuffer(record["embedding"], "<f4"), ads.vectors[0])

    writer = AvroSerializer(registry.client, _avsc("ad_event.avsc"))
    theirs = writer(record, context)
    decoded, rejected = AdCodec(registry, DIM).decode([theirs])
    assert not rejected and decoded.ad_ids.tolist() == [10]
    assert np.array_equal(decoded.vectors[0], ads.vectors[0])

    engagements = _engagements()
    context = SerializationContext("prod.engagements", MessageField.VALUE)
    events = [reader(m, context) for m in EngagementCodec(registry, DIM).encode(engagements)]
    assert [e["query_id"] for e in events] == engagements.query_ids.tolist()


def test_bad_registry_url_is_refused_at_config_load() -> None:
    with pytest.raises(SchemaError, match=r"kafka\.schema_registry_url carries user:password@"):
        ConfluentSchemaRegistry.from_config(
            KafkaConfig(schema_registry_url="mock://u:pw@x", schema_registry_user="u")
        )


# ---- a real HTTP registry ----------------------------------------------------------------


def test_http_registry_with_basic_auth_in_the_url() -> None:
    with FakeSchemaRegistry("svc", PASSWORD) as fake:
        host = fake.url.removeprefix("http://")
        quoted = PASSWORD.replace(",", "%2C")
        registry = open_registry(
            KafkaConfig(schema_registry_url=f"http://svc:{quoted}@{host}", **TOPICS)
        )
        _round_trip(registry)
        assert set(fake.subjects()) == {"prod.ads.v2-value", "prod.engagements-value"}
        assert {r.user for r in fake.requests} == {"svc"}


def test_http_registry_with_credentials_from_settings_and_no_auto_registration() -> None:
    with FakeSchemaRegistry("svc", PASSWORD) as fake:
        fake.register("prod.ads.v2-value", _avsc("ad_event.avsc"))
        env = {
            "ANNSTREAM_KAFKA__SCHEMA_REGISTRY_URL": fake.url,
            "ANNSTREAM_KAFKA__SCHEMA_REGISTRY_USER": "svc",
            "ANNSTREAM_KAFKA__SCHEMA_REGISTRY_PASSWORD": PASSWORD,
            "ANNSTREAM_KAFKA__SCHEMA_REGISTRY_AUTO_REGISTER": "false",
            "ANNSTREAM_KAFKA__AD_TOPIC": TOPICS["ad_topic"],
        }
        registry = open_registry(load_config(env=env).kafka)
        codec = AdCodec(registry, DIM)
        decoded, _ = codec.decode(codec.encode(_ads()))
        assert len(decoded) == 4
        assert not [r for r in fake.requests if r.path.endswith("/versions")], "registered"
        with pytest.raises(SchemaError) as info:
            EngagementCodec(registry, DIM)
        assert "'annstream.engagements-value'" in str(info.value)


@pytest.mark.parametrize(
    "url_form",
    ["userinfo", "settings"],
)
def test_http_registry_errors_never_show_the_password(url_form: str) -> None:
    with FakeSchemaRegistry("svc", "the-right-one") as fake:
        host = fake.url.removeprefix("http://")
        kafka = (
            KafkaConfig(schema_registry_url=f"http://svc:{PASSWORD.replace(',', '%2C')}@{host}")
            if url_form == "userinfo"
            else KafkaConfig(
                schema_registry_url=fake.url,
                schema_registry_user="svc",
                schema_registry_password=PASSWORD,
            )
        )
        with pytest.raises(SchemaError) as info:
            AdCodec(open_registry(kafka), DIM)
        message = str(info.value)
        assert "HTTP 401" in message and host in message
        assert "p4ss" not in message and "%2C" not in message
    # Nothing listens there any more.
    with pytest.raises(SchemaError, match="cannot reach it") as info:
        AdCodec(open_registry(kafka), DIM)
    assert "p4ss" not in str(info.value)


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_registry_with_a_private_ca_and_a_client_certificate(tmp_path: Path) -> None:
    server_cert, server_key = _self_signed(tmp_path, "registry")
    client_cert, client_key = _self_signed(tmp_path, "annstream")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(server_cert, server_key)
    tls.verify_mode = ssl.CERT_REQUIRED
    tls.load_verify_locations(client_cert)
    with FakeSchemaRegistry("svc", PASSWORD, tls=tls) as fake:
        kafka = KafkaConfig(
            schema_registry_url=fake.url,
            schema_registry_user="svc",
            schema_registry_password=PASSWORD,
            schema_registry_ca_location=str(server_cert),
            schema_registry_cert_location=str(client_cert),
            schema_registry_key_location=str(client_key),
        )
        _round_trip(open_registry(kafka))
        # The public CAs do not vouch for this registry: refused, and said so.
        with pytest.raises(SchemaError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
            AdCodec(open_registry(KafkaConfig(schema_registry_url=fake.url)), DIM)
    with pytest.raises(SchemaError, match="schema_registry_"):
        open_registry(KafkaConfig(schema_registry_url=fake.url, schema_registry_ca_location="/no"))


def test_a_registry_client_of_our_own_settings_is_accepted() -> None:
    """The settings built for the client are ones it knows (it refuses unknown ones)."""
    client = SchemaRegistryClient.new_client({"url": "mock://x"})
    registry = ConfluentSchemaRegistry(client, subjects=topic_subjects(KafkaConfig(**TOPICS)))
    assert AdCodec(registry, DIM).schema_id == 1
