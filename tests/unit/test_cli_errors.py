"""A failed command prints one line, `annstream CMD: error: ...`, exits 2, and shows no secret and
no traceback: bad values, bad client settings, an unreachable broker or store, secrets in URLs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from annstream.cli import main

SECRET = "PW-s3cr3t,tail=more"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path, extra: str = "", bootstrap: str = "") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[kafka]\nbootstrap_servers = "{bootstrap or f"127.0.0.1:{_free_port()}"}"\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "n.db"}"\n'
        f'[snapshot]\ndir = "{tmp_path / "snap"}"\n' + extra
    )
    return path


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The error line of a command that must fail with exit code 2."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "s3cr3t" not in err and "tail=more" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"annstream {argv[0]}: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        (
            '[index]\nmetric = "cosinee"\n',
            "annstream run: error: index.metric = 'cosinee': use one of cosine, ip, l2",
        ),
        ("[refresh]\nk = -5\n", "annstream run: error: refresh.k = -5: must be > 0"),
        ("[index]\nnlist = 0\n", "annstream run: error: index.nlist = 0: must be > 0"),
        (
            f"[kafka]\nclient = ['sasl.password={SECRET}']\n",
            "expected a table of settings for kafka.client, got a list",
        ),
        (
            f"[store]\npassword = ['{SECRET}']\n",
            "expected a string for store.password, got a list",
        ),
    ],
)
def test_bad_values_fail_before_connecting_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, line: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    assert capsys.readouterr().err == ""
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.endswith(line + "\n") and err.count("\n") == 1
    assert "s3cr3t" not in err


def test_a_client_setting_librdkafka_refuses_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, f'[kafka.client]\n"sasl.pasword" = "{SECRET}"\n')
    line = _fails(capsys, "run", "--config", str(path))
    assert 'No such configuration property: "sasl.pasword"' in line
    assert "[kafka.client]" in line


def test_a_client_value_with_commas_goes_in_its_own_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANNSTREAM_KAFKA__CLIENT", f"sasl.mechanisms=PLAIN,sasl.password={SECRET}")
    line = _fails(capsys, "run", "--config", str(_config(tmp_path)))
    assert "ANNSTREAM_KAFKA__CLIENT__SASL_PASSWORD" in line
    monkeypatch.delenv("ANNSTREAM_KAFKA__CLIENT")
    monkeypatch.setenv("ANNSTREAM_KAFKA__CLIENT__SASL_PASSWORD", SECRET)
    monkeypatch.setenv("ANNSTREAM_KAFKA__CLIENT__SASL_PASWORD", SECRET)
    line = _fails(capsys, "run", "--config", str(_config(tmp_path)))
    assert 'No such configuration property: "sasl.pasword"' in line


@pytest.mark.slow
def test_an_unreachable_broker_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _fails(capsys, "run", "--config", str(_config(tmp_path)))
    assert line.startswith("annstream run: error: Kafka: ")
    assert "kafka.bootstrap_servers" in line


@pytest.mark.parametrize(
    "url",
    [
        f"aerospike://admin:{SECRET}@127.0.0.1/ns/set",  # no port: a bad seed
        f"aerospike://admin:{SECRET}@127.0.0.1:{_free_port()}/ns/set",  # nothing listens
    ],
)
def test_lookup_never_prints_the_store_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[store]\nretries = 0\ntimeout_ms = 200\n")
    line = _fails(capsys, "lookup", "1", "--store", url, "--config", str(path))
    assert "admin:***@127.0.0.1" in line


def test_lookup_never_prints_a_password_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANNSTREAM_STORE__URL", "aerospike://admin:zz-pw-42@127.0.0.1/ns/set")
    line = _fails(capsys, "lookup", "1")
    assert "zz-pw-42" not in line and "127.0.0.1" in line


def test_the_installed_command_prints_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[index]\nnlist = 0\nmetric = 'cosinee'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANNSTREAM_")}
    proc = subprocess.run(
        [sys.executable, "-m", "annstream", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "annstream run: error: index.nlist = 0: must be > 0; "
        "index.metric = 'cosinee': use one of cosine, ip, l2\n"
    )
