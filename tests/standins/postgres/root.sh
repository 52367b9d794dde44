# Recipe (run by tests/harness/debian.py inside a Debian 13 root) for the postgres:17 stand-in:
# Debian's PostgreSQL 17 with the official image's account (postgres, uid and gid 999) and, as
# there, no cluster made by the package: the entrypoint runs initdb on an empty data directory.
groupadd --gid 999 --system postgres
useradd --uid 999 --system --gid postgres --home-dir /var/lib/postgresql --shell /bin/bash postgres
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends postgresql-common
sed -ri 's/#(create_main_cluster) .*$/\1 = false/' /etc/postgresql-common/createcluster.conf
apt-get install -y -q --no-install-recommends postgresql-17
apt-get clean
rm -rf /var/lib/apt/lists/*
