#!/usr/bin/env bash
# Sourced by tests/run.sh and tests/demo.sh: installs what a fresh Debian 12 or 13 machine lacks
# (as root), and .venv with the pinned Python dependencies (again only when a requirement file
# changed). As non-root it says exactly what to install.
#
# Docker: the tests start their own dockerd (Debian's docker.io) on a private socket and need
# Compose v2 as a CLI plugin. Debian 13 packages it as docker-compose; Debian 12's package of
# that name is Compose v1, so there the plugin is fetched from the Debian 13 suite through a
# private apt configuration (the machine's apt sources are not changed) and installed into
# /usr/local/lib/docker/cli-plugins/.

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PYTHON=${PYTHON:-python3}

say() { printf '==> %s\n' "$*"; }

APT_PACKAGES=(rabbitmq-server postgresql python3-venv openssl debootstrap systemd docker.io iproute2)
missing=()
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v openssl >/dev/null || missing+=(openssl)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v dockerd >/dev/null || [ -x /usr/sbin/dockerd ] || missing+=(docker.io)
command -v ip >/dev/null || missing+=(iproute2)
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "$PYTHON is older than 3.11; install Python 3.11 or newer" >&2
    exit 1
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing Debian packages: ${missing[*]}" >&2
        echo "install them, then run this again:" >&2
        echo "    sudo apt-get update && sudo apt-get install -y ${APT_PACKAGES[*]}" >&2
        exit 1
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Compose v2 as a docker CLI plugin (see the header).
COMPOSE_PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
install_compose_plugin() {
    local release work mirror
    release=$(. /etc/os-release && echo "${VERSION_ID%%.*}")
    if [ "${release:-0}" -ge 13 ] 2>/dev/null; then
        say "installing docker-compose (Compose v2)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose
        return
    fi
    say "installing Compose v2 from Debian 13's docker-compose package into $COMPOSE_PLUGIN_DIR"
    mirror=${TEMPMON_DEBIAN_MIRROR:-$(sed -n 's#^URIs:[[:space:]]*\(.*/debian\)/\{0,1\}[[:space:]]*$#\1#p' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)}
    mirror=${mirror:-http://deb.debian.org/debian}
    work=$(mktemp -d)
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/parts" "$work/prefs"
    printf 'deb %s trixie main\n' "$mirror" > "$work/sources.list"
    : > "$work/status"
    printf '%s\n' \
        "Dir::Etc::SourceList \"$work/sources.list\";" \
        "Dir::Etc::SourceParts \"$work/parts\";" \
        "Dir::Etc::Parts \"$work/parts\";" \
        "Dir::Etc::Preferences \"$work/prefs/none\";" \
        "Dir::Etc::PreferencesParts \"$work/prefs\";" \
        "Dir::State::Lists \"$work/lists\";" \
        "Dir::State::status \"$work/status\";" \
        "Dir::Cache \"$work/cache\";" \
        "APT::Sandbox::User \"root\";" > "$work/apt.conf"
    (
        cd "$work"
        APT_CONFIG="$work/apt.conf" apt-get update -q >/dev/null
        APT_CONFIG="$work/apt.conf" apt-get download -q docker-compose >/dev/null
        dpkg-deb -x docker-compose_*.deb extracted
        install -D -m 0755 extracted/usr/libexec/docker/cli-plugins/docker-compose \
            "$COMPOSE_PLUGIN_DIR/docker-compose"
    )
    rm -rf "$work"
}
if ! docker compose version >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "docker compose (Compose v2) is missing; run tests/run.sh once as root to install it" >&2
        exit 1
    fi
    install_compose_plugin
    docker compose version
fi

stamp_source=$(cat constraints.txt tests/requirements.txt contract/pyproject.toml edge/pyproject.toml \
    pipeline/pyproject.toml \
    | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$stamp_source" ]; then
    say "preparing $VENV"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt \
        -e ./contract -e ./edge -e './pipeline' -r tests/requirements.txt
    echo "$stamp_source" > "$VENV/.installed"
fi
