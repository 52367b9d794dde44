"""ansible/'s gateway role for a cluster of three gateway hosts: what it writes, and that it boots.

The role's own tasks run with the real ``ansible-playbook``: validate.yml (the checks) and
config.yml (.env, and on a cluster compose.site.yml and rabbitmq-cluster-nodes.conf), on hosts
reached through the local connection, each with its project directory in tmp_path. files.yml,
the copy of the project (unchanged by the cluster, and a minute for three hosts), is left out:
each project directory gets docker-compose.yml, gateway/ and pipeline/ from the repository.

- three hosts and a single one in one run: per host, .env (mode 0600, the cookie on cluster
  hosts only), the node list, and the project as ``docker compose config`` reads it (the
  compose CLI plugin parses without a daemon): the node's hostname and name, extra_hosts,
  epmd / inter-node / AMQP published on the host's cluster address, PostgreSQL and the pipeline
  on the primary only, and the primary's pipeline given all three nodes; a second run changes
  nothing;
- the role refuses two hosts, a placeholder cookie, and node names that mix short and long;
- as root: three hosts named by the addresses of a RabbitCluster's nodes (network namespaces,
  tests/harness/rabbit_cluster.py); the cluster booted with the node list and the cookie the
  role wrote forms, and every quorum queue has the three nodes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness.procs import REPO
from tests.harness.rabbit_cluster import QUEUES, RabbitCluster, free_subnet

pytestmark = [pytest.mark.system, pytest.mark.slow]

ANSIBLE_DIR = REPO / "ansible"
BIN = Path(sys.executable).parent
SECRETS = (
    "rabbitmq_admin",
    "pipeline_amqp",
    "postgres",
    "migrate_db",
    "pipeline_db",
    "reader_db",
    "grafana_admin",
)
COOKIE_LINE = re.compile(r"^RABBITMQ_CLUSTER_COOKIE='([^']*)'$", re.M)
NODE_LINE = re.compile(r"^cluster_formation\.classic_config\.nodes\.(\d+) = (\S+)$", re.M)
PRIMARY_ONLY = {"postgres", "db-roles", "migrate", "pipeline"}

RENDER_PLAYBOOK = """\
- name: The gateway role's checks and settings
  hosts: {hosts}
  gather_facts: false
  tasks:
    - name: Check the settings and the secrets
      ansible.builtin.include_role:
        name: gateway
        tasks_from: validate.yml
{config}"""
CONFIG_TASK = """\
    - name: Write the project's settings
      ansible.builtin.include_role:
        name: gateway
        tasks_from: config.yml
"""


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the role writes its files as root:root (CI runs as root)")


def _ansible_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_ROLES_PATH=str(ANSIBLE_DIR / "roles"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_LOCALHOST_WARNING="false",
    )
    return env


def _recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines as {host: {"ok": n, "changed": n, ...}}."""
    recap: dict[str, dict[str, int]] = {}
    for line in output.split("PLAY RECAP", 1)[-1].splitlines():
        match = re.match(r"^(\S+)\s*:\s*(.*)$", line.strip())
        if match and "=" in match.group(2):
            counts = dict(re.findall(r"(\w+)=(\d+)", match.group(2)))
            recap[match.group(1)] = {key: int(value) for key, value in counts.items()}
    return recap


def _vault() -> dict[str, Any]:
    """Random real-looking secrets, as a vault holds them (the cookie is per test)."""
    values: dict[str, Any] = {
        f"vault_gateway_{name}_password": f"{name}-{secrets.token_hex(8)}" for name in SECRETS
    }
    values["tempmon_mqtt_passwords"] = {"pi-test": secrets.token_hex(12)}
    return values


def _local(project: Path, **host_vars: Any) -> dict[str, Any]:
    return {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "gateway_project_dir": str(project),
        **host_vars,
    }


def _render(
    tmp_path: Path,
    groups: dict[str, dict[str, Any]],
    *,
    hosts: str = "gateway",
    config: bool = True,
    expect_ok: bool = True,
) -> str:
    """Run validate.yml (and config.yml) of the role on the inventory ``groups``."""
    inventory = tmp_path / "inventory.json"
    inventory.write_text(
        json.dumps(
            {
                "all": {
                    "children": {
                        **groups,
                        # Never contacted: the role only reads the edge group's node ids.
                        "edge": {"hosts": {"pi-test": {}}},
                    }
                }
            }
        ),
        encoding="utf-8",
    )
    extra = tmp_path / "vault.json"
    if not extra.exists():
        extra.write_text(json.dumps(_vault()), encoding="utf-8")
    playbook = tmp_path / "render.yml"
    playbook.write_text(
        RENDER_PLAYBOOK.format(hosts=hosts, config=CONFIG_TASK if config else ""),
        encoding="utf-8",
    )
    done = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), "-e", f"@{extra}", str(playbook)],
        cwd=ANSIBLE_DIR,
        env=_ansible_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout + done.stderr
    if expect_ok:
        assert done.returncode == 0, f"ansible-playbook failed:\n{output}"
    else:
        assert done.returncode != 0, f"ansible-playbook should have failed:\n{output}"
    return output


def _project(directory: Path) -> Path:
    """A project directory as files.yml leaves it, from the repository's files."""
    directory.mkdir(parents=True)
    shutil.copy2(REPO / "docker-compose.yml", directory / "docker-compose.yml")
    for name in ("gateway", "pipeline"):
        (directory / name).symlink_to(REPO / name, target_is_directory=True)
    return directory


def _compose_config(project: Path, *files: str) -> dict[str, Any]:
    """The project as ``docker compose config`` reads it (with the project's .env only)."""
    argv = [
        "docker",
        "compose",
        *(a for f in files for a in ("-f", f)),
        "config",
        "--format",
        "json",
    ]
    # Only the project's .env: a variable of this shell would take precedence over it.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
    done = subprocess.run(
        argv, cwd=project, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"{' '.join(argv)} in {project}: {done.stderr}"
    return dict(json.loads(done.stdout))


def _cookie(env_file: Path) -> str | None:
    found = COOKIE_LINE.findall(env_file.read_text(encoding="utf-8"))
    assert len(found) <= 1, env_file
    return found[0] if found else None


def _nodes(nodes_file: Path) -> list[str]:
    """The node names of a rendered node list, in the order of their keys."""
    lines = NODE_LINE.findall(nodes_file.read_text(encoding="utf-8"))
    assert [int(n) for n, _ in lines] == list(range(1, len(lines) + 1)), lines
    return [name for _, name in lines]


@pytest.fixture(scope="module")
def compose_cli() -> None:
    done = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"docker compose (v2) is missing, run tests/setup.sh: {done.stderr}")


# --- three hosts and a single one -------------------------------------------------------------


@pytest.mark.usefixtures("compose_cli")
def test_three_hosts_and_a_single_one(tmp_path: Path) -> None:
    _need_root()
    cookie = secrets.token_hex(24)
    projects = {name: _project(tmp_path / name) for name in ("gw-1", "gw-2", "gw-3", "solo")}
    # gw-1 by its ansible_host, gw-2 by gateway_cluster_address (its ansible_host is a name),
    # gw-3 on IPv6 with AMQP on another port.
    addresses = {"gw-1": "192.0.2.11", "gw-2": "192.0.2.12", "gw-3": "2001:db8::13"}
    groups: dict[str, dict[str, Any]] = {
        "gateway": {
            "hosts": {
                "gw-1": _local(projects["gw-1"], ansible_host="192.0.2.11"),
                "gw-2": _local(
                    projects["gw-2"],
                    ansible_host="gw-2.example.org",
                    gateway_cluster_address="192.0.2.12",
                ),
                "gw-3": _local(
                    projects["gw-3"], gateway_cluster_address="2001:db8::13", gateway_amqp_port=5673
                ),
            },
            "vars": {"vault_gateway_rabbitmq_cluster_cookie": cookie},
        },
        # An inventory of one gateway, as before the cluster: no cookie in its vault.
        "solo": {"hosts": {"solo": _local(projects["solo"], gateway_cluster_group="solo")}},
    }
    first = _recap(_render(tmp_path, groups, hosts="gateway:solo"))
    assert set(first) == {"gw-1", "gw-2", "gw-3", "solo"}, first
    second = _recap(_render(tmp_path, groups, hosts="gateway:solo"))
    assert all(counts["changed"] == 0 for counts in second.values()), second

    # .env: only the root can read it; the cookie on the cluster's hosts only.
    for name, project in projects.items():
        info = (project / ".env").stat()
        assert (info.st_mode & 0o777, info.st_uid) == (0o600, 0), name
        assert _cookie(project / ".env") == (None if name == "solo" else cookie), name

    # The single gateway: no override, no node list, compose as before.
    assert not (projects["solo"] / "compose.site.yml").exists()
    assert not (projects["solo"] / "rabbitmq-cluster-nodes.conf").exists()
    solo = _compose_config(projects["solo"], "docker-compose.yml")
    assert set(solo["services"]) >= PRIMARY_ONLY
    assert solo["services"]["rabbitmq"]["hostname"] == "rabbitmq"
    base_preflight = solo["services"]["preflight"]["command"]

    # The node list: the same file everywhere, the primary first.
    names = ["rabbit@gw-1", "rabbit@gw-2", "rabbit@gw-3"]
    lists = {(projects[h] / "rabbitmq-cluster-nodes.conf").read_text() for h in addresses}
    assert len(lists) == 1
    assert _nodes(projects["gw-1"] / "rabbitmq-cluster-nodes.conf") == names
    assert (projects["gw-1"] / "rabbitmq-cluster-nodes.conf").stat().st_mode & 0o777 == 0o644

    for name, address in addresses.items():
        project = projects[name]
        config = _compose_config(project, "docker-compose.yml", "compose.site.yml")
        services = config["services"]
        rabbit = services["rabbitmq"]
        assert rabbit["hostname"] == name
        assert rabbit["environment"]["RABBITMQ_NODENAME"] == f"rabbit@{name}"
        assert rabbit["environment"]["RABBITMQ_USE_LONGNAME"] == "false"
        # Interpolated from the .env the role wrote.
        assert rabbit["environment"]["RABBITMQ_CLUSTER_COOKIE"] == cookie
        assert sorted(rabbit["extra_hosts"]) == sorted(
            f"{other}={addresses[other]}" for other in addresses if other != name
        )
        published = {(p["target"], p.get("host_ip"), p["published"]) for p in rabbit["ports"]}
        amqp_port = "5673" if name == "gw-3" else "5672"
        assert {
            (4369, address, "4369"),
            (25672, address, "25672"),
            (5672, address, amqp_port),
            # docker-compose.yml's: MQTT for the Pis, AMQP and the UI on loopback.
            (1883, None, "1883"),
            (5672, "127.0.0.1", amqp_port),
            (15672, "127.0.0.1", "15672"),
        } == published, name
        mounts = {v["target"]: v.get("source") for v in rabbit["volumes"]}
        assert mounts["/etc/rabbitmq/conf.d/30-cluster.conf"].endswith(
            "gateway/rabbitmq/cluster.conf"
        )
        assert mounts["/etc/rabbitmq/conf.d/35-cluster-nodes.conf"] == str(
            project / "rabbitmq-cluster-nodes.conf"
        )
        assert mounts["/etc/rabbitmq/gateway/cluster.sh"].endswith("gateway/rabbitmq/cluster.sh")
        # The preflight checks what docker-compose.yml's does, and the cookie.
        assert services["preflight"]["command"] == [
            *base_preflight[:-1],
            "RABBITMQ_CLUSTER_COOKIE",
            base_preflight[-1],
        ]
        assert services["preflight"]["environment"]["RABBITMQ_CLUSTER_COOKIE"] == cookie
        if name == "gw-1":
            assert set(services) >= PRIMARY_ONLY, name
            urls = services["pipeline"]["environment"]["RABBITMQ_URL"].split(",")
            assert urls == [
                "amqp://rabbitmq:5672/%2F",
                "amqp://192.0.2.12:5672/%2F",
                "amqp://[2001:db8::13]:5673/%2F",
            ]
        else:
            assert set(services) == {"preflight", "rabbitmq"}, name


# --- what the role refuses ----------------------------------------------------------------------

REFUSALS = {
    "two-hosts": (["gw-1", "gw-2"], {}, "a RabbitMQ cluster of two nodes loses its"),
    "placeholder-cookie": (
        ["gw-1", "gw-2", "gw-3"],
        {"vault_gateway_rabbitmq_cluster_cookie": "example-not-a-secret-cookie"},
        "vault_gateway_rabbitmq_cluster_cookie (gateway_rabbitmq_cluster_cookie) must be set",
    ),
    "no-cookie": (
        ["gw-1", "gw-2", "gw-3"],
        {},
        "vault_gateway_rabbitmq_cluster_cookie (gateway_rabbitmq_cluster_cookie) must be set",
    ),
    "short-and-long-names": (
        ["gw-1", "gw-2", "gw-3.example.org"],
        {"vault_gateway_rabbitmq_cluster_cookie": secrets.token_hex(24)},
        "either every node's has a dot",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_the_role_refuses(tmp_path: Path, case: str) -> None:
    names, group_vars, message = REFUSALS[case]
    hosts = {
        name: _local(tmp_path / name, gateway_cluster_address=f"192.0.2.{11 + i}")
        for i, name in enumerate(names)
    }
    output = _render(
        tmp_path, {"gateway": {"hosts": hosts, "vars": group_vars}}, config=False, expect_ok=False
    )
    assert message in " ".join(output.split()), output
    # Nothing was written.
    assert not any((tmp_path / name).exists() for name in names)


# --- the rendered node list and cookie form a cluster -------------------------------------------


@pytest.mark.usefixtures("compose_cli")
def test_the_rendered_node_list_and_cookie_form_a_cluster(tmp_path: Path) -> None:
    """Node i of a RabbitCluster is rabbit@<subnet>.<i + 2>: the inventory's hosts are named so."""
    _need_root()
    subnet = free_subnet()
    hosts = [f"{subnet}.{i + 2}" for i in range(3)]
    cookie = secrets.token_urlsafe(30)
    projects = {host: _project(tmp_path / host) for host in hosts}
    groups = {
        "gateway": {
            # The inventory names are the node hosts, and the cluster addresses (the default).
            "hosts": {host: _local(projects[host]) for host in hosts},
            "vars": {"vault_gateway_rabbitmq_cluster_cookie": cookie},
        }
    }
    _render(tmp_path, groups)
    nodes_files = [projects[host] / "rabbitmq-cluster-nodes.conf" for host in hosts]
    assert len({f.read_text() for f in nodes_files}) == 1
    names = _nodes(nodes_files[0])
    assert names == [f"rabbit@{host}" for host in hosts]
    for host in hosts:
        assert _cookie(projects[host] / ".env") == cookie
        config = _compose_config(projects[host], "docker-compose.yml", "compose.site.yml")
        rabbit = config["services"]["rabbitmq"]
        assert rabbit["hostname"] == host
        # Dotted names: Erlang long names, as the harness runs its nodes.
        assert rabbit["environment"]["RABBITMQ_USE_LONGNAME"] == "true"
        assert rabbit["environment"]["RABBITMQ_NODENAME"] == f"rabbit@{host}"
        # An address needs no name resolution.
        assert "extra_hosts" not in rabbit

    with RabbitCluster(subnet=subnet, nodes_conf=nodes_files[0], cookie=cookie) as cluster:
        assert [node.nodename for node in cluster.nodes] == names
        for i in range(len(cluster.nodes)):
            assert cluster.running_nodes(via=i) == set(names)
        for queue in QUEUES:
            assert cluster.online_members(queue) == set(names), queue
