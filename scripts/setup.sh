#!/usr/bin/env bash
# Sets up a fresh machine for BlueMarble: etcd (Debian's etcd-server) when missing, a
# virtualenv in .venv with the project and its dev tools. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v etcd >/dev/null 2>&1; then
  echo "== installing etcd (Debian package etcd-server)"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server >/dev/null
fi
etcd --version | sed -n 1p  # sed reads it all: `head` could end the pipe early (SIGPIPE under pipefail)

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.bluemarble-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== installing the project and its dev tools into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
# The dev harness (scripts/localcluster.py) is not part of the installed packages: put the
# checkout on the venv's path so scripts and tests import it as scripts.localcluster.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD" > "$site/bluemarble-dev-checkout.pth"
