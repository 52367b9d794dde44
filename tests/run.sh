#!/usr/bin/env bash
# The project's one test command (README "Run the tests"; CI runs exactly this).
#
# On a fresh Debian 12 or 13 machine as root it installs what is missing (RabbitMQ, PostgreSQL,
# Python's venv), creates .venv with the pinned dependencies, then runs the linters, the type
# checker and the whole test suite against private brokers and databases it starts itself.
# As non-root it says exactly what to install. Extra arguments go to pytest, e.g.
#   tests/run.sh -m "not slow"      tests/run.sh tests/unit -x
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PYTHON=${PYTHON:-python3}

say() { printf '==> %s\n' "$*"; }

# 1. System packages ------------------------------------------------------------------------
APT_PACKAGES=(rabbitmq-server postgresql python3-venv)
missing=()
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "tests/run.sh: $PYTHON is older than 3.11; install Python 3.11 or newer" >&2
    exit 1
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "tests/run.sh: missing Debian packages: ${missing[*]}" >&2
        echo "install them, then run this again:" >&2
        echo "    sudo apt-get update && sudo apt-get install -y ${APT_PACKAGES[*]}" >&2
        exit 1
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# 2. Python environment (re-created only when a requirement file changed) -----------------------
stamp_source=$(cat constraints.txt tests/requirements.txt edge/pyproject.toml pipeline/pyproject.toml \
    | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$stamp_source" ]; then
    say "preparing $VENV"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt \
        -e ./edge -e ./pipeline -r tests/requirements.txt
    echo "$stamp_source" > "$VENV/.installed"
fi

# 3. Static checks ------------------------------------------------------------------------------
say "ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
say "mypy"
"$VENV/bin/mypy"

# 4. Tests (pytest exits 5 when it collected nothing: that is a failure too) --------------------
say "pytest"
set +e
"$VENV/bin/python" -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "tests/run.sh: pytest collected no tests" >&2
fi
exit "$status"
