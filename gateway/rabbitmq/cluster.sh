#!/bin/sh
# Cluster duties of one RabbitMQ node, run on the node once it is up (gateway/rabbitmq/start.sh
# runs `cluster.sh replicas` when RABBITMQ_CLUSTER_COOKIE is set; the cluster tests run it as
# they start each node).
#
#   cluster.sh replicas   make this node a member of every quorum queue that lacks it
#
# Why: the topology (definitions.json) is imported by the first node while it is still alone,
# so its quorum queues start with that one member; a node that joins later, or comes back with
# an empty disk, is a member of nothing until it is added. `rabbitmq-queues grow` adds this
# node to every quorum queue of every vhost that does not have it yet, and does nothing where
# it is already a member, so it is safe at every start. Once three nodes have run it, every
# reading is kept on three nodes.
#
# Environment:
#   RABBITMQCTL      (default rabbitmqctl)
#   RABBITMQ_QUEUES  (default rabbitmq-queues)
set -eu

CTL=${RABBITMQCTL:-rabbitmqctl}
QUEUES=${RABBITMQ_QUEUES:-rabbitmq-queues}

die() { echo "cluster.sh: $*" >&2; exit 2; }

replicas() {
    # eval prints the result as an Erlang term: a string, in double quotes.
    node=$("$CTL" -q eval 'atom_to_list(node()).' | tr -d '"\r\n') ||
        die "cannot reach the local node"
    case "$node" in
        *@*) ;;
        *) die "the local node did not say its name (got '$node')" ;;
    esac
    # --errors-only: one line per queue that could not take the member, none for the others.
    if ! out=$("$QUEUES" -q grow "$node" all --errors-only 2>&1); then
        die "could not add $node to the quorum queues: $out"
    fi
    if [ -n "$out" ]; then
        echo "cluster.sh: some quorum queues could not take $node (retried at its next start):" >&2
        echo "$out" >&2
        return 0
    fi
    echo "cluster.sh: $node is a member of every quorum queue"
}

case "${1:-}" in
    replicas) replicas ;;
    *) die "usage: cluster.sh replicas" ;;
esac
