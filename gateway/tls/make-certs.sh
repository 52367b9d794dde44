#!/bin/sh
# A private certificate authority and the broker's certificate, for MQTT over TLS.
#
#   gateway/tls/make-certs.sh DIR GATEWAY_HOSTNAME [EXTRA_NAME ...]
#
# Writes DIR/ca.pem (give it to every node: mqtt.ca_file), DIR/ca.key (keep it offline),
# DIR/server.pem and DIR/server.key (the broker's). The certificate names the hostname, any
# extra names or IP addresses, localhost and 127.0.0.1. Existing files are never overwritten.
# The test fixtures use this script too.
set -eu
[ $# -ge 2 ] || { echo "usage: make-certs.sh DIR GATEWAY_HOSTNAME [EXTRA_NAME ...]" >&2; exit 2; }
dir=$1
host=$2
shift 2
mkdir -p "$dir"
cd "$dir"
for f in ca.pem ca.key server.pem server.key; do
    [ ! -e "$f" ] || { echo "make-certs.sh: $dir/$f exists; not overwriting" >&2; exit 1; }
done

san="DNS:$host,DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
    case "$name" in
        *[!0-9.]*) san="$san,DNS:$name" ;;
        *) san="$san,IP:$name" ;;
    esac
done

umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj "/CN=tempmon gateway CA" -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$host" -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
    -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 644 ca.pem server.pem
# The broker runs as its own user: it must read its key.
chmod 640 server.key
echo "make-certs.sh: wrote $dir/ca.pem, ca.key, server.pem, server.key for $san"
