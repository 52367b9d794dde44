"""docker-compose.yml, checked by a real Compose parser (no Docker engine runs here).

The file is interpolated the way `docker compose config` does (with .env.example's values),
parsed and validated by compose-spec (the Rust compose_spec crate), then held to what the
gateway needs: console scripts that exist, mounted files that exist, health conditions,
profiles and no secrets.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyOptions

from tests.harness.procs import REPO

COMPOSE = REPO / "docker-compose.yml"
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?|-|\?)([^}]*))?\}")


def env_example() -> dict[str, str]:
    env = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def interpolate(text: str, env: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name, "")
        if op in (":?", "?") and not value:
            raise ValueError(f"required variable {name} is missing: {arg}")
        if op in (":-", "-") and not value:
            return arg
        return value

    return _VAR.sub(sub, text)


def parsed(env: dict[str, str] | None = None) -> Any:
    options = PyOptions()
    options.apply_merge = True
    return options.from_yaml(interpolate(COMPOSE.read_text(), env or env_example()))


def raw() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(interpolate(COMPOSE.read_text(), env_example()))
    return data


def scripts(package: str) -> set[str]:
    project = tomllib.loads((REPO / package / "pyproject.toml").read_text())["project"]
    return set(project["scripts"])


def test_the_compose_parser_accepts_the_file() -> None:
    compose = parsed()
    assert set(compose.service_names()) == {
        "preflight",
        "rabbitmq",
        "postgres",
        "db-roles",
        "migrate",
        "pipeline",
        "edge-demo-1",
        "edge-demo-2",
        "edge-demo-3",
        "grafana",
    }


def test_required_secrets_are_enforced() -> None:
    env = env_example()
    del env["POSTGRES_PASSWORD"]
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        parsed(env)


def test_every_command_is_a_console_script_of_its_image() -> None:
    compose = parsed()
    for name in compose.service_names():
        service = compose.get_service(name)
        if service.build is None:
            continue
        package = Path(service.build.dockerfile).parts[0]
        assert service.command[0] in scripts(package), f"{name}: {service.command}"


def test_every_mounted_path_exists() -> None:
    for name, service in raw()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
    rabbit = raw()["services"]["rabbitmq"]
    assert "sh" in rabbit["command"][0]
    assert any(v.endswith("/etc/rabbitmq/gateway/start.sh:ro") for v in rabbit["volumes"])


def test_health_conditions_order_the_start() -> None:
    services = raw()["services"]
    for name in ("rabbitmq", "postgres", "pipeline"):
        assert "healthcheck" in services[name], name
    assert "check_port_connectivity" in " ".join(services["rabbitmq"]["healthcheck"]["test"])
    depends = services["pipeline"]["depends_on"]
    assert depends["rabbitmq"]["condition"] == "service_healthy"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert services["db-roles"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert (
        services["migrate"]["depends_on"]["db-roles"]["condition"]
        == "service_completed_successfully"
    )
    # Nothing starts before the preflight refused or passed the passwords.
    for name in ("rabbitmq", "postgres", "grafana"):
        condition = services[name]["depends_on"]["preflight"]["condition"]
        assert condition == "service_completed_successfully", name
    assert services["pipeline"]["deploy"]["replicas"] == 2
    assert services["pipeline"]["restart"] == "unless-stopped"


def test_profiles() -> None:
    services = raw()["services"]
    core = {"preflight", "rabbitmq", "postgres", "db-roles", "migrate", "pipeline"}
    for name in core:
        assert "profiles" not in services[name], name
    for n in (1, 2, 3):
        demo = services[f"edge-demo-{n}"]
        assert demo["profiles"] == ["demo"]
        assert demo["environment"]["EDGE_NODE_ID"] == f"demo-{n}"
        assert demo["command"] == ["edge-agent", "run", "--simulate"]
    assert services["grafana"]["profiles"] == ["dashboards"]


def test_no_secret_is_written_in_the_file() -> None:
    text = COMPOSE.read_text()
    for line in text.splitlines():
        if re.search(r"(PASSWORD|PASS|SECRET)\w*\s*:", line):
            value = line.split(":", 1)[1].strip()
            assert value.startswith("${") or value == "", f"literal secret: {line.strip()}"
    for key, value in env_example().items():
        if "PASSWORD" in key:
            assert value in ("", "change-me"), key
    assert ".env" in (REPO / ".gitignore").read_text().split()


@pytest.mark.parametrize("dockerfile", ["pipeline/Dockerfile", "edge/Dockerfile"])
def test_images_are_slim_multi_stage_and_not_root(dockerfile: str) -> None:
    text = (REPO / dockerfile).read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(stages) == 2
    assert all(s.endswith("-slim") or " AS " in s for s in stages)
    final = text.split("\nFROM ")[-1]
    assert re.search(r"^USER (?!root)\S+", final, re.MULTILINE)
    assert "--no-cache-dir" in text
    assert "apt-get" not in final
    assert "gcc" not in final
    assert "COPY --from=build /opt/venv /opt/venv" in final


def test_grafana_reads_as_the_read_only_role() -> None:
    source = yaml.safe_load(
        (REPO / "gateway/grafana/provisioning/datasources/postgres.yml").read_text()
    )["datasources"][0]
    assert source["user"] == "$READER_DB_USER"
    assert source["secureJsonData"]["password"] == "$READER_DB_PASSWORD"
