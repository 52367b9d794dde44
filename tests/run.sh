#!/usr/bin/env bash
# The project's one test command (README "Run the tests"; CI runs exactly this).
#
# On a fresh Debian 12 or 13 machine as root it installs what is missing (tests/setup.sh:
# RabbitMQ, PostgreSQL, Python's venv, debootstrap for the Ansible test), creates .venv with the
# pinned dependencies, then runs the linters, the type checker and the whole test suite against
# private brokers and databases it starts itself. As non-root it says exactly what to install.
# Extra arguments go to pytest, e.g.
#   tests/run.sh -m "not slow"      tests/run.sh tests/unit -x
#
# The tests run in TEMPMON_TEST_WORKERS parallel processes (pytest-xdist; default 3): most
# system tests wait on a broker's boot, a reconnect or a container, not on the CPU, and each
# worker has its own private servers. Tests are handed out one at a time, in the order
# tests/conftest.py gives them (the longest first). Arguments that choose for themselves
# (-n N, -p no:xdist) are left alone; a single test (a node id with ::), -s/--capture=no,
# --pdb and --trace run in this one process, with the terminal.
set -euo pipefail
source "$(dirname "$0")/setup.sh"

parallel=(-n "${TEMPMON_TEST_WORKERS:-3}" --dist load --maxschedchunk 1)
for arg in "$@"; do
    case "$arg" in
        -n | -n[0-9]* | -nauto | -nlogical | --numprocesses | --numprocesses=* | no:xdist | -pno:xdist | *::*)
            parallel=() ;;
        -s | --capture=no | --pdb | --trace)
            parallel=() ;;
    esac
done

say "ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
say "mypy"
"$VENV/bin/mypy"

# pytest exits 5 when it collected nothing: that is a failure too.
say "pytest"
set +e
"$VENV/bin/python" -m pytest --durations=25 ${parallel[@]+"${parallel[@]}"} "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "tests/run.sh: pytest collected no tests" >&2
fi
exit "$status"
