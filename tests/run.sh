#!/usr/bin/env bash
# The project's one test command (README "Run the tests"; CI runs exactly this).
#
# On a fresh Debian 12 or 13 machine as root it installs what is missing (tests/setup.sh:
# RabbitMQ, PostgreSQL, Python's venv, debootstrap for the Ansible test), creates .venv with the
# pinned dependencies, then runs the linters, the type checker and the whole test suite against
# private brokers and databases it starts itself. As non-root it says exactly what to install.
# Extra arguments go to pytest, e.g.
#   tests/run.sh -m "not slow"      tests/run.sh tests/unit -x
set -euo pipefail
source "$(dirname "$0")/setup.sh"

say "ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
say "mypy"
"$VENV/bin/mypy"

# pytest exits 5 when it collected nothing: that is a failure too.
say "pytest"
set +e
"$VENV/bin/python" -m pytest --durations=25 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "tests/run.sh: pytest collected no tests" >&2
fi
exit "$status"
