#!/usr/bin/env bash
# Sets up a fresh machine for BlueMarble: etcd (Debian's etcd-server) when missing, a
# virtualenv in .venv with the project and its dev tools. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
PYTHON=${PYTHON:-python3}
# Debian packages: etcd, etcdctl (restoring a backup; the tests restore one), and Python's
# venv module (a bare Debian has python3 without it).
packages=()
command -v etcd >/dev/null 2>&1 || packages+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || packages+=(etcd-client)
command -v "$PYTHON" >/dev/null 2>&1 || packages+=(python3)
if ! command -v "$PYTHON" >/dev/null 2>&1 || ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  packages+=(python3-venv)
fi
if [ ${#packages[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${packages[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${packages[@]}" >/dev/null
fi
etcd --version | sed -n 1p  # sed reads it all: `head` could end the pipe early (SIGPIPE under pipefail)

if [ -x .venv/bin/python ] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  echo "== .venv is incomplete (no pip: an earlier venv creation failed); making it again"
  rm -rf .venv
fi
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
