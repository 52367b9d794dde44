"""Packaging: each install pulls only its own dependencies, and every version is pinned once."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.harness.procs import REPO


def _deps(package: str) -> list[str]:
    project = tomllib.loads((REPO / package / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        deps.extend(extra)
    return deps


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", requirement)
    assert match
    return match.group(0).lower().replace("_", "-")


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in (REPO / "constraints.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[_name(name)] = version
    return pins


def test_edge_agent_pulls_no_gateway_libraries() -> None:
    names = {_name(d) for d in _deps("edge")}
    assert names == {"paho-mqtt", "gpiozero", "adafruit-circuitpython-dht"}


def test_pipeline_pulls_no_edge_libraries() -> None:
    names = {_name(d) for d in _deps("pipeline")}
    assert names == {"pika", "sqlalchemy", "psycopg", "prometheus-client", "msgspec"}


@pytest.mark.parametrize("package", ["edge", "pipeline"])
def test_every_dependency_is_pinned_in_constraints(package: str) -> None:
    pins = _pins()
    for dep in _deps(package):
        assert _name(dep) in pins, f"{dep} is not pinned in constraints.txt"


@pytest.mark.parametrize(
    ("script", "name"), [("edge-agent", "edge-agent"), ("pipeline", "pipeline")]
)
def test_console_scripts_answer_version_and_help(script: str, name: str) -> None:
    exe = Path(sys.executable).with_name(script)
    assert exe.exists(), f"console script {script} is not installed next to {sys.executable}"
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert re.fullmatch(rf"{name} \d+\.\d+\.\d+\S*\n", version.stdout)
    helped = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert helped.stdout.startswith(f"usage: {name}")


def test_edge_agent_imports_without_gateway_libraries() -> None:
    """Importing the agent must not drag in SQLAlchemy, pika or psycopg."""
    code = (
        "import sys, edge_agent, edge_agent.cli; "
        "bad = {'sqlalchemy', 'pika', 'psycopg'} & set(sys.modules); "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
