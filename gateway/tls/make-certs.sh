#!/bin/sh
# A private certificate authority and the broker's certificate, for MQTT over TLS.
#
#   gateway/tls/make-certs.sh DIR GATEWAY_HOSTNAME [EXTRA_NAME ...]
#
# Writes two folders:
#   DIR/broker/  ca.pem, server.pem, server.key: what the broker needs, and all that is
#                mounted into it (gateway/compose.tls.yml). Give DIR/broker/ca.pem to every
#                node (mqtt.ca_file; Ansible: tempmon_mqtt_tls_ca_file).
#   DIR/ca/      ca.pem and ca.key, the authority's private key (mode 0600 in a 0700 folder):
#                never deploy it; keep it offline, it signs the next server certificate.
# The server certificate names GATEWAY_HOSTNAME and each EXTRA_NAME (a host name or an IPv4
# address) and nothing else: add `localhost` or an address only if nodes connect by it. The CA
# may sign server certificates only (pathlen:0, keyCertSign). Existing files are never
# overwritten. The test fixtures use this script too.
set -eu
usage="usage: make-certs.sh DIR GATEWAY_HOSTNAME [EXTRA_NAME ...]"
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
dir=$1
host=$2
shift 2
for name in "$host" "$@"; do
    case "$name" in
        '' | *[!A-Za-z0-9.-]*) echo "make-certs.sh: '$name' is not a host name or IPv4 address" >&2; exit 2 ;;
    esac
done
for f in broker/ca.pem broker/server.pem broker/server.key ca/ca.pem ca/ca.key; do
    [ ! -e "$dir/$f" ] || { echo "make-certs.sh: $dir/$f exists; not overwriting" >&2; exit 1; }
done

san="DNS:$host"
for name in "$@"; do
    case "$name" in
        *[!0-9.]*) san="$san,DNS:$name" ;;
        *) san="$san,IP:$name" ;;
    esac
done

umask 077
mkdir -p "$dir/ca" "$dir/broker"
chmod 700 "$dir/ca"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj "/CN=tempmon gateway CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -keyout "$dir/ca/ca.key" -out "$dir/ca/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$host" -keyout "$dir/broker/server.key" -out "$work/server.csr" 2>/dev/null
printf '%s\n' \
    "subjectAltName=$san" \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" \
    "subjectKeyIdentifier=hash" \
    "authorityKeyIdentifier=keyid" > "$work/server.ext"
openssl x509 -req -in "$work/server.csr" -CA "$dir/ca/ca.pem" -CAkey "$dir/ca/ca.key" \
    -CAcreateserial -CAserial "$work/ca.srl" -days 825 -extfile "$work/server.ext" \
    -out "$dir/broker/server.pem" 2>/dev/null
cp "$dir/ca/ca.pem" "$dir/broker/ca.pem"
chmod 644 "$dir/ca/ca.pem" "$dir/broker/ca.pem" "$dir/broker/server.pem"
chmod 755 "$dir/broker"
# The broker runs as its own user (uid 999 in the image): it must read its key.
chmod 640 "$dir/broker/server.key"
echo "make-certs.sh: wrote $dir/broker/ (ca.pem, server.pem, server.key for $san) and $dir/ca/ (keep ca.key offline)"
