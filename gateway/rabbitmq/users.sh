#!/bin/sh
# Broker users for the gateway. Definitions (definitions.json) hold the topology only: RabbitMQ
# creates no default user when it imports definitions at boot, and no password belongs in git.
# This script creates the users from the environment, idempotently, through rabbitmqctl.
#
#   users.sh apply         admin (management UI) and pipeline (AMQP consumer) from the environment
#   users.sh node ID       a node's MQTT user; its password is read from standard input
#   users.sh delete-node ID
#
# Environment:
#   RABBITMQ_ADMIN_USER      (default admin)     administrator for the management UI
#   RABBITMQ_ADMIN_PASSWORD  (required by apply)
#   PIPELINE_AMQP_USER       (default pipeline)  consumes readings, node-status and dead letters
#   PIPELINE_AMQP_PASSWORD   (required by apply)
#   RABBITMQCTL              (default rabbitmqctl)
#
# Used by docker compose (gateway/rabbitmq/start.sh), by the test fixtures and by Ansible, so the
# permissions below are the ones that are tested.
set -eu

CTL=${RABBITMQCTL:-rabbitmqctl}
VHOST=/

# A node may publish only sensors.<its id>.<sensor> and status.<its id> (RabbitMQ matches the
# dotted routing key and expands {username}); it reads nothing and declares nothing.
NODE_CONFIGURE='^$'
NODE_WRITE='^amq\.topic$'
NODE_READ='^$'
NODE_TOPIC_WRITE='^(sensors\.{username}\.[A-Za-z0-9_-]+|status\.{username})$'
NODE_TOPIC_READ='^$'

# The pipeline reads its queues and declares nothing (the topology comes from definitions.json).
# It writes through the default exchange only: a rejected reading goes to readings.dead with
# its reason in a header, and `pipeline dead replay` puts dead letters back into readings.
PIPELINE_CONFIGURE='^$'
PIPELINE_WRITE='^amq\.default$'
PIPELINE_READ='^(readings|node-status|readings\.dead|node-status\.dead)$'

die() { echo "users.sh: $*" >&2; exit 2; }

valid_id() {
    case "$1" in
        ''|*[!A-Za-z0-9_-]*) die "node id '$1' is invalid: use only letters, digits, '_' and '-'" ;;
    esac
}

user_exists() {
    "$CTL" -q list_users --no-table-headers | cut -f1 | grep -qx -- "$1"
}

# ensure_user NAME PASSWORD: create the user or reset its password; never prints the password,
# never puts it on a command line. RabbitMQ 4.x's rabbitmqctl script lets the CLI read standard
# input only when the command and the user name are its ONLY arguments: with any extra flag
# (-q included) it starts the VM with -noinput and the password prompt waits forever. So no
# flag here, and the "Adding user" line goes to /dev/null instead of being silenced by -q.
ensure_user() {
    if user_exists "$1"; then
        printf '%s' "$2" | "$CTL" change_password "$1" >/dev/null
    else
        printf '%s' "$2" | "$CTL" add_user "$1" >/dev/null
    fi
}

apply() {
    admin=${RABBITMQ_ADMIN_USER:-admin}
    pipeline=${PIPELINE_AMQP_USER:-pipeline}
    [ -n "${RABBITMQ_ADMIN_PASSWORD:-}" ] || die "RABBITMQ_ADMIN_PASSWORD is not set (see .env.example)"
    [ -n "${PIPELINE_AMQP_PASSWORD:-}" ] || die "PIPELINE_AMQP_PASSWORD is not set (see .env.example)"
    ensure_user "$admin" "$RABBITMQ_ADMIN_PASSWORD"
    "$CTL" -q set_user_tags "$admin" administrator >/dev/null
    "$CTL" -q set_permissions -p "$VHOST" "$admin" '.*' '.*' '.*' >/dev/null
    ensure_user "$pipeline" "$PIPELINE_AMQP_PASSWORD"
    "$CTL" -q set_user_tags "$pipeline" monitoring >/dev/null
    "$CTL" -q set_permissions -p "$VHOST" "$pipeline" \
        "$PIPELINE_CONFIGURE" "$PIPELINE_WRITE" "$PIPELINE_READ" >/dev/null
    echo "users.sh: users $admin and $pipeline are in place"
}

node() {
    valid_id "$1"
    password=$(cat)
    [ -n "$password" ] || die "no password for node '$1' on standard input"
    ensure_user "$1" "$password"
    "$CTL" -q set_permissions -p "$VHOST" "$1" "$NODE_CONFIGURE" "$NODE_WRITE" "$NODE_READ" >/dev/null
    "$CTL" -q set_topic_permissions -p "$VHOST" "$1" amq.topic "$NODE_TOPIC_WRITE" "$NODE_TOPIC_READ" >/dev/null
    echo "users.sh: node user $1 may publish sensors/$1/<sensor> and status/$1"
}

case "${1:-}" in
    apply) apply ;;
    node) [ $# -eq 2 ] || die "usage: users.sh node ID  (password on standard input)"; node "$2" ;;
    delete-node) [ $# -eq 2 ] || die "usage: users.sh delete-node ID"; valid_id "$2"; "$CTL" -q delete_user "$2" ;;
    *) die "usage: users.sh apply | node ID | delete-node ID" ;;
esac
