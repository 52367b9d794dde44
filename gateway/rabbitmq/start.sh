#!/bin/sh
# Entry point of the rabbitmq service in docker compose: boot the broker with the topology from
# definitions.json, then create its users from the environment (users.sh apply). The
# healthcheck reports healthy only after both, so nothing connects to a broker without users.
#
# The node's name is rabbit@<hostname>, and its data lives under that name in the volume:
# docker-compose.yml gives the service a fixed hostname so that a re-created container finds
# the queued readings and dead letters of the one before.
set -eu

ready=/tmp/gateway-users-applied
rm -f "$ready"

# A cluster node (gateway/compose.cluster.yml): every node of a cluster must hold the same
# Erlang cookie, the shared secret the nodes and rabbitmqctl authenticate each other with.
# It is written, readable by this user only, where the node and rabbitmqctl read it.
if [ -n "${RABBITMQ_CLUSTER_COOKIE:-}" ]; then
    cookie="${HOME:-/var/lib/rabbitmq}/.erlang.cookie"
    if [ "${#RABBITMQ_CLUSTER_COOKIE}" -lt 20 ]; then
        echo "start.sh: RABBITMQ_CLUSTER_COOKIE has ${#RABBITMQ_CLUSTER_COOKIE} characters: use at least 20" >&2
        exit 1
    fi
    (umask 077 && rm -f "$cookie" && printf '%s' "$RABBITMQ_CLUSTER_COOKIE" > "$cookie")
    chmod 400 "$cookie"
fi
# Seconds to wait for the node to boot (first boot of an empty volume takes longest).
boot_timeout=${GATEWAY_BOOT_TIMEOUT_S:-300}

rabbitmq-server &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true' TERM INT

# `rabbitmqctl await_startup` fails at once (exit 69) until the new VM has registered with
# epmd, which takes a second or two; retry it for as long as the server process lives.
waited=0
until rabbitmqctl -q await_startup --timeout "$boot_timeout" >/dev/null 2>&1; do
    if ! kill -0 "$server" 2>/dev/null; then
        status=0
        wait "$server" || status=$?
        echo "start.sh: rabbitmq-server exited with status $status before it was up" >&2
        exit 1
    fi
    if [ "$waited" -ge "$boot_timeout" ]; then
        echo "start.sh: the broker did not start within ${boot_timeout}s; see its log above" >&2
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" || true
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done

sh /etc/rabbitmq/gateway/users.sh apply
# A cluster node makes itself a member of every quorum queue (gateway/rabbitmq/cluster.sh).
if [ -n "${RABBITMQ_CLUSTER_COOKIE:-}" ]; then
    sh /etc/rabbitmq/gateway/cluster.sh replicas
fi
# docker compose --profile demo: three simulated agents, each with its own user.
if [ -n "${DEMO_NODE_PASSWORD:-}" ]; then
    printf '%s' "$DEMO_NODE_PASSWORD" | sh /etc/rabbitmq/gateway/users.sh node demo-1 demo-2 demo-3
fi
touch "$ready"

# `wait` returns early when a trapped signal arrives; wait again for the orderly shutdown.
wait "$server" || true
wait "$server" 2>/dev/null || true
