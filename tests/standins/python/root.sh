# Recipe (run by tests/harness/debian.py inside a Debian 13 root) for the python:3.12-slim
# stand-in: Debian's Python 3 with `python`, `pip` and `venv`, as the official image has them.
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends python3 python3-venv python3-pip python-is-python3 \
    ca-certificates
apt-get clean
rm -rf /var/lib/apt/lists/*
