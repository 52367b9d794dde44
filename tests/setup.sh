#!/usr/bin/env bash
# Sourced by tests/run.sh and tests/demo.sh: installs what a fresh Debian 12 or 13 machine lacks
# (as root), and .venv with the pinned Python dependencies (again only when a requirement file
# changed). As non-root it says exactly what to install.

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PYTHON=${PYTHON:-python3}

say() { printf '==> %s\n' "$*"; }

APT_PACKAGES=(rabbitmq-server postgresql python3-venv openssl debootstrap systemd)
missing=()
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v openssl >/dev/null || missing+=(openssl)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
command -v systemd-analyze >/dev/null || missing+=(systemd)
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

stamp_source=$(cat constraints.txt tests/requirements.txt edge/pyproject.toml pipeline/pyproject.toml \
    | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$stamp_source" ]; then
    say "preparing $VENV"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt \
        -e ./edge -e './pipeline' -r tests/requirements.txt
    echo "$stamp_source" > "$VENV/.installed"
fi
