#!/bin/sh
# The gateway's preflight (docker compose service `preflight`, which every other service waits
# for): refuse to start with a placeholder or a weak password, naming the variable to set.
#
#   preflight.sh VARIABLE [VARIABLE ...]    each VARIABLE is read from the environment
#
# A password must be set, must not be a placeholder (the change-me of .env.example, the
# example-not-a-secret of the Ansible example vault, and the usual suspects), must not equal
# its account's name, and must have at least PREFLIGHT_MIN_LENGTH (default 12) characters.
# Optional passwords (DEMO_NODE_PASSWORD) are checked only when set. Exit 1 on the first
# failure; the message says which variable to set in .env.
set -eu

min=${PREFLIGHT_MIN_LENGTH:-12}
failed=0

# The account a password belongs to, where .env names one.
account_of() {
    case "$1" in
        RABBITMQ_ADMIN_PASSWORD) echo "${RABBITMQ_ADMIN_USER:-admin}" ;;
        PIPELINE_AMQP_PASSWORD) echo "${PIPELINE_AMQP_USER:-pipeline}" ;;
        POSTGRES_PASSWORD) echo "${POSTGRES_USER:-postgres}" ;;
        PIPELINE_DB_PASSWORD) echo "${PIPELINE_DB_USER:-pipeline}" ;;
        READER_DB_PASSWORD) echo "${READER_DB_USER:-reader}" ;;
        MIGRATE_DB_PASSWORD) echo "${MIGRATE_DB_USER:-tempmon_owner}" ;;
        GRAFANA_ADMIN_PASSWORD) echo "${GRAFANA_ADMIN_USER:-admin}" ;;
        *) echo "" ;;
    esac
}

refuse() {
    echo "preflight: $1 $2: set a real password for $1 in .env (at least $min characters," \
        "not a placeholder), e.g. with: openssl rand -base64 24" >&2
    failed=1
}

for name in "$@"; do
    optional=0
    case "$name" in
        '?'*) optional=1; name=${name#?} ;;
    esac
    value=$(printenv "$name" || true)
    if [ -z "$value" ]; then
        [ "$optional" -eq 1 ] || refuse "$name" "is not set"
        continue
    fi
    lowered=$(printf '%s' "$value" | tr '[:upper:]' '[:lower:]')
    case "$lowered" in
        change-me* | changeme* | change_me* | example-not-a-secret* | password* | passw0rd* | \
            secret* | admin | guest | postgres | rabbitmq | tempmon* | 123456* | qwerty*)
            refuse "$name" "is a placeholder"
            continue
            ;;
    esac
    if [ "$lowered" = "$(account_of "$name" | tr '[:upper:]' '[:lower:]')" ]; then
        refuse "$name" "equals its account's name"
        continue
    fi
    if [ "${#value}" -lt "$min" ]; then
        refuse "$name" "has ${#value} characters"
        continue
    fi
done

if [ "$failed" -ne 0 ]; then
    echo "preflight: refusing to start the gateway" >&2
    exit 1
fi
echo "preflight: every password is set and none is a placeholder or shorter than $min characters"
