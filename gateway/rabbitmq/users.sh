#!/bin/sh
# Broker users for the gateway. Definitions (definitions.json) hold the topology only: RabbitMQ
# creates no default user when it imports definitions at boot, and no password belongs in git.
# This script creates the users from the environment, idempotently.
#
#   users.sh apply             admin (management UI) and pipeline (AMQP consumer), from the
#                              environment
#   users.sh node ID [ID ...]  nodes' MQTT users; the password (one for all the IDs given) is
#                              read from standard input
#   users.sh delete-node ID
#
# Environment:
#   RABBITMQ_ADMIN_USER      (default admin)     administrator for the management UI
#   RABBITMQ_ADMIN_PASSWORD  (required by apply)
#   PIPELINE_AMQP_USER       (default pipeline)  consumes readings, node-status and dead letters
#   PIPELINE_AMQP_PASSWORD   (required by apply)
#   NODE_MAX_CONNECTIONS     (default 3)         connections one node user may hold at once
#   RABBITMQCTL              (default rabbitmqctl)
#
# How: each call writes the users, their permissions and limits as a small definitions file
# and imports it with one `rabbitmqctl import_definitions`, which creates a user or updates its
# password, tags, permissions and limits. Every rabbitmqctl call starts an Erlang VM (a second
# or more), so one import instead of a call per setting makes a gateway healthy sooner. The
# file holds salted SHA-256 hashes, never a password (RabbitMQ's rabbit_password_hashing_sha256:
# base64 of a 4-byte salt followed by SHA-256(salt + password)); it lives in a private temp
# folder and is deleted after the import. Passwords never appear on a command line.
#
# Used by docker compose (gateway/rabbitmq/start.sh), by the test fixtures and by Ansible, so the
# permissions below are the ones that are tested.
set -eu

CTL=${RABBITMQCTL:-rabbitmqctl}

# A node may publish only sensors.<its id>.<sensor> and status.<its id> (RabbitMQ matches the
# dotted routing key and expands {username}); it reads nothing and declares nothing. (JSON
# strings: a backslash is written twice.)
NODE_CONFIGURE='^$'
NODE_WRITE='^amq\\.topic$'
NODE_READ='^$'
NODE_TOPIC_WRITE='^(sensors\\.{username}\\.[A-Za-z0-9_-]+|status\\.{username})$'
NODE_TOPIC_READ='^$'
# One agent holds one connection; a reconnect may overlap a half-dead one for a keepalive.
# More is a node flooding the broker with connections.
NODE_MAX_CONNECTIONS=${NODE_MAX_CONNECTIONS:-3}
# A node's password: at least this long (the agent reads it from a file; length costs nothing).
NODE_MIN_PASSWORD=12

# The pipeline reads its queues and declares nothing (the topology comes from definitions.json).
# It writes through the default exchange only: a rejected reading goes to readings.dead with
# its reason in a header, and `pipeline dead replay` puts dead letters back into readings.
PIPELINE_CONFIGURE='^$'
PIPELINE_WRITE='^amq\\.default$'
PIPELINE_READ='^(readings|node-status|readings\\.dead|node-status\\.dead)$'

die() { echo "users.sh: $*" >&2; exit 2; }

# A node's user name is its id (tempmon_contract.ids): 1 to 64 of [A-Za-z0-9_-].
valid_id() {
    case "$1" in
        ''|*[!A-Za-z0-9_-]*) die "user name '$1' is invalid: use only letters, digits, '_' and '-'" ;;
    esac
    [ "${#1}" -le 64 ] || die "user name '$1' is ${#1} characters long: at most 64"
}

work=$(umask 077 && mktemp -d)
trap 'rm -rf "$work"' EXIT

# hash_password: the password on standard input, its RabbitMQ hash on standard output.
hash_password() {
    openssl rand 4 > "$work/salt"
    { cat "$work/salt"; cat; } | openssl dgst -sha256 -binary > "$work/digest"
    cat "$work/salt" "$work/digest" | base64 | tr -d '\n'
    rm -f "$work/salt" "$work/digest"
}

users='' permissions='' topic_permissions=''
sep() { [ -z "$1" ] || printf ','; }

# add_user NAME HASH TAGS LIMITS CONFIGURE WRITE READ (TAGS and LIMITS are JSON)
add_user() {
    # 4 bytes of salt and 32 of digest are 48 base64 characters; anything else means the
    # hashing failed (no openssl?), and an empty hash must never reach the broker.
    [ "${#2}" -eq 48 ] || die "could not hash the password of '$1' (openssl and base64 are needed)"
    users="$users$(sep "$users"){\"name\":\"$1\",\"password_hash\":\"$2\",\"hashing_algorithm\":\"rabbit_password_hashing_sha256\",\"tags\":$3,\"limits\":$4}"
    permissions="$permissions$(sep "$permissions"){\"user\":\"$1\",\"vhost\":\"/\",\"configure\":\"$5\",\"write\":\"$6\",\"read\":\"$7\"}"
}

import() {
    printf '{"users":[%s],"permissions":[%s],"topic_permissions":[%s]}\n' \
        "$users" "$permissions" "$topic_permissions" > "$work/users.json"
    "$CTL" -q import_definitions "$work/users.json" >/dev/null
}

apply() {
    admin=${RABBITMQ_ADMIN_USER:-admin}
    pipeline=${PIPELINE_AMQP_USER:-pipeline}
    valid_id "$admin"
    valid_id "$pipeline"
    [ -n "${RABBITMQ_ADMIN_PASSWORD:-}" ] || die "RABBITMQ_ADMIN_PASSWORD is not set (see .env.example)"
    [ -n "${PIPELINE_AMQP_PASSWORD:-}" ] || die "PIPELINE_AMQP_PASSWORD is not set (see .env.example)"
    add_user "$admin" "$(printf '%s' "$RABBITMQ_ADMIN_PASSWORD" | hash_password)" \
        '["administrator"]' '{}' '.*' '.*' '.*'
    # No tags: the pipeline has no business in the management API (a `monitoring` tag would
    # show it every connection, user and client address). Importing also clears an old tag.
    add_user "$pipeline" "$(printf '%s' "$PIPELINE_AMQP_PASSWORD" | hash_password)" \
        '[]' '{}' "$PIPELINE_CONFIGURE" "$PIPELINE_WRITE" "$PIPELINE_READ"
    import
    echo "users.sh: users $admin and $pipeline are in place"
}

node() {
    for id in "$@"; do valid_id "$id"; done
    case "$NODE_MAX_CONNECTIONS" in
        '' | *[!0-9]*) die "NODE_MAX_CONNECTIONS must be a whole number, not '$NODE_MAX_CONNECTIONS'" ;;
    esac
    password=$(cat)
    [ -n "$password" ] || die "no password on standard input for node $*"
    [ "${#password}" -ge "$NODE_MIN_PASSWORD" ] || \
        die "the password for node $* has ${#password} characters: use at least $NODE_MIN_PASSWORD"
    for id in "$@"; do
        # Each user its own salt.
        add_user "$id" "$(printf '%s' "$password" | hash_password)" '[]' \
            "{\"max-connections\":$NODE_MAX_CONNECTIONS}" \
            "$NODE_CONFIGURE" "$NODE_WRITE" "$NODE_READ"
        topic_permissions="$topic_permissions$(sep "$topic_permissions"){\"user\":\"$id\",\"vhost\":\"/\",\"exchange\":\"amq.topic\",\"write\":\"$NODE_TOPIC_WRITE\",\"read\":\"$NODE_TOPIC_READ\"}"
    done
    import
    for id in "$@"; do
        echo "users.sh: node user $id may publish sensors/$id/<sensor> and status/$id," \
            "over at most $NODE_MAX_CONNECTIONS connections"
    done
}

case "${1:-}" in
    apply) apply ;;
    node) [ $# -ge 2 ] || die "usage: users.sh node ID [ID ...]  (password on standard input)"; shift; node "$@" ;;
    delete-node) [ $# -eq 2 ] || die "usage: users.sh delete-node ID"; valid_id "$2"; "$CTL" -q delete_user "$2" ;;
    *) die "usage: users.sh apply | node ID [ID ...] | delete-node ID" ;;
esac
