"""Packaging: each install pulls only its own dependencies, every version is pinned once, the
contract package is standard library only, and neither wing imports the other."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.harness.docker import _project_requirements
from tests.harness.procs import REPO

CONTRACT = "tempmon-contract"
# Import name -> source directory, for the three packages of this repository.
PACKAGES = {
    "tempmon_contract": REPO / "contract" / "src" / "tempmon_contract",
    "edge_agent": REPO / "edge" / "src" / "edge_agent",
    "pipeline": REPO / "pipeline" / "src" / "pipeline",
}


def _project(package: str) -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((REPO / package / "pyproject.toml").read_text())[
        "project"
    ]
    return project


def _deps(package: str) -> list[str]:
    project = _project(package)
    deps = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        deps.extend(extra)
    return deps


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", requirement)
    assert match
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


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
    project = _project("edge")
    base = {_name(d) for d in project["dependencies"]}
    extras = {
        extra: {_name(d) for d in deps}
        for extra, deps in project.get("optional-dependencies", {}).items()
    }
    assert base == {CONTRACT, "paho-mqtt"}
    # The `pi` extra: gpiozero (CPU sensor, LED), the Adafruit drivers of the DHT22 and the
    # BME280, and adafruit-extended-bus (a BME280 on an I2C bus other than the board's).
    assert extras == {
        "pi": {
            "gpiozero",
            "adafruit-circuitpython-dht",
            "adafruit-circuitpython-bme280",
            "adafruit-extended-bus",
        }
    }


def test_pipeline_pulls_no_edge_libraries() -> None:
    names = {_name(d) for d in _deps("pipeline")}
    assert names == {CONTRACT, "pika", "sqlalchemy", "psycopg", "prometheus-client", "msgspec"}


def test_contract_depends_on_nothing() -> None:
    assert _project("contract")["dependencies"] == []
    assert "optional-dependencies" not in _project("contract")


@pytest.mark.parametrize("package", ["contract", "edge", "pipeline"])
def test_every_dependency_is_pinned_in_constraints(package: str) -> None:
    pins = _pins()
    for dep in _deps(package):
        assert _name(dep) in pins, f"{dep} is not pinned in constraints.txt"


@pytest.mark.parametrize("package", ["edge", "pipeline"])
def test_the_wings_require_the_contract_version_of_this_checkout(package: str) -> None:
    """constraints.txt, each wing's dependency and contract/pyproject.toml name one version."""
    version = _project("contract")["version"]
    assert _pins()[CONTRACT] == version, (
        f"constraints.txt pins {CONTRACT}=={_pins()[CONTRACT]}, "
        f"contract/pyproject.toml says {version}"
    )
    wanted = [d for d in _project(package)["dependencies"] if _name(d) == CONTRACT]
    assert wanted == [f"{CONTRACT}=={version}"], f"{package}/pyproject.toml: {wanted}"


def test_the_contract_reports_its_own_version() -> None:
    import tempmon_contract  # noqa: PLC0415 - the test is about this import

    assert tempmon_contract.__version__ == _project("contract")["version"]


def test_the_image_wheelhouse_never_fetches_our_own_packages() -> None:
    """tests/harness/docker.py downloads wheels from the index for the stand-in images: never
    tempmon-contract (a name on an index could be anyone's); the images install it from contract/.
    """
    names = {_name(r) for r in _project_requirements()}
    assert CONTRACT not in names
    assert {"edge-agent", "tempmon-pipeline"}.isdisjoint(names)
    # What pip needs to build contract/, edge/ and pipeline/ offline is there.
    assert {"setuptools", "paho-mqtt", "pika"} <= names


@pytest.mark.parametrize(
    ("dockerfile", "package"), [("edge/Dockerfile", "edge"), ("pipeline/Dockerfile", "pipeline")]
)
def test_images_install_the_contract_from_the_checkout(dockerfile: str, package: str) -> None:
    """contract/ is copied and given on the same pip command line as the wing (pip then takes
    tempmon-contract from it); the compose build context lets contract/ in."""
    text = (REPO / dockerfile).read_text()
    assert re.search(r"(?m)^COPY contract/ \S*contract/$", text), f"{dockerfile}: no COPY contract/"
    install = " ".join(re.findall(r"pip install[^\n]*", text.replace("\\\n", " ")))
    assert re.search(rf"\S*contract\s+\S*{package}\b", install), f"{dockerfile}: {install!r}"
    allowed = (REPO / ".dockerignore").read_text().splitlines()
    assert "!contract/" in allowed


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


# Imports every module of one package in a fresh interpreter and prints, as JSON, the top-level
# names of the modules that importing them added to sys.modules (what the interpreter and site
# loaded before, editable-install finders included, does not count).
_IMPORT_ALL = """
import importlib, json, pkgutil, sys
name = sys.argv[1]
before = set(sys.modules)
package = importlib.import_module(name)
failed = {}
for info in pkgutil.walk_packages(package.__path__, name + "."):
    if info.name.endswith(".__main__"):  # runs the CLI when imported
        continue
    try:
        importlib.import_module(info.name)
    except Exception as exc:
        failed[info.name] = repr(exc)
added = sorted({m.split(".")[0] for m in set(sys.modules) - before})
print(json.dumps({"added": added, "failed": failed}))
"""


def _import_all(package: str) -> tuple[set[str], dict[str, str]]:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, package],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO / "tests",  # not the repository's root: no stray package by the same name
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return set(result["added"]), dict(result["failed"])


def _imported_names(source_dir: Path) -> dict[str, set[str]]:
    """Top-level names each module imports, wherever the import statement is (a lazy import in a
    function counts too); relative imports are the package's own and left out."""
    found: dict[str, set[str]] = {}
    for path in sorted(source_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


def test_the_contract_imports_only_the_standard_library() -> None:
    added, failed = _import_all("tempmon_contract")
    assert not failed, f"tempmon_contract modules that do not import: {failed}"
    foreign = added - set(sys.stdlib_module_names) - {"tempmon_contract"}
    assert not foreign, f"importing tempmon_contract loaded {sorted(foreign)}"
    for module, names in _imported_names(PACKAGES["tempmon_contract"]).items():
        foreign = names - set(sys.stdlib_module_names) - {"__future__", "tempmon_contract"}
        assert not foreign, f"{module} imports {sorted(foreign)}: the contract is stdlib only"


@pytest.mark.parametrize(
    ("wing", "other"), [("edge_agent", "pipeline"), ("pipeline", "edge_agent")]
)
def test_neither_wing_imports_the_other(wing: str, other: str) -> None:
    """Every module of one wing imports (its hardware libraries lazily), and neither at import
    time nor in any function does it import the other wing: what they share is the contract."""
    added, failed = _import_all(wing)
    assert not failed, f"{wing} modules that do not import: {failed}"
    assert other not in added, f"importing every module of {wing} loaded {other}"
    assert "tempmon_contract" in added, f"{wing} does not use the contract package"
    for module, names in _imported_names(PACKAGES[wing]).items():
        assert other not in names, f"{module} imports {other}"


def test_the_gateway_role_copies_everything_the_pipeline_image_builds_from() -> None:
    """ansible's gateway role copies a part of the checkout to the gateway host, where compose
    builds the pipeline image: every file or directory pipeline/Dockerfile COPYs must be in it."""
    import yaml  # noqa: PLC0415 - a test dependency (PyYAML), not a wing's

    role_vars = yaml.safe_load((REPO / "ansible/roles/gateway/vars/main.yml").read_text())
    copied = set(role_vars["gateway_project_files"]) | set(role_vars["gateway_project_dirs"])
    dockerfile = (REPO / "pipeline/Dockerfile").read_text(encoding="utf-8")
    sources = [
        source.rstrip("/")
        for line in dockerfile.splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for source in line.split()[1:-1]
    ]
    assert sources, "pipeline/Dockerfile copies nothing from the checkout?"
    assert set(sources) <= copied, f"the gateway role does not copy {set(sources) - copied}"
