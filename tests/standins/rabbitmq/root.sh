# Recipe (run by tests/harness/debian.py inside a Debian 13 root) for the rabbitmq:4-management
# stand-in: Debian's rabbitmq-server 4.0 with the official image's account, uid and gid 999.
groupadd --gid 999 --system rabbitmq
useradd --uid 999 --system --home-dir /var/lib/rabbitmq --gid rabbitmq rabbitmq
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends rabbitmq-server ca-certificates
apt-get clean
rm -rf /var/lib/apt/lists/*
# As in the official image: no cookie is baked in, the node makes its own at first boot.
rm -f /var/lib/rabbitmq/.erlang.cookie
