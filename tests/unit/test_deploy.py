"""Static checks of the deployment files: no Docker engine runs here, so what `docker compose up`
would trip over (a typo in the service config, a mount of a missing file, a volume never declared,
a TTL write refused by Aerospike) is caught by reading the files together.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from annstream.config import Config, load_config
from annstream.metrics import ServiceMetrics
from annstream.topics import TOPIC_CONFIGS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SERVICE_CONFIG = ROOT / "deploy" / "annstream.toml"
CONFIG_IN_CONTAINER = "/etc/annstream/annstream.toml"
METRICS_PORT = 9108

OFFICIAL_IMAGES = {
    "kafka": "apache/kafka",
    "aerospike": "aerospike/aerospike-server",
    "prometheus": "prom/prometheus",
}
LONG_RUNNING = ("kafka", "aerospike", "refresher", "prometheus")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(SERVICE_CONFIG, env={})


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume entry."""
    out = []
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        out.append((source, target))
    return out


def _bind_source(service: dict[str, Any], target: str) -> Path:
    for source, tgt in _mounts(service):
        if tgt == target and source.startswith("./"):
            return ROOT / source
    raise AssertionError(f"nothing from the repo is mounted at {target}")


def _published(service: dict[str, Any]) -> dict[int, str]:
    """container port -> host part of each short-syntax port entry."""
    out = {}
    for entry in service.get("ports", []):
        host, _, container = str(entry).rpartition(":")
        out[int(container)] = host
    return out


def _aerospike_namespaces(text: str) -> dict[str, dict[str, str]]:
    """Top-level parameters of each `namespace NAME { ... }` block (one statement per line)."""
    namespaces: dict[str, dict[str, str]] = {}
    stack: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.endswith("{"):
            stack.append(line[:-1].strip())
            if len(stack) == 1 and stack[0].startswith("namespace "):
                namespaces[stack[0].split()[1]] = {}
        elif line == "}":
            stack.pop()
        elif len(stack) == 1 and stack[0].startswith("namespace "):
            key, _, value = line.partition(" ")
            namespaces[stack[0].split()[1]][key] = value.strip()
    assert not stack, f"unbalanced braces in the Aerospike config: {stack} left open"
    return namespaces


def test_compose_has_the_stack_and_only_escaped_dollars() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    services = yaml.safe_load(text)["services"]
    assert {"kafka", "aerospike", "refresher", "replay", "prometheus"} <= set(services)
    unescaped = re.findall(r"\$(?!\$)[^\n]{0,20}", text.replace("$$", ""))
    assert not unescaped, f"compose would interpolate these: {unescaped}"


def test_images_are_official_and_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service.get("image")
        assert image, f"service {name} has no image"
        repo, _, tag = image.rpartition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: {image}"
        if name in OFFICIAL_IMAGES:
            assert repo == OFFICIAL_IMAGES[name], f"{name} must use {OFFICIAL_IMAGES[name]}"
    assert services["kafka-init"]["image"] == services["kafka"]["image"]
    for name in ("refresher", "replay"):
        assert services[name]["build"]["context"] == "."
        assert services[name]["image"] == services["refresher"]["image"]


def test_kafka_runs_kraft_with_an_internal_listener(services: dict[str, dict[str, Any]]) -> None:
    env = _env(services["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    controller_port = listeners[controller].rpartition(":")[2]
    assert (
        env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:{controller_port}"
    )
    protocols = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) == set(protocols)
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert controller not in advertised
    assert advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]] == "kafka:9092"
    assert listeners[env["KAFKA_INTER_BROKER_LISTENER_NAME"]].endswith(":9092")
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert len(env["CLUSTER_ID"]) == 22
    # Host tools reach the HOST listener through the published port it advertises.
    host_listener = next(n for n, a in advertised.items() if a.startswith("localhost:"))
    container_port = int(listeners[host_listener].rpartition(":")[2])
    assert _published(services["kafka"])[container_port].endswith(":9092")


def test_topics_created_by_kafka_init_are_those_the_service_uses(
    services: dict[str, dict[str, Any]], cfg: Config
) -> None:
    init = services["kafka-init"]
    script_path = init["entrypoint"][-1]
    script = _bind_source(init, script_path).read_text(encoding="utf-8")
    created = {}
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["create"]:
            created[words[1]] = words[2:]
    kafka = cfg.kafka
    assert set(created) == {
        kafka.ad_topic,
        kafka.engagement_topic,
        kafka.head_state_topic,
        kafka.dead_letter_topic,
        "$RESULTS_TOPIC",  # only when set (kafka.results_topic is off here)
    }
    assert not cfg.kafka.create_topics  # kafka-init creates them; the service only checks
    # One head-state changelog partition per engagement partition.
    assert created[kafka.head_state_topic][:2] == created[kafka.engagement_topic][:2]
    # The topic settings are those the service uses when it creates a topic itself.
    settings = {
        kafka.ad_topic: "ad_topic",
        kafka.engagement_topic: "engagement_topic",
        kafka.head_state_topic: "head_state_topic",
        kafka.dead_letter_topic: "dead_letter_topic",
        "$RESULTS_TOPIC": "results_topic",
    }
    for topic, args in created.items():
        pairs = zip(args[1:], args[:-1], strict=True)
        configs = dict(a.split("=", 1) for a, flag in pairs if flag == "--config")
        assert configs == TOPIC_CONFIGS[settings[topic]], topic
    assert _env(init)["BOOTSTRAP"] == kafka.bootstrap_servers
    assert init["restart"] == "no"


def test_aerospike_config_is_mounted_and_allows_ttl_writes(
    services: dict[str, dict[str, Any]], cfg: Config
) -> None:
    aerospike = services["aerospike"]
    command = aerospike["command"]
    conf_path = command[command.index("--config-file") + 1]
    assert conf_path != "/etc/aerospike/aerospike.conf", "the entrypoint overwrites that file"
    namespaces = _aerospike_namespaces(_bind_source(aerospike, conf_path).read_text("utf-8"))
    namespace = urlparse(cfg.store.url).path.strip("/").split("/")[0]
    assert namespace in namespaces
    assert int(namespaces[namespace]["nsup-period"]) > 0, "TTL writes need nsup-period > 0"
    assert namespaces[namespace]["replication-factor"] == "1"
    data_dir = next(t for s, t in _mounts(aerospike) if not s.startswith("./"))
    assert data_dir == "/opt/aerospike/data"
    assert aerospike["ulimits"]["nofile"]["soft"] >= 15000


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck")
        assert check and check["test"][0] in {"CMD", "CMD-SHELL"}, f"{name} has no healthcheck"
        assert services[name]["restart"] == "unless-stopped"
    assert "asinfo -v status" in services["aerospike"]["healthcheck"]["test"][1]
    assert "kafka-broker-api-versions.sh" in services["kafka"]["healthcheck"]["test"][1]
    refresher_check = " ".join(services["refresher"]["healthcheck"]["test"])
    assert f"127.0.0.1:{METRICS_PORT}/healthz" in refresher_check


def test_depends_on_waits_for_health_or_completion(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert services[dep]["restart"] == "no"
            else:
                assert (name, condition) == ("prometheus", "service_started")
    refresher = services["refresher"]["depends_on"]
    assert refresher["kafka"]["condition"] == "service_healthy"
    assert refresher["aerospike"]["condition"] == "service_healthy"
    assert refresher["kafka-init"]["condition"] == "service_completed_successfully"
    for job in ("replay", "replay-engagements"):
        assert services[job]["profiles"] == ["replay"]
        assert services[job]["restart"] == "no"
        assert services[job]["depends_on"]["kafka-init"]["condition"] == (
            "service_completed_successfully"
        )


def test_volumes_are_declared_used_and_mounts_exist(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose["volumes"])
    used = set()
    for name, service in services.items():
        for source, _ in _mounts(service):
            if source.startswith("./"):
                assert (ROOT / source).is_file(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"
                used.add(source)
    assert used == declared
    assert {"kafka-data", "aerospike-data", "annstream-data", "prometheus-data"} <= declared
    refresher = dict((t, s) for s, t in _mounts(services["refresher"]))
    assert refresher["/var/lib/annstream"] == "annstream-data"
    assert refresher[CONFIG_IN_CONTAINER] == "./deploy/annstream.toml"


def test_ports_published_where_useful(services: dict[str, dict[str, Any]]) -> None:
    assert _published(services["aerospike"])[3000].endswith(":3000")
    assert _published(services["prometheus"])[9090].endswith(":9090")
    # A host port range, so that scaled replicas each get one.
    assert _published(services["refresher"])[METRICS_PORT].endswith(f":{METRICS_PORT}-9111")
    for job in ("kafka-init", "replay", "replay-engagements"):
        assert "ports" not in services[job]


def test_prometheus_scrapes_every_refresher_replica(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    flags = dict(f.split("=", 1) for f in prometheus["command"])
    config = yaml.safe_load(_bind_source(prometheus, flags["--config.file"]).read_text("utf-8"))
    (job,) = (j for j in config["scrape_configs"] if j["job_name"] == "annstream")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["refresher"] and sd["type"] == "A" and sd["port"] == METRICS_PORT
    assert dict((t, s) for s, t in _mounts(prometheus))[flags["--storage.tsdb.path"]] == (
        "prometheus-data"
    )


def _exported_names() -> set[str]:
    """Every sample name a service's /metrics can show (a fresh registry, histograms with
    their _bucket/_sum/_count, counters with _total)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(ServiceMetrics().render().decode()))
    names = {f.name for f in families} | {s.name for f in families for s in f.samples}
    return names | {f"{f.name}_total" for f in families if f.type == "counter"}


def test_alert_rules_parse_are_loaded_and_name_exported_metrics(
    services: dict[str, dict[str, Any]],
) -> None:
    prometheus = services["prometheus"]
    flags = dict(f.split("=", 1) for f in prometheus["command"])
    config = yaml.safe_load(_bind_source(prometheus, flags["--config.file"]).read_text("utf-8"))
    (rule_file,) = config["rule_files"]
    rules_doc = yaml.safe_load(_bind_source(prometheus, rule_file).read_text("utf-8"))
    rules = [r for group in rules_doc["groups"] for r in group["rules"]]
    names = {r["alert"] for r in rules}
    wanted_rules = (
        "ConsumerLagGrowing",
        "FreshnessP99High",
        "RecallBelowWarning",
        "RecallBelowTarget",
    )
    for wanted in (*wanted_rules, "StoreErrors"):
        assert f"Annstream{wanted}" in names
    exported = _exported_names() | {"up"}
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]")
        assert rule["labels"]["severity"] in {"page", "warn"}
        assert rule["annotations"]["summary"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]
        metrics = set(re.findall(r"\b((?:annstream|process)_[a-z_]+|up)\b", expr))
        assert metrics, rule["alert"]
        assert metrics <= exported, (rule["alert"], metrics - exported)


def test_service_config_points_at_the_compose_services(
    services: dict[str, dict[str, Any]], cfg: Config
) -> None:
    assert cfg.kafka.bootstrap_servers == "kafka:9092"
    store = urlparse(cfg.store.url)
    assert (store.scheme, store.hostname, store.port) == ("aerospike", "aerospike", 3000)
    assert store.path == "/annstream/neighbours"
    assert cfg.snapshot.dir.startswith("/var/lib/annstream/")
    assert cfg.service.metrics_port == METRICS_PORT
    assert (cfg.refresh.k, cfg.refresh.margin) == (100, 20)
    assert (cfg.index.nlist, cfg.index.nprobe) == (1024, 32)
    assert cfg.index.train_size >= 39 * cfg.index.nlist
    assert cfg.store.ttl_s == 0 and cfg.store.on_head_exit == "expire"
    assert cfg.service.shutdown_timeout_s < int(services["refresher"]["stop_grace_period"][:-1])
    for job in ("replay", "replay-engagements"):
        bootstrap = _env(services[job])["ANNSTREAM_KAFKA__BOOTSTRAP_SERVERS"]
        assert bootstrap == cfg.kafka.bootstrap_servers
    # Every table of the file is a real section, so load_config saw all of it.
    raw = tomllib.loads(SERVICE_CONFIG.read_text(encoding="utf-8"))
    assert set(raw) == {
        "kafka",
        "index",
        "snapshot",
        "drift",
        "heads",
        "refresh",
        "store",
        "service",
    }


def _dockerfile_env() -> dict[str, str]:
    """The ENV of the final image stage (`ENV K=V K2=V2`, one or more instructions)."""
    env: dict[str, str] = {}
    for instruction, rest in _dockerfile_stages()[-1]:
        if instruction == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(rest))
    return env


def _config_in_container(service: dict[str, Any]) -> Config:
    """What `annstream run` loads in this container: the file its command names (mounted from the
    repo, else the copy the image carries), then the image's and the service's ANNSTREAM_* vars."""
    command = service.get("command") or []
    path = command[command.index("--config") + 1]
    mounted = dict((t, s) for s, t in _mounts(service))
    if path in mounted:
        source = ROOT / mounted[path]
    else:
        copies = [r.split() for i, r in _dockerfile_stages()[-1] if i == "COPY"]
        (source,) = (ROOT / words[-2] for words in copies if words[-1] == path)
    return load_config(source, env={**_dockerfile_env(), **_env(service)})


def test_metrics_listen_where_prometheus_can_scrape_them(
    services: dict[str, dict[str, Any]],
) -> None:
    """Prometheus scrapes refresher:9108 from another container, so the service must listen on
    all interfaces of its own; 127.0.0.1 passes the in-container health check and nothing else."""
    refresher = services["refresher"]
    (cmd,) = (r for i, r in _dockerfile_stages()[-1] if i == "CMD")
    for cfg in (
        _config_in_container(refresher),
        _config_in_container({"command": json.loads(cmd)}),  # `docker run annstream:TAG`
    ):
        assert cfg.service.metrics_host == "0.0.0.0", (
            f"the container's metrics listen on {cfg.service.metrics_host}:"
            f"{cfg.service.metrics_port}, out of reach of Prometheus and of the published port"
        )
        assert cfg.service.metrics_port == METRICS_PORT
    expose = [r for i, r in _dockerfile_stages()[-1] if i == "EXPOSE"]
    assert expose == [str(METRICS_PORT)]
    assert METRICS_PORT in _published(refresher)


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def test_dockerfile_installs_the_project_and_runs_as_non_root(
    services: dict[str, dict[str, Any]],
) -> None:
    build, final = _dockerfile_stages()
    assert any(i == "RUN" and re.search(r"pip install \.$", r) for i, r in build)
    users = [r for i, r in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert ("ENTRYPOINT", '["annstream"]') in final
    assert ("CMD", f'["run", "--config", "{CONFIG_IN_CONTAINER}"]') in final
    assert services["refresher"]["command"] == ["run", "--config", CONFIG_IN_CONTAINER]
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text("utf-8"), re.M)
    assert base and base.group(1).startswith("python:3.11-slim")


def test_docker_context_holds_everything_the_build_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert ignore[ignore.index("*")] == "*", ".dockerignore is an allow-list"
    allowed = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    sources = []
    for stage in _dockerfile_stages():
        for instruction, rest in stage:
            if instruction == "COPY" and not rest.startswith("--from"):
                sources += [s.rstrip("/") for s in rest.split()[:-1]]
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
        assert source in allowed, f".dockerignore leaves {source} out of the build context"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {*wheel["packages"], *wheel["force-include"], "pyproject.toml"}
    needed.add(pyproject["project"]["readme"])
    assert needed <= set(sources), f"the build also needs {needed - set(sources)}"
