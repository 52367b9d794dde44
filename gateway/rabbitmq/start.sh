#!/bin/sh
# Entry point of the rabbitmq service in docker compose: boot the broker with the topology from
# definitions.json, then create its users from the environment (users.sh apply). The
# healthcheck reports healthy only after both, so nothing connects to a broker without users.
set -eu

ready=/tmp/gateway-users-applied
rm -f "$ready"

rabbitmq-server &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true' TERM INT

rabbitmqctl -q await_startup --timeout 300
sh /etc/rabbitmq/gateway/users.sh apply
# docker compose --profile demo: three simulated agents, each with its own user.
if [ -n "${DEMO_NODE_PASSWORD:-}" ]; then
    for node in demo-1 demo-2 demo-3; do
        printf '%s' "$DEMO_NODE_PASSWORD" | sh /etc/rabbitmq/gateway/users.sh node "$node"
    done
fi
touch "$ready"

# `wait` returns early when a trapped signal arrives; wait again for the orderly shutdown.
wait "$server" || true
wait "$server" 2>/dev/null || true
