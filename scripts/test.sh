#!/usr/bin/env bash
# One command from a fresh machine to a passing test suite: sets up, checks the
# generated stubs are current, lints and type-checks, then runs every test (unit, integration against a real
# etcd the fixtures start, end to end with real processes). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/gen_protos.py --check
if [ -f ../shared/tools/contract_check.py ]; then
  .venv/bin/python ../shared/tools/contract_check.py proto
fi
.venv/bin/ruff check bluemarble controlplane shardnode scripts tests
.venv/bin/mypy
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
