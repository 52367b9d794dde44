#!/bin/bash
# The official rabbitmq image's entry point contract: started as root with a rabbitmq* command,
# step down to the rabbitmq user (fixing the data directory's owner); otherwise run the command
# as given (compose starts our service with `user: rabbitmq` and its own start.sh).
set -euo pipefail
if [[ "$1" == rabbitmq* ]] && [ "$(id -u)" = 0 ]; then
    if [ "$1" = rabbitmq-server ]; then
        find /var/lib/rabbitmq \! -user rabbitmq -exec chown rabbitmq '{}' +
    fi
    exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "$BASH_SOURCE" "$@"
fi
# Long host names when the container's host name has a domain, as the official image does.
if [ -z "${RABBITMQ_USE_LONGNAME:-}" ] && [ "$(hostname)" != "$(hostname -s)" ]; then
    export RABBITMQ_USE_LONGNAME=true
fi
exec "$@"
