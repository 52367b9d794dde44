"""ansible/: lint, syntax, the config.txt edit, broker users, and edge.yml for real in a chroot.

- ansible-lint (production profile) and --syntax-check of both playbooks;
- the edge role's config.txt edit on a table of files (no root needed);
- the gateway role's broker-user tasks against the tests' RabbitMQ: the same rights as users.sh;
- as root: a minimal Debian root of the host's suite, debootstrapped once and cached as a tarball
  in $TEMPMON_DEBOOTSTRAP_CACHE (default /var/cache/tempmon-tests/), extracted fresh for each
  example Pi; ansible/edge.yml runs against both through the chroot connection, twice (the second
  run and a --check run change nothing); then what a Pi would boot with is checked: the overlay
  line, the agent in its venv, the configuration as the service user reads it, the unit as
  systemd-analyze sees it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.harness import RabbitBroker
from tests.harness.debian import (
    debian_root,
    debootstrap_tarball,
    dpkg_architecture,
    host_suite,
    in_root,
)
from tests.harness.procs import REPO

ANSIBLE_DIR = REPO / "ansible"
EXAMPLE_INVENTORY = ANSIBLE_DIR / "inventory" / "example"
BIN = Path(sys.executable).parent
# python3-venv is left out on purpose: the role must install it (as on a fresh Pi OS Lite).
DEBOOTSTRAP_INCLUDE = "python3,systemd,ca-certificates"
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def _tool(name: str) -> str:
    path = BIN / name
    if not path.is_file():
        raise RuntimeError(f"{name} is not installed in {BIN}: run tests/run.sh")
    return str(path)


def _ansible_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_LOCALHOST_WARNING="false",
        PY_COLORS="0",
    )
    env.update(extra)
    return env


def _run(
    cmd: list[str],
    *,
    cwd: Path = ANSIBLE_DIR,
    env: dict[str, str] | None = None,
    timeout: float = 900,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=env or _ansible_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines as {host: {"ok": n, "changed": n, ...}}."""
    recap: dict[str, dict[str, int]] = {}
    for line in output.split("PLAY RECAP", 1)[-1].splitlines():
        match = re.match(r"^(\S+)\s*:\s*(.*)$", line.strip())
        if match and "=" in match.group(2):
            counts = dict(re.findall(r"(\w+)=(\d+)", match.group(2)))
            recap[match.group(1)] = {key: int(value) for key, value in counts.items()}
    return recap


def _playbook(args: list[str], env: dict[str, str] | None = None) -> str:
    result = _run([_tool("ansible-playbook"), *args], env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"ansible-playbook {' '.join(args)} failed:\n{output}"
    return output


# --- static checks --------------------------------------------------------------------------


@pytest.mark.slow
def test_ansible_lint_production_profile() -> None:
    result = _run([_tool("ansible-lint"), "--profile", "production"])
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"ansible-lint found problems:\n{output}"


@pytest.mark.parametrize("playbook", ["edge.yml", "gateway.yml"])
def test_playbook_syntax(playbook: str) -> None:
    result = _run(
        [_tool("ansible-playbook"), "-i", str(EXAMPLE_INVENTORY), "--syntax-check", playbook]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_vault_holds_only_placeholders() -> None:
    """The example secrets file is not loaded by Ansible and holds nothing that looks real."""
    example = EXAMPLE_INVENTORY / "group_vars" / "all" / "vault.yml.example"
    values = re.findall(r"^\s*[\w-]+:\s*(\S+)\s*$", example.read_text(encoding="utf-8"), re.M)
    assert values
    assert all(value.startswith("example-not-a-secret") for value in values), values
    assert "ansible-vault encrypt" in example.read_text(encoding="utf-8")


# --- the config.txt edit, on plain files (no root needed) --------------------------------------

# (name, current config.txt, 1-Wire GPIO, expected config.txt)
BOOT_CONFIGS = [
    ("empty", "", 4, "dtoverlay=w1-gpio,gpiopin=4\n"),
    ("no-sections", "dtparam=audio=on", 4, "dtparam=audio=on\ndtoverlay=w1-gpio,gpiopin=4\n"),
    (
        "last-is-filter",
        "a=1\n[all]\nb=2\n[pi4]\narm_boost=1\n",
        4,
        "a=1\n[all]\nb=2\n[pi4]\narm_boost=1\n[all]\ndtoverlay=w1-gpio,gpiopin=4\n",
    ),
    (
        "last-is-all",
        "[cm5]\ndtoverlay=dwc2\n[all]\ndtparam=i2c_arm=on\n",
        22,
        "[cm5]\ndtoverlay=dwc2\n[all]\ndtparam=i2c_arm=on\ndtoverlay=w1-gpio,gpiopin=22\n",
    ),
    ("raspi-config-line", "[all]\ndtoverlay=w1-gpio\n", 4, "[all]\ndtoverlay=w1-gpio\n"),
    (
        "only-under-a-filter",
        "[pi4]\ndtoverlay=w1-gpio,gpiopin=4\n",
        4,
        "[pi4]\ndtoverlay=w1-gpio,gpiopin=4\n[all]\ndtoverlay=w1-gpio,gpiopin=4\n",
    ),
    (
        "second-bus",
        "[all]\ndtoverlay=w1-gpio,gpiopin=4\n",
        22,
        "[all]\ndtoverlay=w1-gpio,gpiopin=4\ndtoverlay=w1-gpio,gpiopin=22\n",
    ),
]


# (name, current config.txt, expected config.txt): I2C for a BME280.
I2C_BOOT_CONFIGS = [
    ("empty", "", "dtparam=i2c_arm=on\n"),
    ("raspi-config-line", "[all]\ndtparam=i2c_arm=on\n", "[all]\ndtparam=i2c_arm=on\n"),
    ("alias-among-others", "dtparam=audio=on,i2c=on\n", "dtparam=audio=on,i2c=on\n"),
    (
        "with-baudrate",
        "[all]\ndtparam=i2c_arm=on,i2c_arm_baudrate=400000\n",
        "[all]\ndtparam=i2c_arm=on,i2c_arm_baudrate=400000\n",
    ),
    ("commented-out", "#dtparam=i2c_arm=on\n", "#dtparam=i2c_arm=on\ndtparam=i2c_arm=on\n"),
    (
        "turned-off-later",
        "dtparam=i2c_arm=on\ndtparam=i2c_arm=off\n",
        "dtparam=i2c_arm=on\ndtparam=i2c_arm=off\ndtparam=i2c_arm=on\n",
    ),
    ("another-bus", "dtparam=i2c_vc=on", "dtparam=i2c_vc=on\ndtparam=i2c_arm=on\n"),
    (
        "only-under-a-filter",
        "[pi4]\ndtparam=i2c_arm=on\n",
        "[pi4]\ndtparam=i2c_arm=on\n[all]\ndtparam=i2c_arm=on\n",
    ),
]


def _edit_boot_configs(
    tmp_path: Path, cases: dict[str, tuple[str, dict[str, object]]], task: str
) -> None:
    """Run one config.txt task file of the edge role on a local host per case, twice: the
    second run must change nothing. ``cases``: name -> (current config.txt, host variables)."""
    hosts: dict[str, dict[str, object]] = {}
    for name, (current, host_vars) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.txt").write_text(current, encoding="utf-8")
        hosts[name] = {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            # /boot/firmware first: it does not exist for these hosts, so the fallback is used.
            "edge_agent_boot_config_candidates": [
                str(tmp_path / name / "firmware" / "config.txt"),
                str(tmp_path / name / "config.txt"),
            ],
            # A local connection: the reboot module refuses it anyway, but never try.
            "edge_agent_reboot": False,
            **host_vars,
        }
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"all": {"hosts": hosts}}), encoding="utf-8")
    playbook = tmp_path / "boot-config.yml"
    playbook.write_text(
        "- name: Only a config.txt part of the edge role\n"
        "  hosts: all\n"
        "  gather_facts: false\n"
        "  tasks:\n"
        f"{task}",
        encoding="utf-8",
    )
    env = _ansible_env(ANSIBLE_ROLES_PATH=str(ANSIBLE_DIR / "roles"))
    first = _playbook(["-i", str(inventory), str(playbook)], env)
    # The handler is notified once per host that changed, and runs (skipped here) once.
    assert first.count("RUNNING HANDLER [edge_agent : Reboot to apply config.txt]") <= 1, first
    second = _recap(_playbook(["-i", str(inventory), str(playbook)], env))
    assert set(second) == set(hosts)
    assert all(counts["changed"] == 0 for counts in second.values()), second


@pytest.mark.slow
def test_onewire_overlay_goes_under_a_final_all_section(tmp_path: Path) -> None:
    cases = {
        name: (current, {"edge_agent_w1_gpio_pin": pin})
        for name, current, pin, _expected in BOOT_CONFIGS
    }
    _edit_boot_configs(
        tmp_path,
        cases,
        "    - name: Add the overlay\n"
        "      ansible.builtin.include_role:\n"
        "        name: edge_agent\n"
        "        tasks_from: onewire.yml\n",
    )
    for name, _current, _pin, expected in BOOT_CONFIGS:
        assert (tmp_path / name / "config.txt").read_text(encoding="utf-8") == expected, name


@pytest.mark.slow
def test_i2c_goes_under_a_final_all_section(tmp_path: Path) -> None:
    """The config.txt part of tasks/i2c.yml (the rest loads a kernel module: the chroot test)."""
    _edit_boot_configs(
        tmp_path,
        {name: (current, {}) for name, current, _expected in I2C_BOOT_CONFIGS},
        "    - name: Turn I2C on\n"
        "      ansible.builtin.include_role:\n"
        "        name: edge_agent\n"
        "        tasks_from: boot_config.yml\n"
        "      vars:\n"
        '        edge_agent_boot_line: "{{ edge_agent_i2c_line }}"\n'
        '        edge_agent_boot_line_regex: "{{ edge_agent_i2c_line_regex }}"\n'
        "        edge_agent_boot_line_for: a BME280\n",
    )
    for name, _current, expected in I2C_BOOT_CONFIGS:
        assert (tmp_path / name / "config.txt").read_text(encoding="utf-8") == expected, name


# --- the gateway's broker users, against the tests' real RabbitMQ ---------------------------------


def _permissions(rabbit: RabbitBroker, user: str) -> tuple[str, str, str]:
    """(vhost permissions, topic permissions, limits) of a user, without its name."""
    return (
        rabbit.ctl("list_user_permissions", user, "--no-table-headers"),
        rabbit.ctl("list_user_topic_permissions", user, "--no-table-headers"),
        rabbit.ctl("list_user_limits", "--user", user).replace(" ", ""),
    )


@pytest.mark.system
@pytest.mark.slow
def test_gateway_role_gives_a_node_exactly_the_rights_of_users_sh(
    rabbit: RabbitBroker, tmp_path: Path
) -> None:
    """The role's rabbitmq_user task, through the management API, equals `users.sh node`."""
    reference = rabbit.add_node("node-by-users-sh")
    password = secrets.token_urlsafe(12)
    inventory = tmp_path / "inventory.json"
    inventory.write_text(
        json.dumps(
            {
                "all": {
                    "hosts": {
                        "localhost": {
                            "ansible_connection": "local",
                            "ansible_python_interpreter": sys.executable,
                        }
                    },
                    # Never contacted: the gateway role only reads the edge group's node ids.
                    "children": {
                        "edge": {"hosts": {"pi-test": {"edge_agent_node_id": "node-by-ansible"}}}
                    },
                }
            }
        )
    )
    extra_vars = tmp_path / "vars.json"
    extra_vars.write_text(
        json.dumps(
            {
                "gateway_management_port": rabbit.management_port,
                "gateway_rabbitmq_admin_user": rabbit.admin.username,
                "gateway_rabbitmq_admin_password": rabbit.admin.password,
                "tempmon_mqtt_passwords": {"node-by-ansible": password},
            }
        )
    )
    playbook = tmp_path / "broker-users.yml"
    playbook.write_text(
        "- name: The gateway role's broker users\n"
        "  hosts: localhost\n"
        "  gather_facts: false\n"
        "  tasks:\n"
        "    - name: Create them\n"
        "      ansible.builtin.include_role:\n"
        "        name: gateway\n"
        "        tasks_from: broker_users.yml\n",
        encoding="utf-8",
    )
    env = _ansible_env(ANSIBLE_ROLES_PATH=str(ANSIBLE_DIR / "roles"))
    args = ["-i", str(inventory), "-e", f"@{extra_vars}", str(playbook)]
    try:
        first = _recap(_playbook(args, env))
        assert first["localhost"]["changed"] == 1, first
        second = _recap(_playbook(args, env))
        assert second["localhost"]["changed"] == 0, second
        assert _permissions(rabbit, "node-by-ansible") == _permissions(rabbit, reference.username)
        rabbit.ctl("authenticate_user", "node-by-ansible", password)
    finally:
        for user in ("node-by-ansible", reference.username):
            with contextlib.suppress(RuntimeError):
                rabbit.users("delete-node", user)


# --- the edge playbook in a real Debian root ----------------------------------------------------


def _host_debian() -> tuple[str, str]:
    """(suite, architecture) of this Debian host."""
    suite = host_suite()
    if suite is None:
        pytest.skip("the chroot test bootstraps the host's Debian suite; this is not Debian")
    return suite, dpkg_architecture()


def _account(root: Path, db: str, name: str) -> list[str]:
    for line in (root / "etc" / db).read_text(encoding="utf-8").splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    raise AssertionError(f"{name} is not in {db} of {root}")


def _mdwe_supported() -> bool:
    """Whether this kernel has PR_SET_MDWE, the kernel's own MemoryDenyWriteExecute (6.3+)."""
    code = (
        "import ctypes, sys; "
        f"sys.exit(ctypes.CDLL(None).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0))"
    )
    return subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


CONFIG_PROBE = """
import json, sys
from pathlib import Path
from edge_agent.config import load_config
c = load_config(Path("/etc/edge-agent/config.toml"), env={})
print(json.dumps({
    "node": c.node_id, "host": c.mqtt.host, "port": c.mqtt.port, "user": c.mqtt.username,
    "password": c.mqtt.password, "ca": str(c.mqtt.ca_file) if c.mqtt.ca_file else None,
    "outbox": str(c.outbox.path), "require_sync": c.clock.require_sync, "led": c.led_pin,
    "sensors": [[s.id, s.kind, s.device, s.pin, s.interval_s, s.offset_c, s.median_window,
                 s.settings.get("address")] for s in c.sensors],
}))
"""

# Imports and a ctypes callback under the kernel's W^X lock, as MemoryDenyWriteExecute=yes
# would run them.
MDWE_PROBE = f"""
import ctypes, os, sys
if ctypes.CDLL(None).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_MDWE) failed")
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
"""
MDWE_IMPORTS = (
    "import ctypes, sqlite3, ssl, paho.mqtt.client, edge_agent.agent, edge_agent.cli\n"
    "assert ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)(1) == 2\n"
    "import importlib.util as u\n"
    "if u.find_spec('gpiozero'):\n"
    "    import gpiozero, adafruit_dht, adafruit_bme280.basic\n"
)


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_edge_playbook_in_a_debian_chroot(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("debootstrap, chroot and mount need root (CI runs as root)")
    suite, arch = _host_debian()
    tarball = debootstrap_tarball(suite, arch, DEBOOTSTRAP_INCLUDE)
    version = tomllib.loads((REPO / "edge/pyproject.toml").read_text(encoding="utf-8"))["project"][
        "version"
    ]
    pins = dict(
        re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "constraints.txt").read_text(), re.M)
    )
    passwords = {"pi-kitchen": "kitchen-" + os.urandom(8).hex(), "pi-garage": os.urandom(12).hex()}
    ca_file = tmp_path / "mqtt-ca.pem"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\nplaceholder\n-----END CERTIFICATE-----\n")

    with contextlib.ExitStack() as stack:
        kitchen = stack.enter_context(debian_root(tarball, tmp_path / "pi-kitchen"))
        garage = stack.enter_context(debian_root(tarball, tmp_path / "pi-garage"))
        # A Pi image has config.txt: Bookworm's place with a model filter last for pi-kitchen,
        # the older /boot/config.txt (the fallback) with a final [all] for pi-garage.
        (kitchen / "boot/firmware").mkdir(parents=True)
        (kitchen / "boot/firmware/config.txt").write_text(
            "# Raspberry Pi configuration\ndtparam=audio=on\n\n[cm4]\notg_mode=1\n\n[pi4]\n"
            "arm_boost=1\n"
        )
        (garage / "boot/config.txt").write_text("dtparam=audio=on\n[all]\ndtoverlay=vc4-kms-v3d")
        # pi-kitchen was provisioned before contract/ existed: the agent's tree was the source
        # directory itself, and the fingerprint is of that layout.
        old_src = kitchen / "opt/edge-agent/src"
        (old_src / "src/edge_agent").mkdir(parents=True)
        (old_src / "pyproject.toml").write_text('[project]\nname = "edge-agent"\n')
        (old_src / "src/edge_agent/__init__.py").write_text("")
        (kitchen / "opt/edge-agent/.installed").write_text("0" * 64 + "\n")

        # The example inventory's Pis, reached through the chroot connection instead of SSH.
        inventory = tmp_path / "chroot-inventory.json"
        chroot_vars = {
            "ansible_connection": "community.general.chroot",
            "ansible_become": False,
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        inventory.write_text(
            json.dumps(
                {
                    "edge": {
                        "hosts": {
                            "pi-kitchen": {
                                "ansible_host": str(kitchen),
                                "tempmon_mqtt_tls_ca_file": str(ca_file),
                                "tempmon_mqtt_port": 8883,
                            },
                            "pi-garage": {"ansible_host": str(garage)},
                        },
                        "vars": {**chroot_vars, "vault_mqtt_passwords": passwords},
                    }
                }
            )
        )
        args = ["-i", str(EXAMPLE_INVENTORY), "-i", str(inventory), "--limit", "edge", "edge.yml"]
        # Pipelining, as ansible.cfg turns it on for SSH to a real Pi: each module runs from
        # its interpreter's stdin instead of being copied into the root, made executable, run
        # and removed (four chroot processes per task instead of one). No become in a chroot.
        env = _ansible_env(ANSIBLE_PIPELINING="True")
        first = _playbook(args, env)
        print(f"first run:\n{first[-1500:]}")
        # One reboot for pi-garage's 1-Wire overlay and I2C line together (and pi-kitchen's).
        assert first.count("RUNNING HANDLER [edge_agent : Reboot to apply config.txt]") == 1
        second = _playbook(args, env)
        recap = _recap(second)
        assert set(recap) == {"pi-kitchen", "pi-garage"}, second
        assert all(counts["changed"] == 0 for counts in recap.values()), second
        # A dry run on a provisioned Pi has nothing to report either.
        dry = _recap(_playbook([*args, "--check", "--diff"], env))
        assert all(counts["changed"] == 0 for counts in dry.values()), dry

        # The overlay, under a final [all] section.
        assert (
            (kitchen / "boot/firmware/config.txt")
            .read_text()
            .endswith("[pi4]\narm_boost=1\n[all]\ndtoverlay=w1-gpio,gpiopin=4\n")
        )
        assert (garage / "boot/config.txt").read_text() == (
            "dtparam=audio=on\n[all]\ndtoverlay=vc4-kms-v3d\ndtoverlay=w1-gpio,gpiopin=22\n"
            "dtparam=i2c_arm=on\n"
        )
        # I2C only where a BME280 is: i2c-dev loaded at boot (/dev/i2c-1).
        assert (garage / "etc/modules-load.d/i2c-dev.conf").read_text().endswith("\ni2c-dev\n")
        assert not (kitchen / "etc/modules-load.d/i2c-dev.conf").exists()
        assert "i2c_arm" not in (kitchen / "boot/firmware/config.txt").read_text()

        for root, node in ((kitchen, "pi-kitchen"), (garage, "pi-garage")):
            assert in_root(root, "/opt/edge-agent/bin/edge-agent", "--version").stdout.strip() == (
                f"edge-agent {version}"
            )
            # Installed with the repository's constraints.
            paho = in_root(
                root,
                "/opt/edge-agent/bin/python",
                "-c",
                "import importlib.metadata as m; print(m.version('paho-mqtt'))",
            )
            assert paho.stdout.strip() == pins["paho-mqtt"]
            # The contract package from the copied contract/, beside the agent's edge/ (on
            # pi-kitchen in place of the old layout's tree).
            contract = in_root(
                root,
                "/opt/edge-agent/bin/python",
                "-c",
                "import importlib.metadata as m, tempmon_contract as c; "
                "print(m.version('tempmon-contract'), c.__file__)",
            )
            assert contract.stdout.split()[0] == pins["tempmon-contract"]
            assert contract.stdout.split()[1].startswith("/opt/edge-agent/lib/")
            assert sorted(p.name for p in (root / "opt/edge-agent/src").iterdir()) == [
                "contract",
                "edge",
            ]

            # The service user, in gpio and i2c; the files only it (and root) can read.
            user = _account(root, "passwd", "edge-agent")
            group = _account(root, "group", "edge-agent")
            for device_group in ("gpio", "i2c"):
                members = _account(root, "group", device_group)
                assert "edge-agent" in members[3].split(","), members
            assert user[6] == "/usr/sbin/nologin"
            for path, mode in (
                ("etc/edge-agent", 0o750),
                ("etc/edge-agent/config.toml", 0o640),
                ("etc/edge-agent/mqtt-password", 0o640),
            ):
                info = (root / path).stat()
                assert (info.st_mode & 0o7777, info.st_uid, info.st_gid) == (
                    mode,
                    0,
                    int(group[2]),
                ), path
            assert (root / "etc/edge-agent/mqtt-password").read_text() == passwords[node]

            # The configuration, read by the agent's own parser as the service user.
            probe = in_root(
                root,
                "/opt/edge-agent/bin/python",
                "-I",
                "-c",
                CONFIG_PROBE,
                userspec=f"{user[2]}:{group[2]}",
            )
            config = json.loads(probe.stdout)
            assert config["node"] == config["user"] == node
            assert config["password"] == passwords[node]
            assert config["host"] == "192.0.2.10"
            assert config["outbox"] == "/var/lib/edge-agent/outbox.sqlite"
            assert config["require_sync"] is True

            # The unit: accepted by systemd, hardened, enabled (not started: a chroot).
            unit = (root / "etc/systemd/system/edge-agent.service").read_text()
            for line in (
                "ExecStart=/opt/edge-agent/bin/edge-agent run --config /etc/edge-agent/config.toml",
                "Restart=always",
                "RestartSec=5",
                "User=edge-agent",
                "SupplementaryGroups=gpio i2c",
                "StateDirectory=edge-agent",
                "TimeoutStopSec=30",
                "NoNewPrivileges=yes",
                "ProtectSystem=strict",
                "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                "PrivateMounts=yes",
                "RemoveIPC=yes",
                "ProtectProc=invisible",
                # pi-garage's DHT22, CPU sensor and LED identify the board from /proc/cpuinfo
                # and /proc/device-tree; pi-kitchen's DS18B20s need no /proc beyond its own.
                f"ProcSubset={'pid' if node == 'pi-kitchen' else 'all'}",
                "Environment=EDGE_BOOT_ID=%b",
                "SystemCallFilter=@system-service",
                "SystemCallFilter=~@privileged @resources",
                # The example's gateway is an IP literal, so the unit allow-lists it.
                "IPAddressDeny=any",
                "IPAddressAllow=localhost 192.0.2.10",
            ):
                assert f"\n{line}\n" in unit, line
            verify = in_root(
                root, "systemd-analyze", "verify", "/etc/systemd/system/edge-agent.service"
            )
            assert verify.stdout + verify.stderr == "", verify.stdout + verify.stderr
            in_root(
                root,
                "systemd-analyze",
                "security",
                "--offline=true",
                # 1.6 for this unit on systemd 252; 2.3 before ProtectProc, ProcSubset,
                # PrivateMounts, RemoveIPC, ~@privileged @resources and the IP allow-list.
                "--threshold=20",
                "/etc/systemd/system/edge-agent.service",
            )
            wants = root / "etc/systemd/system/multi-user.target.wants/edge-agent.service"
            assert wants.is_symlink()

            if _mdwe_supported():
                in_root(root, "/opt/edge-agent/bin/python", "-c", MDWE_PROBE, MDWE_IMPORTS)

        # pi-kitchen: DS18B20 only (no `pi` extra), TLS to port 8883 with the copied CA.
        kitchen_config = json.loads(
            in_root(kitchen, "/opt/edge-agent/bin/python", "-I", "-c", CONFIG_PROBE).stdout
        )
        assert kitchen_config["port"] == 8883
        assert kitchen_config["ca"] == "/etc/edge-agent/ca.pem"
        assert [s[:3] for s in kitchen_config["sensors"]] == [
            ["fridge", "ds18b20", "28-0316a2b4c5ff"],
            ["28-0416b3c4d5e6", "ds18b20", "28-0416b3c4d5e6"],
        ]
        assert kitchen_config["sensors"][0][4:7] == [30.0, -0.2, 3]
        assert (kitchen / "etc/edge-agent/ca.pem").read_text() == ca_file.read_text()
        no_extra = in_root(
            kitchen, "/opt/edge-agent/bin/python", "-c", "import gpiozero", check=False
        )
        assert no_extra.returncode != 0, "gpiozero was installed without a DHT22, CPU or LED"

        # pi-garage: DHT22 + CPU + LED + BME280, so the `pi` extra and libgpiod; plain MQTT.
        garage_config = json.loads(
            in_root(garage, "/opt/edge-agent/bin/python", "-I", "-c", CONFIG_PROBE).stdout
        )
        assert garage_config["port"] == 1883
        assert garage_config["ca"] is None
        assert garage_config["led"] == 27
        assert [s[1] for s in garage_config["sensors"]] == ["dht22", "ds18b20", "cpu", "bme280"]
        assert garage_config["sensors"][0][3] == 17
        # The inventory's address: 0x76 is a number in YAML, written as 0x76 to config.toml.
        assert garage_config["sensors"][3][7] == 0x76
        assert "\naddress = 0x76\n" in (garage / "etc/edge-agent/config.toml").read_text()
        in_root(
            garage,
            "/opt/edge-agent/bin/python",
            "-c",
            "import gpiozero, adafruit_dht, adafruit_bme280.basic",
        )
        for name in (
            "gpiozero",
            "adafruit-circuitpython-dht",
            "adafruit-circuitpython-bme280",
            "adafruit-extended-bus",
        ):
            installed = in_root(
                garage,
                "/opt/edge-agent/bin/python",
                "-c",
                f"import importlib.metadata as m; print(m.version({name!r}))",
            )
            assert installed.stdout.strip() == pins[name], name
        libgpiod = in_root(garage, "sh", "-c", "ls /usr/lib/*/libgpiod.so.*")
        assert "libgpiod.so" in libgpiod.stdout
