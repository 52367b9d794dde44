#!/usr/bin/env bash
# The native demo for a machine without Docker (README "Try it without Docker"): RabbitMQ and
# PostgreSQL from the local binaries, two consumers, three simulated agents, the summary as it
# fills. Installs what it needs like tests/run.sh. Ctrl-C stops everything.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
exec "$VENV/bin/python" -m tests.demo "$@"
