#!/usr/bin/env bash
# One command from a fresh machine to a running local cluster: sets up, then starts
# etcd, a control plane and three shard nodes, shows the cluster, runs until Ctrl-C.
# Extra arguments go to scripts/dev_cluster.py (e.g. --once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/dev_cluster.py "$@"
